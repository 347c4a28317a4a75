"""Nights of churn applied by `search update` against a full rebuild of the same view, in one run.

    .venv/bin/python benchmarks/search_nights.py [--count 200000] [--nights 10] [--churn 0.01] [--max_memory 4GB]
        [--build_only]

Writes an index ROOT the way pipeline.index commits nights (vectors from benchmarks/search_ann.py's clustered
mixture, dim 1664), builds a search index of it, then each night replaces `churn` of the ids (a third new, a
third changed, a third removed) and runs `search update`, each command in a fresh process that reports its wall
time and peak RSS. After the last night: a full rebuild of the same view, and recall@10 of both indexes on 500 ids
of the view against exact numpy search over it; removed ids must return nothing, changed ids their new vector.
Writes benchmarks/results/search_nights-COUNT.json.
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


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0


def _descendants(pid: int) -> list:
    """Every process below `pid` now (the worker processes a Beam job starts)."""
    children: dict = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def timed(args: list) -> dict:
    """Runs `python -m pipeline.search ARGS` in a fresh process: wall seconds, and sampled every 0.1 s the peak RSS
    of the process, of its largest descendant (a worker) and of the whole tree."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.search", *args], stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(HERE))
    own = worker = tree = 0
    while process.poll() is None:
        others = [_rss_kb(pid) for pid in _descendants(process.pid)]
        launcher = _rss_kb(process.pid)
        own, worker, tree = max(own, launcher), max([worker] + others), max(tree, launcher + sum(others))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"search {' '.join(args)} failed ({process.returncode}):\n{stderr}")
    print(stderr.strip().splitlines()[-1], flush=True)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(own / 1024),
            "largest_worker_peak_rss_mb": round(worker / 1024), "tree_peak_rss_mb": round(tree / 1024)}


class Stream:
    """The benchmark's vectors, drawn in order: any of them is found again by its position in the stream, so that
    neither the benchmark nor its oracle holds the collection (13 GB at 2M x 1664)."""

    SEED = 5

    def __init__(self, limit: int):
        self.limit, self.drawn = limit, 0
        self._blocks, self._pending = draws(limit, seed=self.SEED), np.zeros((0, DIM), np.float32)

    def take(self, count: int) -> tuple[np.ndarray, int]:
        """The next `count` vectors and the position of the first."""
        while len(self._pending) < count:
            self._pending = np.concatenate([self._pending, next(self._blocks)])
        taken, self._pending = self._pending[:count], self._pending[count:]
        self.drawn += count
        return taken, self.drawn - count

    def again(self):
        """(position of the first, block) over every vector drawn so far, drawn once more."""
        position = 0
        for block in draws(self.limit, seed=self.SEED):
            if position >= self.drawn:
                return
            yield position, block[:self.drawn - position]
            position += len(block)


class Root:
    """An index ROOT written night by night, and the view it holds (id -> position of its vector in the stream)."""

    def __init__(self, path: str):
        from pipeline.index.store import IndexStore

        self.store = IndexStore(path)
        self.store.create_identity(METADATA)
        self.view: dict = {}
        self.next_id = 0

    def commit(self, ids: list, stream: Stream) -> None:
        """Commits a run embedding `ids` with the stream's next vectors (written 100,000 at a time), then an
        update whose live ids are the view."""
        from pipeline.storage import timestamped_name
        from transforms.sink import embeddings_schema

        update, run = timestamped_name(), timestamped_name() + "-run"
        seq, first = len(self.store.log()), stream.drawn
        if ids:
            folder = self.store.run_dir(run)
            os.makedirs(folder)
            for start in range(0, len(ids), 100_000):
                part = slice(start, start + 100_000)
                vectors, _ = stream.take(len(ids[part]))
                table = pa.Table.from_arrays(
                    [pa.array(ids[part]), pa.array([f"gs://b/{i}.jpg" for i in ids[part]]),
                     pa.array([None] * len(ids[part]), pa.string()),
                     pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)],
                    schema=embeddings_schema(DIM, METADATA))
                pq.write_table(table, os.path.join(folder, f"embeddings-{start // 100_000:05d}.parquet"))
            seq += 1
            self.store.append(seq, {"kind": "run", "run": run, "update": update})
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


