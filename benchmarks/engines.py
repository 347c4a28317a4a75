"""Engines side by side in one run: the model alone, decode alone, and the pipeline end to end with each engine.

    .venv/bin/python benchmarks/engines.py [--model mobilenet_v2_130_224] [--images 1600]

For the model's stand-in (same architecture and compute as the hub model): TensorFlow and LiteRT alone
(1 process x 1 thread, and one process per core), each in fresh processes, with start-up and peak RSS;
decode + resize alone on one core; then the pipeline on DirectRunner at its default setting with
`--engine tensorflow` and `--engine auto`, measured as the marginal rate between a 16-image and the full
run, so fixed start-up is reported apart. The pipelines run `--repeats` times in alternating order and
the medians count: one pair of runs swings by tens of percent on a machine that drifts.
The combined limit is cores / (model time + decode time per image), from this run's own measurements
of the fastest engine and the decoder alone (decode measured before and after the pipelines, averaged);
the same formula with each engine gives the best end-to-end ratio this machine allows.
Writes benchmarks/results/engines-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run_benchmark import SMALL_RUN, batch_for, build_corpus, decode_rate, marginal_rate, timed, write_manifest  # noqa: E402

from pipeline.engine import compile_litert, default_cache  # noqa: E402
from pipeline.fingerprint import model_fingerprint  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.options import DEFAULT_BATCH  # noqa: E402
from pipeline.standin_models import cached_standin, load_calibration_images  # noqa: E402
from transforms.embed import EmbedConfig, HubEmbedder  # noqa: E402


def engine_alone(engine: str, handle: str, compiled: str, spec, processes: int, seconds: float) -> dict:
    """The engine at the batch size the pipeline gives it by default (TensorFlow: the model's best batch)."""
    batch = {"tensorflow": batch_for(spec.input_size), "litert": DEFAULT_BATCH["litert"]}
    start_at = time.time() + 25  # every copy has started and warmed up before any measures
    command = [sys.executable, os.path.join(HERE, "engine_alone.py"), "--engine", engine, "--handle", handle,
               "--size", str(spec.input_size), "--dim", str(spec.dim), "--batch", str(batch[engine]),
               "--threads", "1", "--seconds", str(seconds), "--start_at", str(start_at)]
    if compiled:
        command += ["--compiled", compiled]
    copies = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in copies]
    merged = {"engine": engine, "processes": processes, "threads_each": 1,
              "images_per_s": round(sum(r["images_per_s"] for r in results), 2),
              "startup_s": round(max(r["startup_s"] for r in results), 2),
              "peak_rss_mb_per_process": round(max(r["peak_rss_mb"] for r in results)),
              "tensorflow_imported": any(r["tensorflow_imported"] for r in results)}
    print(f"  {engine:10s} {processes} proc x 1 thread: {merged['images_per_s']:7.1f} img/s, start-up "
          f"{merged['startup_s']:.2f} s, peak RSS {merged['peak_rss_mb_per_process']} MB/process, "
          f"TensorFlow imported: {merged['tensorflow_imported']}", flush=True)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_130_224", choices=sorted(MODELS))
    parser.add_argument("--images", type=int)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--copies", type=int, default=2, help="times each corpus image is listed in the full run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = MODELS[args.model]
    cores = os.cpu_count()
    handle = cached_standin(spec, os.path.join(REPO, ".cache", "standins"),
                            load_calibration_images(os.path.join(REPO, "samples", "*"), spec))
    compiled = compile_litert(HubEmbedder(EmbedConfig(handle=handle, image_size=spec.input_size, dim=spec.dim)),
                              spec.input_size, model_fingerprint(handle), default_cache(None))
    count = args.images or (1600 if spec.input_size <= MODELS["mobilenet_v2_130_224"].input_size else 160)
    paths = build_corpus(os.path.join(HERE, "results", "corpus"), count)
    work = os.path.join(HERE, "results", "work-engines")
    os.makedirs(work, exist_ok=True)
    small = write_manifest(os.path.join(work, "small.csv"), paths[:SMALL_RUN])
    full = write_manifest(os.path.join(work, "full.csv"), paths, copies=args.copies)
    listed = count * args.copies

    print(f"{spec.name}: engines alone ...", flush=True)
    alone = [engine_alone(engine, handle, compiled if engine == "litert" else None, spec, processes, args.seconds)
             for processes in (1, cores) for engine in ("tensorflow", "litert")]
    print("decode + resize alone, one core ...", flush=True)
    decode_before = decode_rate(paths, spec.input_size)
    print(f"  {decode_before:.1f} img/s", flush=True)

    def pipeline(engine):
        def run(manifest, out):
            return timed([sys.executable, "-m", "pipeline.run", "--input", manifest, "--output", out, "--model",
                          spec.name, "--model_handle", handle, "--engine", engine, "--overwrite",
                          "--progress_interval", "0"])
        return run

    runs = {"tensorflow": [], "auto": []}
    for repeat in range(args.repeats):
        for engine in ("tensorflow", "auto") if repeat % 2 == 0 else ("auto", "tensorflow"):
            print(f"pipeline end to end, --engine {engine}, run {repeat + 1} of {args.repeats} ...", flush=True)
            runs[engine].append(marginal_rate(pipeline(engine), small, full, listed, os.path.join(work, engine)))
            print(f"  {runs[engine][-1]}", flush=True)
    end_to_end = {engine: {key: statistics.median(run[key] for run in results) for key in results[0]}
                  for engine, results in runs.items()}
    print("decode + resize alone again ...", flush=True)
    decode_after = decode_rate(paths, spec.input_size)
    decode = (decode_before + decode_after) / 2
    print(f"  {decode_after:.1f} img/s", flush=True)

    def limit(engine):
        one_process = next(a for a in alone if a["processes"] == 1 and a["engine"] == engine)
        return cores / (1 / one_process["images_per_s"] + 1 / decode)

    fastest = max((a for a in alone if a["processes"] == 1), key=lambda a: a["images_per_s"])
    best = limit(fastest["engine"])
    summary = {
        "model": spec.name, "cores": cores, "images": listed, "engines_alone": alone,
        "decode_images_per_s": round(decode, 1), "decode_before_after": [round(decode_before, 1), round(decode_after, 1)],
        "fastest_engine_alone": fastest["engine"], "combined_limit_images_per_s": round(best, 1),
        "limit_ratio_litert_vs_tensorflow": round(limit("litert") / limit("tensorflow"), 2),
        "end_to_end_runs": runs, "end_to_end_median": end_to_end,
        "auto_vs_tensorflow_each_run": [round(a["images_per_s"] / t["images_per_s"], 2)
                                        for a, t in zip(runs["auto"], runs["tensorflow"])],
        "auto_vs_tensorflow": round(end_to_end["auto"]["images_per_s"] / end_to_end["tensorflow"]["images_per_s"], 2),
        "auto_vs_limit": round(end_to_end["auto"]["images_per_s"] / best, 2),
        "startup_ratio": round(end_to_end["auto"]["startup_s"] / max(end_to_end["tensorflow"]["startup_s"], 1e-9), 2),
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("engines_alone", "end_to_end_runs")}, indent=2))
    with open(os.path.join(HERE, "results", f"engines-{spec.name}.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
