"""search build across workers (Beam on DirectRunner, 2 worker processes) against the single-process build.

    .venv/bin/python benchmarks/search_distributed.py [--count 500000] [--max_memory 4GB] [--kind auto]

Writes an index ROOT of `count` clustered vectors of dim 1664 (benchmarks/search_nights.py's stream, five runs so
the view has five files: five shards), then builds it once in one process and once with
`--runner DirectRunner --direct_num_workers 2 --direct_running_mode multi_processing`, one after the other in
this run. Each command runs in a fresh process; the whole process tree is sampled every 0.1 s for the launcher's
peak RSS, the largest worker's, and the tree's total. Then recall@10 of both on 500 ids of the view against
numpy's exact search over the stream drawn again. Writes benchmarks/results/search_distributed-COUNT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from search_nights import SAMPLE, Root, Stream, _recall, exact_neighbours  # noqa: E402

WORK = os.path.join(HERE, "results", "work-search-distributed")
TWO_PROCESSES = ["--runner", "DirectRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
SHARDS = 5


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0


def _children() -> dict:
    """parent pid -> child pids, of every process now."""
    found: dict = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(parent, []).append(int(name))
    return found


def _timed_tree(args: list) -> dict:
    """`python -m pipeline.search ARGS` in a fresh process: wall seconds, the launcher's peak RSS, the largest
    descendant's and the peak of the tree's sum."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.search", *args], stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(HERE))
    launcher = worker = tree = 0
    while process.poll() is None:
        children, pending, descendants = _children(), [process.pid], []
        while pending:
            for child in children.get(pending.pop(), []):
                descendants.append(child)
                pending.append(child)
        own, others = _rss_kb(process.pid), [_rss_kb(pid) for pid in descendants]
        launcher, worker, tree = max(launcher, own), max([worker] + others), max(tree, own + sum(others))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"search {' '.join(args)} failed ({process.returncode}):\n{stderr}")
    print(stderr.strip().splitlines()[-1], flush=True)
    return {"seconds": round(seconds, 2), "launcher_peak_rss_mb": round(launcher / 1024),
            "largest_worker_peak_rss_mb": round(worker / 1024), "tree_peak_rss_mb": round(tree / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500_000)
    parser.add_argument("--max_memory", default="4GB")
    parser.add_argument("--kind", default="auto")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    root, stream = Root(os.path.join(WORK, "root")), Stream(args.count)
    for _ in range(SHARDS):  # five runs: the view is five files, five shards
        root.commit(root.new_ids(args.count // SHARDS), stream)
    alone, across = os.path.join(WORK, "alone"), os.path.join(WORK, "across")
    common = ["--index", root.store.root, "--max_memory", args.max_memory, "--kind", args.kind]
    result = {"count": len(root.view), "dim": 1664, "max_memory": args.max_memory,
              "alone": _timed_tree(["build", *common, "--output", alone]),
              "across_two_processes": _timed_tree(["build", *common, "--output", across, *TWO_PROCESSES])}
    rng = np.random.default_rng(7)
    ids = sorted(root.view)
    asked = [ids[i] for i in rng.choice(len(ids), SAMPLE, replace=False)]
    _, truth = exact_neighbours(stream, root.view, asked)
    result["recall_at_10"] = {"alone": _recall(alone, truth), "across_two_processes": _recall(across, truth)}
    for name, folder in (("alone", alone), ("across_two_processes", across)):
        index = json.loads(open(os.path.join(folder, "search.json")).read())["index"]
        result[name]["index"] = {k: index.get(k) for k in ("kind", "lists", "nprobe", "code_bytes",
                                                            "held_out_recall_at_10")}
    result["time_across_over_alone"] = round(result["across_two_processes"]["seconds"] / result["alone"]["seconds"],
                                             3)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"search_distributed-{args.count}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