def exact_neighbours(stream: Stream, view: dict, asked: list, k: int = 10) -> tuple[dict, dict]:
    """({id: its vector} of `asked`, {id: its k nearest ids of the view}) by numpy, over the stream drawn again:
    the oracle shares no code with the search index."""
    ids = sorted(view)
    owner = np.full(stream.drawn, -1, np.int64)
    owner[[view[i] for i in ids]] = np.arange(len(ids))
    wanted = {view[a]: a for a in asked}
    vectors: dict = {}
    for position, block in stream.again():
        for offset in [p - position for p in wanted if position <= p < position + len(block)]:
            vectors[wanted[position + offset]] = block[offset].copy()  # a view would keep the whole block
    queries = np.stack([vectors[a] for a in asked])
    best = np.full((len(asked), k), -np.inf, np.float32), np.full((len(asked), k), -1, np.int64)
    for position, block in stream.again():
        rows = owner[position:position + len(block)]
        live = rows >= 0
        scores = queries @ block[live].T
        merged = np.concatenate([best[0], scores], 1)
        members = np.concatenate([best[1], np.broadcast_to(rows[live], scores.shape)], 1)
        order = np.argsort(-merged, axis=1)[:, :k]
        best = np.take_along_axis(merged, order, 1), np.take_along_axis(members, order, 1)
    return vectors, {a: {ids[j] for j in row} for a, row in zip(asked, best[1])}


def _recall(folder: str, truth: dict) -> float:
    """recall@10 of queries by the ids of `truth` against numpy's exact search."""
    from pipeline.search.query import query_by_ids
    from pipeline.search.store import open_search_index

    hits, failures = query_by_ids(open_search_index(folder), list(truth), 10)
    assert not failures, failures[:3]
    found: dict = {}
    for hit in hits:
        found.setdefault(hit.query, set()).add(hit.id)
    return float(np.mean([len(found[a] & t) / 10 for a, t in truth.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--max_memory", default="4GB")
    parser.add_argument("--build_only", action="store_true",
                        help="Build once and report its time and peak RSS (the memory budget's check), no nights.")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    root = Root(os.path.join(WORK, "root"))
    rng = np.random.default_rng(3)
    stream = Stream(args.count * 2)
    root.commit(root.new_ids(args.count), stream)
    updated, fresh = os.path.join(WORK, "updated"), os.path.join(WORK, "fresh")
    result = {"count": args.count, "dim": DIM, "churn": args.churn, "max_memory": args.max_memory}
    result["build"] = timed(["build", "--index", root.store.root, "--output", updated, "--max_memory",
                              args.max_memory])
    if args.build_only:
        manifest = json.loads(open(os.path.join(updated, "search.json")).read())
        result["index"] = {k: manifest["index"].get(k) for k in ("kind", "lists", "code_bytes", "memory_bytes")}
        with open(os.path.join(HERE, "results", f"search_build-{args.count}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
        shutil.rmtree(WORK, ignore_errors=True)
        return
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
        root.commit(embedded, stream)
        nights.append(timed(["update", "--index", root.store.root, "--output", updated, "--retrain", "never"]))
    result["nights"] = nights
    result["rebuild"] = timed(["build", "--index", root.store.root, "--output", fresh, "--max_memory",
                                args.max_memory])
    ids = sorted(root.view)
    changed = sorted(changed_ids - removed_ids)[:200]
    asked = [ids[i] for i in rng.choice(len(ids), SAMPLE, replace=False)]
    vectors, truth = exact_neighbours(stream, root.view, asked + changed)
    truth = {a: truth[a] for a in asked}
    result["recall_at_10"] = {"updated": _recall(updated, truth), "fresh": _recall(fresh, truth)}
    from pipeline.search.query import query_by_ids
    from pipeline.search.store import open_search_index

    opened = open_search_index(updated)
    hits, _ = query_by_ids(opened, sorted(removed_ids)[:200], 10)
    result["removed_ids_answered"] = len(hits)
    stored = opened.vectors.vectors(opened.rows_of(changed))
    result["changed_ids_max_error"] = float(np.abs(stored - np.stack([vectors[i] for i in changed])).max())
    per_night = [n["seconds"] for n in nights]
    result["night_over_rebuild"] = round(float(np.mean(per_night)) / result["rebuild"]["seconds"], 4)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"search_nights-{args.count}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "nights"}, indent=2))
    print("nights (s):", per_night)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
