"""Publishing an index's view: rows/s into PostgreSQL (pgvector) and LanceDB, their ANN index builds, and a night.

    .venv/bin/python benchmarks/publish.py [--rows 1000000] [--dim 1664] [--targets postgres,lancedb]
                                           [--maintenance_work_mem 8GB]

Builds an index of --rows ids in the index's own layout (random vectors), publishes it to a private
PostgreSQL (pgserver) and a LanceDB folder, builds each one's ANN index (HNSW with pgvector's defaults;
IVF-PQ in LanceDB), then commits a night with 1% churn (a third new ids, a third changed, a third removed) and
publishes again. PostgreSQL builds HNSW with --maintenance_work_mem (set for the role; pgvector builds much
faster when the graph fits). Writes benchmarks/results/publish.json; removes its folders.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

PART_ROWS = 100_000


def _ids(numbers) -> list:
    return [f"img{i:010d}" for i in numbers]


class Index:
    """An index written directly in its layout: each night a run of the fresh vectors and the live listing."""

    def __init__(self, root: str, dim: int):
        from pipeline.index.store import IndexStore
        from pipeline.models import MODELS

        model = MODELS["mobilenet_v2_130_224"]
        self.metadata = {"model": model.name, "handle": "synthetic", "fingerprint": "sha256:synthetic",
                         "image_size": str(model.input_size), "dim": str(dim), "preprocessing": "synthetic",
                         "precision": "float32", "weights": "synthetic"}
        self.store = IndexStore(root)
        self.store.create_identity(self.metadata)
        self.dim, self.rng, self.seq, self.nights = dim, np.random.default_rng(0), 0, 0
        self.uris: dict = {}

    def _uris(self, numbers) -> list:
        return [f"gs://corpus/{i % 997:03d}/{i:010d}-v{self.nights}.jpg" for i in numbers]

    def night(self, live: np.ndarray, fresh: np.ndarray) -> None:
        from pipeline.index.plan import PAIRS_SCHEMA
        from transforms.sink import embeddings_schema

        self.nights += 1
        name, schema = f"night-{self.nights}", embeddings_schema(self.dim, self.metadata)
        os.makedirs(self.store.run_dir(name))
        for part, start in enumerate(range(0, len(fresh), PART_ROWS)):
            chunk = fresh[start:start + PART_ROWS]
            vectors = self.rng.standard_normal((len(chunk), self.dim), dtype=np.float32)
            table = pa.Table.from_arrays([pa.array(_ids(chunk)), pa.array(self._uris(chunk)), pa.nulls(len(chunk), pa.string()),
                                          pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)],
                                         schema=schema)
            pq.write_table(table, os.path.join(self.store.run_dir(name), f"embeddings-{part:05d}-of-99999.parquet"))
        self.uris.update(zip(fresh.tolist(), self._uris(fresh)))
        self.store.append(self.seq + 1, {"kind": "run", "run": name, "update": name, "embedded": len(fresh),
                                         "errors": 0})
        os.makedirs(self.store.update_dir(name))
        pq.write_table(pa.table({"id": _ids(live), "uri": [self.uris[i] for i in live.tolist()]}, schema=PAIRS_SCHEMA),
                       os.path.join(self.store.update_dir(name), "live-00000-of-00001.parquet"))
        self.store.append(self.seq + 2, {"kind": "update", "update": name})
        self.seq += 2


def _seconds(message) -> float:
    found = re.search(r"in ([0-9.]+) s", message or "")
    return float(found.group(1)) if found else 0.0


def publish_step(root: str, url: str, ann_min_rows: int) -> dict:
    """One publish in this process (a fresh one: its peak RSS is the publisher's own)."""
    from pipeline.index.store import IndexStore
    from pipeline.publish.sync import publish, target_for

    target = target_for(url, "bench", ann_min_rows)
    started = time.perf_counter()
    done = publish(IndexStore(root), target)
    total = time.perf_counter() - started
    target.close()
    ann = _seconds(done.ann_index)
    with open("/proc/self/status") as f:  # VmHWM: Linux carries ru_maxrss over exec from the parent
        peak = round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024)
    return {"written": done.upserted, "removed": done.removed, "rows_s": round((done.upserted + done.removed) /
                                                                              (total - ann)),
            "write_s": round(total - ann, 1), "ann_index": done.ann_index, "ann_index_s": ann,
            "publisher_peak_rss_mb": peak}


def timed_publish(index: Index, url: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--step", index.store.root, "--url", url]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"publish to {url} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1664)
    parser.add_argument("--targets", default="postgres,lancedb")
    parser.add_argument("--maintenance_work_mem", default="8GB")
    parser.add_argument("--folder", help="Where to build (default: a temporary folder); removed at the end.")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(publish_step(args.step, args.url, ann_min_rows=1)))
        return
    folder = tempfile.mkdtemp(prefix="publish-bench-", dir=args.folder)
    results = {"rows": args.rows, "dim": args.dim, "maintenance_work_mem": args.maintenance_work_mem, "steps": []}
    try:
        index = Index(os.path.join(folder, "index"), args.dim)
        started = time.perf_counter()
        everyone = np.arange(args.rows)
        index.night(everyone, everyone)
        print(f"index of {args.rows:,} x {args.dim} built in {time.perf_counter() - started:.0f} s", flush=True)
        urls = {}
        if "postgres" in args.targets:
            import pgserver
            import psycopg

            server = pgserver.get_server(os.path.join(folder, "postgres"), cleanup_mode="stop")
            urls["postgres"] = server.get_uri()
            with psycopg.connect(urls["postgres"], autocommit=True) as conn:
                conn.execute(f"ALTER ROLE CURRENT_USER SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        if "lancedb" in args.targets:
            urls["lancedb"] = os.path.join(folder, "lancedb")
        for kind, url in urls.items():
            row = {"target": kind, "night": 1, **timed_publish(index, url)}
            results["steps"].append(row)
            print(json.dumps(row), flush=True)
        churn = args.rows // 300
        rng = np.random.default_rng(1)
        removed = rng.choice(args.rows, churn, replace=False)
        kept = np.setdiff1d(everyone, removed)
        changed = rng.choice(kept, churn, replace=False)
        new = np.arange(args.rows, args.rows + churn)
        index.night(np.concatenate([kept, new]), np.concatenate([changed, new]))
        for kind, url in urls.items():
            row = {"target": kind, "night": 2, **timed_publish(index, url)}
            results["steps"].append(row)
            print(json.dumps(row), flush=True)
        if "postgres" in urls:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "publish.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
