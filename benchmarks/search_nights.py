"""Nights of churn applied by `search update` against a full rebuild of the same view, in one run.

    .venv/bin/python benchmarks/search_nights.py [--count 200000] [--nights 10] [--churn 0.01] [--max_memory 4GB]

Writes an index ROOT the way pipeline.index commits nights (vectors from benchmarks/search_ann.py's clustered
mixture, dim 1664), builds a search index of it, then each night replaces `churn` of the ids (a third new, a
third changed, a third removed) and runs `search update`, each command in a fresh process that reports its wall
time and peak RSS. After the last night: a full rebuild of the same view, and recall@10 of both indexes on 500 ids
of the view against exact numpy search over it; removed ids must return nothing, changed ids their new vector.
Writes benchmarks/results/search_nights.json.
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
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from search_ann import DIM, draws  # noqa: E402

WORK = os.path.join(HERE, "results", "work-search-nights")
METADATA = {"model": "mobilenet_v2_130_224", "handle": "synthetic", "fingerprint": "sha256:synthetic",
            "image_size": "224", "dim": str(DIM), "preprocessing": "synthetic", "precision": "float32",
            "weights": "synthetic"}
SAMPLE = 500


def _timed(args: list) -> dict:
    """Runs `python -m pipeline.search ARGS` in a fresh process: wall seconds, and its peak RSS sampled every 0.1 s."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.search", *args], stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(HERE))
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith("VmRSS")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"search {' '.join(args)} failed ({process.returncode}):\n{stderr}")
    print(stderr.strip().splitlines()[-1], flush=True)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024)}


class Root:
    """An index ROOT written night by night, and the view it holds (id -> row of `vectors`)."""

    def __init__(self, path: str):
        from pipeline.index.store import IndexStore

        self.store = IndexStore(path)
        self.store.create_identity(METADATA)
        self.view: dict = {}
        self.vectors: list = []  # blocks of vectors, appended: the view points into them
        self.next_id = 0

    def commit(self, ids: list, vectors: np.ndarray) -> None:
        from pipeline.index.store import new_name
        from transforms.sink import embeddings_schema

        update, run = new_name(), new_name() + "-run"
        seq = len(self.store.log())
        if ids:
            folder = self.store.run_dir(run)
            os.makedirs(folder)
            for start in range(0, len(ids), 100_000):
                part = slice(start, start + 100_000)
                table = pa.Table.from_arrays(
                    [pa.array(ids[part]), pa.array([f"gs://b/{i}.jpg" for i in ids[part]]),
                     pa.array([None] * len(ids[part]), pa.string()),
                     pa.FixedSizeListArray.from_arrays(pa.array(vectors[part].reshape(-1)), DIM)],
                    schema=embeddings_schema(DIM, METADATA))
                pq.write_table(table, os.path.join(folder, f"embeddings-{start // 100_000:05d}.parquet"))
            seq += 1
            self.store.append(seq, {"kind": "run", "run": run, "update": update})
        first = sum(len(block) for block in self.vectors)
        self.vectors.append(vectors)
        self.view.update((id_, first + i) for i, id_ in enumerate(ids))
        folder = self.store.update_dir(update)
        os.makedirs(folder)
        live = sorted(self.view)
        pq.write_table(pa.table({"id": live, "uri": [f"gs://b/{i}.jpg" for i in live]}),
                       os.path.join(folder, "live-00000.parquet"))
        self.store.append(seq + 1, {"kind": "update", "update": update})

    def new_ids(self, count: int) -> list:
        self.next_id += count
        return [f"img{i:09d}" for i in range(self.next_id - count, self.next_id)]


def _recall(folder: str, asked: list, matrix: np.ndarray, ids: list) -> float:
    """recall@10 of queries by `asked` ids against numpy's exact search over `matrix` (unit rows of sorted `ids`)."""
    from pipeline.search.query import query_by_ids
    from pipeline.search.store import open_search_index

    hits, failures = query_by_ids(open_search_index(folder), asked, 10)
    assert not failures, failures[:3]
    found: dict = {}
    for hit in hits:
        found.setdefault(hit.query, set()).add(hit.id)
    queries = matrix[np.searchsorted(np.array(ids), asked)]
    truth = [set(ids[j] for j in np.argsort(-(matrix @ q))[:10]) for q in queries]
    return float(np.mean([len(found[a] & t) / 10 for a, t in zip(asked, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--max_memory", default="4GB")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    root = Root(os.path.join(WORK, "root"))
    rng = np.random.default_rng(3)
    stream = draws(args.count * 4, seed=5)  # blocks of unit vectors from the mixture
    pending = np.zeros((0, DIM), np.float32)

    def take(count: int) -> np.ndarray:
        nonlocal pending
        while len(pending) < count:
            pending = np.concatenate([pending, next(stream)])
        taken, pending = pending[:count], pending[count:]
        return taken

    root.commit(root.new_ids(args.count), take(args.count))
    updated, fresh = os.path.join(WORK, "updated"), os.path.join(WORK, "fresh")
    result = {"count": args.count, "dim": DIM, "churn": args.churn, "max_memory": args.max_memory}
    result["build"] = _timed(["build", "--index", root.store.root, "--output", updated, "--max_memory",
                              args.max_memory])
    nights, removed_ids, changed_ids = [], set(), set()
    for night in range(args.nights):
        third = int(args.count * args.churn / 3)
        ids = sorted(root.view)
        picked = rng.choice(len(ids), 2 * third, replace=False)
        changing, leaving = [ids[i] for i in picked[:third]], [ids[i] for i in picked[third:]]
        for id_ in leaving:
            del root.view[id_]
        removed_ids = (removed_ids | set(leaving)) - set(changing)
        changed_ids |= set(changing)
        embedded = changing + root.new_ids(third)
        root.commit(embedded, take(len(embedded)))
        nights.append(_timed(["update", "--index", root.store.root, "--output", updated, "--retrain", "never"]))
    result["nights"] = nights
    result["rebuild"] = _timed(["build", "--index", root.store.root, "--output", fresh, "--max_memory",
                                args.max_memory])
    blocks = np.concatenate(root.vectors)
    ids = sorted(root.view)
    blocks /= np.linalg.norm(blocks, axis=1, keepdims=True)
    matrix = blocks[[root.view[i] for i in ids]]
    asked = [ids[i] for i in rng.choice(len(ids), SAMPLE, replace=False)]
    result["recall_at_10"] = {"updated": _recall(updated, asked, matrix, ids),
                              "fresh": _recall(fresh, asked, matrix, ids)}
    from pipeline.search.query import query_by_ids
    from pipeline.search.store import open_search_index

    opened = open_search_index(updated)
    gone = sorted(removed_ids)[:200]
    hits, failures = query_by_ids(opened, gone, 10)
    result["removed_ids_answered"] = len(hits)
    changed = sorted(changed_ids - removed_ids)[:200]
    stored = opened.vectors.vectors(opened.rows_of(changed))
    result["changed_ids_max_error"] = float(np.abs(stored - blocks[[root.view[i] for i in changed]]).max())
    per_night = [n["seconds"] for n in nights]
    result["night_over_rebuild"] = round(float(np.mean(per_night)) / result["rebuild"]["seconds"], 4)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "search_nights.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "nights"}, indent=2))
    print("nights (s):", per_night)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
