"""What a year of nightly runs costs an index: update planning, status and snapshot at 30, 120 and 365 runs.

    .venv/bin/python benchmarks/index_scale.py [--per_night 50] [--nights 30,120,365]

Builds synthetic indexes with the project's own layout and schema (dim 1664 vectors, real run folders, a
log entry per run and per nightly update, live sets that grow by `per_night` ids a night and change a few
uris), then times `plan_update` (the Beam planning pipeline, in memory), `index_status` and a snapshot
(the Beam pipeline, in memory) on each. Each cost should grow at most linearly with the number of runs.
Writes benchmarks/results/index_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.index.plan import PAIRS_SCHEMA, plan_update  # noqa: E402
from pipeline.index.store import IndexStore  # noqa: E402
from pipeline.index.view import WriteSnapshot, index_status  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.options import parse_args  # noqa: E402
from transforms.sink import embeddings_schema  # noqa: E402

MODEL = MODELS["mobilenet_v2_130_224"]
METADATA = {"model": MODEL.name, "handle": "synthetic", "fingerprint": "sha256:synthetic", "image_size": str(MODEL.input_size),
            "dim": str(MODEL.dim), "preprocessing": "synthetic", "precision": "float32", "weights": "synthetic"}


def build_index(root: str, nights: int, per_night: int) -> tuple[IndexStore, dict]:
    store = IndexStore(root)
    store.create_identity(METADATA)
    rng = np.random.default_rng(0)
    schema = embeddings_schema(MODEL.dim, METADATA)
    live: dict = {}
    seq = 0
    for night in range(nights):
        changed = [f"id{i:07d}" for i in rng.choice(len(live), size=min(5, len(live)), replace=False)] if live else []
        new = [f"id{len(live) + i:07d}" for i in range(per_night)]
        for id_ in changed + new:
            live[id_] = f"gs://bucket/images/{id_}-v{night}.jpg"
        batch = changed + new
        run = f"night-{night:04d}"
        os.makedirs(store.run_dir(run))
        vectors = rng.standard_normal((len(batch), MODEL.dim), dtype=np.float32)
        table = pa.Table.from_arrays([pa.array(batch, pa.string()), pa.array([live[i] for i in batch], pa.string()),
                                      pa.array([None] * len(batch), pa.string()),
                                      pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), MODEL.dim)],
                                     schema=schema)
        pq.write_table(table, os.path.join(store.run_dir(run), "embeddings-00000-of-00001.parquet"))
        with open(os.path.join(store.run_dir(run), "_run_report.json"), "w") as f:
            f.write("{}")
        seq += 1
        store.append(seq, {"kind": "run", "run": run, "update": run, "embedded": len(batch), "errors": 0})
        os.makedirs(store.update_dir(run))
        pq.write_table(pa.table({"id": list(live), "uri": list(live.values())}, schema=PAIRS_SCHEMA),
                       os.path.join(store.update_dir(run), "live-00000-of-00001.parquet"))
        seq += 1
        store.append(seq, {"kind": "update", "update": run})
    return store, live


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_night", type=int, default=50)
    parser.add_argument("--nights", default="30,120,365")
    args = parser.parse_args()
    results = []
    for nights in [int(n) for n in args.nights.split(",")]:
        folder = tempfile.mkdtemp(prefix=f"index-{nights}-")
        store, live = build_index(os.path.join(folder, "index"), nights, args.per_night)
        manifest = os.path.join(folder, "input.csv")
        with open(manifest, "w") as f:
            f.write("id,uri\n" + "".join(f"{i},{u}\n" for i, u in live.items()))
        config, beam_args = parse_args(["--input", manifest, "--output", os.path.join(folder, "unused"),
                                        "--model_handle", folder])
        entries = store.log()
        plan_s = timed(lambda: plan_update(store, "bench", config, ["--direct_running_mode=in_memory"], entries))
        status_s = timed(lambda: index_status(store))

        def write_snapshot():
            with beam.Pipeline() as p:
                _ = p | WriteSnapshot(store, entries, os.path.join(folder, "snapshot"))

        snapshot_s = timed(write_snapshot)
        row = {"runs": nights, "live_ids": len(live), "vectors": nights * args.per_night + 5 * (nights - 1),
               "plan_s": round(plan_s, 2), "status_s": round(status_s, 2), "snapshot_s": round(snapshot_s, 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    first, last = results[0], results[-1]
    growth = last["runs"] / first["runs"]
    for key in ("plan_s", "status_s", "snapshot_s"):
        print(f"{key}: x{last[key] / first[key]:.2f} for x{growth:.1f} runs "
              f"({1000 * last[key] / last['runs']:.0f} ms per run at {last['runs']} runs)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "index_scale.json"), "w") as f:
        json.dump({"per_night": args.per_night, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
