"""This checkout against an earlier revision, end to end in one run: is the pipeline faster, or at least not slower?

    .venv/bin/python benchmarks/against_revision.py --revision 43eaf9e [--model inception_resnet_v2] [--rounds 2]

Checks the revision out into a temporary git worktree and runs `python -m pipeline.run` of each tree on the same
corpus with the same venv, alternating (this checkout, the revision, this checkout, ...) so that the machine's drift
hits both alike. Both run on DirectRunner with one worker process per core. Each rate is the marginal rate between
a 16-image and the full run. Extra pipeline flags after `--` go to this checkout only (e.g. `-- --engine tensorflow`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run_benchmark import SMALL_RUN, build_corpus, marginal_rate, timed, write_manifest  # noqa: E402

from pipeline.models import MODELS  # noqa: E402
from pipeline.standin_models import cached_standin, load_calibration_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--model", default="mobilenet_v2_130_224", choices=sorted(MODELS))
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int, default=2)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    spec = MODELS[args.model]
    handle = cached_standin(spec, os.path.join(REPO, ".cache", "standins"),
                            load_calibration_images(os.path.join(REPO, "samples", "*"), spec))
    count = args.images or (1600 if spec.input_size <= MODELS["mobilenet_v2_130_224"].input_size else 160)
    paths = build_corpus(os.path.join(HERE, "results", "corpus"), count)
    work = tempfile.mkdtemp(prefix="against-revision-")
    small = write_manifest(os.path.join(work, "small.csv"), paths[:SMALL_RUN])
    full = write_manifest(os.path.join(work, "full.csv"), paths)
    old_tree = os.path.join(work, "old")
    subprocess.run(["git", "worktree", "add", "--detach", old_tree, args.revision], cwd=REPO, check=True,
                   capture_output=True)
    cores = str(os.cpu_count())
    trees = {"this checkout": (REPO, extra), args.revision: (old_tree, [])}
    results = {name: [] for name in trees}
    try:
        for round_number in range(args.rounds):
            for name, (tree, flags) in trees.items():
                def run(manifest, out, tree=tree, flags=flags):  # the tree is the working directory of the
                    return timed([sys.executable, "-m", "pipeline.run",  # launcher and its workers: its code runs
                                  "--input", manifest, "--output", out, "--model", spec.name, "--model_handle",
                                  handle, "--overwrite", "--direct_running_mode=multi_processing",
                                  f"--direct_num_workers={cores}", *flags], cwd=tree)
                measured = marginal_rate(run, small, full, count, os.path.join(work, f"out-{round_number}"))
                results[name].append(measured)
                print(f"round {round_number + 1} {name:14s} {measured['images_per_s']:7.2f} img/s, start-up "
                      f"{measured['startup_s']} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old_tree], cwd=REPO, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    mean = {name: sum(r["images_per_s"] for r in runs) / len(runs) for name, runs in results.items()}
    ratio = mean["this checkout"] / mean[args.revision]
    print(f"{spec.name}: this checkout {mean['this checkout']:.2f} img/s, {args.revision} {mean[args.revision]:.2f} "
          f"img/s: {ratio:.2f}x")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"against-{args.revision}-{spec.name}.json"), "w") as f:
        json.dump({"model": spec.name, "revision": args.revision, "runs": results, "ratio": round(ratio, 3)}, f,
                  indent=2)


if __name__ == "__main__":
    main()
