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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from search_nights import SAMPLE, Root, Stream, _recall, exact_neighbours, timed  # noqa: E402

WORK = os.path.join(HERE, "results", "work-search-distributed")
TWO_PROCESSES = ["--runner", "DirectRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
SHARDS = 5


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
              "alone": timed(["build", *common, "--output", alone]),
              "across_two_processes": timed(["build", *common, "--output", across, *TWO_PROCESSES])}
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
