"""One night of an index at corpus scale: planning, status, snapshot and bookkeeping at 1M and 10M live ids.

    .venv/bin/python benchmarks/index_night.py [--sizes 1000000,10000000] [--dim 8] [--runner in_memory]

Builds, in the index's own layout (index.json, the commit log, runs/ and updates/ folders, the project's
embeddings schema), an index of N live ids embedded by earlier nights (10 runs of N/10), and a night's
Parquet manifest with 1% churn: a third new ids, a third changed uris, a third removed. A small --dim keeps
the files small; every code path is the one of a 1664-dim index. Each step then runs in a fresh process,
which reports its wall time and peak RSS (its own, and its worker processes' with --runner
multi_processing). Writes benchmarks/results/index_night.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

RUNS = 10
STEPS = ("plan", "status", "snapshot", "bookkeeping")


def _id(i: int) -> str:
    return f"img{i:010d}"


def _uri(i: int, version: int = 0) -> str:
    return f"gs://corpus/photos/{i % 997:03d}/{i:010d}-v{version}.jpg"


def build(folder: str, live: int, dim: int) -> None:
    """The index at FOLDER/index and the night's manifest at FOLDER/night.parquet."""
    from pipeline.index.plan import PAIRS_SCHEMA
    from pipeline.index.store import IndexStore
    from pipeline.models import MODELS
    from transforms.sink import embeddings_schema

    model = MODELS["mobilenet_v2_130_224"]
    metadata = {"model": model.name, "handle": "synthetic", "fingerprint": "sha256:synthetic",
                "image_size": str(model.input_size), "dim": str(dim), "preprocessing": "synthetic",
                "precision": "float32", "weights": "synthetic"}
    store = IndexStore(os.path.join(folder, "index"))
    store.create_identity(metadata)
    schema = embeddings_schema(dim, metadata)
    rng = np.random.default_rng(0)
    per_run = live // RUNS
    for run in range(RUNS):
        name = f"night-{run:03d}"
        os.makedirs(store.run_dir(name))
        rows = np.arange(run * per_run, (run + 1) * per_run)
        for part, chunk in enumerate(np.array_split(rows, max(1, len(rows) // 500_000))):
            vectors = rng.standard_normal((len(chunk), dim), dtype=np.float32)
            table = pa.Table.from_arrays(
                [pa.array([_id(i) for i in chunk], pa.string()), pa.array([_uri(i) for i in chunk], pa.string()),
                 pa.nulls(len(chunk), pa.string()),
                 pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)], schema=schema)
            pq.write_table(table, os.path.join(store.run_dir(name), f"embeddings-{part:05d}-of-99999.parquet"))
        store.append(2 * run + 1, {"kind": "run", "run": name, "update": name, "embedded": len(rows), "errors": 0})
        os.makedirs(store.update_dir(name))
        upto = (run + 1) * per_run
        for part, start in enumerate(range(0, upto, 1_000_000)):
            ids = range(start, min(upto, start + 1_000_000))
            pq.write_table(pa.table({"id": [_id(i) for i in ids], "uri": [_uri(i) for i in ids]}, schema=PAIRS_SCHEMA),
                           os.path.join(store.update_dir(name), f"live-{part:05d}-of-99999.parquet"))
        store.append(2 * run + 2, {"kind": "update", "update": name})
    churn = live // 300  # 1% in all: new, changed, removed
    removed = set(rng.choice(live, churn, replace=False).tolist())
    changed = set(rng.choice(live, churn, replace=False).tolist()) - removed
    writer = pq.ParquetWriter(os.path.join(folder, "night.parquet"), PAIRS_SCHEMA)
    for start in range(0, live + churn, 1_000_000):
        ids = [i for i in range(start, min(live + churn, start + 1_000_000)) if i not in removed]
        writer.write_table(pa.table({"id": [_id(i) for i in ids], "uri": [_uri(i, int(i in changed)) for i in ids]},
                                    schema=PAIRS_SCHEMA), row_group_size=100_000)
    writer.close()


def step(name: str, folder: str, runner: str) -> dict:
    """Runs one step in this process; returns what it found."""
    import apache_beam as beam

    from pipeline.index.plan import plan_update, write_chunks
    from pipeline.index.store import IndexStore
    from pipeline.index.view import WriteSnapshot, index_status
    from pipeline.options import parse_args

    store = IndexStore(os.path.join(folder, "index"))
    entries = store.log()
    beam_args = ([f"--direct_running_mode={runner}"] +
                 (["--direct_num_workers=2"] if runner == "multi_processing" else []))
    if name == "plan":
        config, _ = parse_args(["--input", os.path.join(folder, "night.parquet"), "--output", "/tmp/unused",
                                "--model", "custom", "--model_handle", folder, "--image_size", "32", "--embedding_dim", "8"])
        counts = plan_update(store, "bench", config, beam_args, entries)
        return {"to_embed": counts.to_embed, "new": counts.new, "updated": counts.updated,
                "removed": counts.removed, "unchanged": counts.unchanged}
    if name == "status":
        status = index_status(store)
        return {"live_ids": status.live_ids, "embedded": status.embedded}
    if name == "snapshot":
        from apache_beam.options.pipeline_options import PipelineOptions

        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            _ = p | WriteSnapshot(store, entries, os.path.join(folder, "snapshot"))
        return {"rows": sum(pq.ParquetFile(os.path.join(folder, "snapshot", f)).metadata.num_rows
                            for f in os.listdir(os.path.join(folder, "snapshot")) if f.endswith(".parquet"))}
    return {"chunks": len(write_chunks(store, "bench", 1_000_000))}


def measured(name: str, folder: str, runner: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--step", name, "--folder", folder, "--runner", runner]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return {"step": name, "wall_s": round(wall, 1), **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--runner", default="in_memory", choices=("in_memory", "multi_processing"))
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        result = step(args.step, args.folder, args.runner)
        with open("/proc/self/status") as f:  # VmHWM: Linux carries ru_maxrss over exec from the parent
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({**result, "peak_rss_mb": round(own), "workers_peak_rss_mb": round(workers)}))
        return
    results = []
    for live in [int(s) for s in args.sizes.split(",")]:
        folder = tempfile.mkdtemp(prefix=f"night-{live}-")
        started = time.perf_counter()
        build(folder, live, args.dim)
        print(f"{live:,} live ids built in {time.perf_counter() - started:.0f} s", flush=True)
        for name in args.steps.split(","):
            row = {"live_ids": live, "runner": args.runner, **measured(name, folder, args.runner)}
            results.append(row)
            print(json.dumps(row), flush=True)
        subprocess.run(["rm", "-rf", folder])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"index_night_{args.runner}.json"), "w") as f:
        json.dump({"dim": args.dim, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
