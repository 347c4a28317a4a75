"""Search at corpus scale under a memory budget: 2M vectors of dim 1664 (13 GB of Parquet) behind a 4 GB index.

    .venv/bin/python benchmarks/search_scale.py [--count 2000000] [--max_memory 4GB]

Writes embeddings files in the pipeline's schema (vectors from benchmarks/search_ann.py's clustered mixture, plus
near-duplicates planted as noisy copies: 0.5% of rows, cosine >= 0.998 to their original), then, each in a
fresh process that reports its wall time and peak RSS:
- build: `python -m pipeline.search build --max_memory SIZE` (auto picks the kind);
- query: recall@10 against exact search for 1000 held-out queries, queries/s batched (1000 a call) and single;
- settings (with --steps): recall and queries/s of other (lists probed, re-rank depth) settings of the index;
- duplicates: `duplicates` at cosine >= 0.995 over every vector, its pair recall measured on 1000 sample rows
  against an exact scan of all vectors.
Exact answers come from a brute-force pass over the files. Writes benchmarks/results/search_scale.json.
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
from search_ann import DIM, K, draws  # noqa: E402

WORK = os.path.join(HERE, "results", "work-search-scale")
FILE_ROWS = 100_000
THRESHOLD = 0.995  # the mixture is dense (a median row has 10 others above 0.97): near-duplicates sit higher
SAMPLE = 1000
PLANTED = 0.005
METADATA = {"model": "mobilenet_v2_130_224", "handle": "synthetic", "fingerprint": "sha256:synthetic",
            "image_size": "224", "dim": str(DIM), "preprocessing": "synthetic", "precision": "float32",
            "weights": "synthetic"}


def _with_copies(rows: np.ndarray, rng) -> np.ndarray:
    """Replaces PLANTED of the rows by noisy copies of others in the block (cosine >= 0.998)."""
    n = len(rows)
    copies = rng.choice(n, int(n * PLANTED), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies))
    noise = rng.standard_normal((len(copies), DIM)).astype(np.float32) * rng.uniform(0.0003, 0.0012, (len(copies), 1))
    planted = rows[originals] + noise
    rows[copies] = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    return rows


def generate(count: int) -> None:
    """WORK/embeddings-*.parquet, queries.npy and truth.npy (exact top-K of each query)."""
    from pipeline.search.vector_index import TopK
    from transforms.sink import embeddings_schema

    os.makedirs(WORK, exist_ok=True)
    queries = np.concatenate(list(draws(1000, seed=7)))
    truth = TopK(queries, K)
    schema = embeddings_schema(DIM, METADATA)
    rng = np.random.default_rng(11)
    pending, written, base = [], 0, 0
    for rows in draws(count, seed=count):
        rows = _with_copies(rows, rng)
        truth.add(rows, base)
        base += len(rows)
        pending.append(rows)
        if sum(len(p) for p in pending) >= FILE_ROWS or base == count:
            block = np.concatenate(pending)
            ids = [f"img{written + i:09d}" for i in range(len(block))]
            table = pa.Table.from_arrays([pa.array(ids), pa.array([f"gs://corpus/{i}.jpg" for i in ids]),
                                          pa.nulls(len(block), pa.string()),
                                          pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM)],
                                         schema=schema)
            pq.write_table(table, os.path.join(WORK, f"embeddings-{written // FILE_ROWS:05d}.parquet"),
                           row_group_size=8192)  # about 54 MB, as the pipeline writes them
            written += len(block)
            pending = []
            print(f"  {written:,} rows written", flush=True)
    np.save(os.path.join(WORK, "queries.npy"), queries)
    np.save(os.path.join(WORK, "truth.npy"), truth.rows)


def batches():
    for name in sorted(os.listdir(WORK)):
        if name.startswith("embeddings-"):
            for batch in pq.ParquetFile(os.path.join(WORK, name)).iter_batches(batch_size=20_000):
                yield batch.column("embedding").flatten().to_numpy().reshape(-1, DIM)


def duplicate_truth(count: int) -> dict:
    """{sample row: set of rows at cosine >= THRESHOLD}, by an exact scan of every vector."""
    sample = np.sort(np.random.default_rng(3).choice(count, SAMPLE, replace=False))
    vectors, base = np.zeros((SAMPLE, DIM), np.float32), 0
    for block in batches():
        inside = (sample >= base) & (sample < base + len(block))
        vectors[inside] = block[sample[inside] - base]
        base += len(block)
    found, base = {int(s): set() for s in sample}, 0
    for block in batches():
        hits = np.argwhere(vectors @ block.T >= THRESHOLD)
        for position, row in hits:
            if sample[position] != base + row:
                found[int(sample[position])].add(int(base + row))
        base += len(block)
    return found


def step(name: str, index_dir: str, args) -> dict:
    if name == "build":
        from pipeline.search.__main__ import main as search

        code = search(["build", "--embeddings", os.path.join(WORK, "embeddings-*.parquet"), "--output", index_dir,
                       "--overwrite", "--max_memory", args.max_memory])
        assert code == 0
        with open(os.path.join(index_dir, "search.json")) as f:
            manifest = json.load(f)
        sizes = {key: sum(os.path.getsize(os.path.join(index_dir, file)) for file in files)
                 for key, files in manifest["files"].items()}
        return {"index": manifest["index"], "file_bytes": sizes}
    from pipeline.search.store import open_search_index

    index = open_search_index(index_dir)
    if name == "settings":  # other (lists probed, re-rank depth) settings of the same index, batched queries
        import faiss

        queries, truth = np.load(os.path.join(WORK, "queries.npy")), np.load(os.path.join(WORK, "truth.npy"))
        ivf, rows = faiss.extract_index_ivf(index.vectors.index), []
        for nprobe, depth in ((16, 100), (32, 40), (32, 200), (64, 20), (64, 40), (128, 20)):
            ivf.nprobe, index.vectors.params["rerank_depth"] = nprobe, depth
            started = time.perf_counter()
            _, found = index.vectors.search(queries, K)
            rate = len(queries) / (time.perf_counter() - started)
            recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
            rows.append({"nprobe": nprobe, "rerank_depth": depth, "recall_at_10": round(recall, 4),
                         "batched_qps": round(rate, 1)})
        return {"settings": rows}
    if name == "query":
        queries, truth = np.load(os.path.join(WORK, "queries.npy")), np.load(os.path.join(WORK, "truth.npy"))
        started = time.perf_counter()
        _, found = index.vectors.search(queries, K)
        batched = len(queries) / (time.perf_counter() - started)
        started = time.perf_counter()
        for query in queries[:200]:
            index.vectors.search(query[None], K)
        single = 200 / (time.perf_counter() - started)
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        return {"recall_at_10": round(recall, 4), "batched_qps": round(batched, 1), "single_qps": round(single, 1)}
    from pipeline.search.duplicates import duplicate_groups

    with open(os.path.join(WORK, "duplicate_truth.json")) as f:
        truth = {int(k): set(v) for k, v in json.load(f).items()}
    seen = {row: set() for row in truth}
    pairs_above = index.vectors.pairs_above

    def watched(threshold):
        for rows, neighbours, similarities in pairs_above(threshold):
            for a, b in zip(rows.tolist(), neighbours.tolist()):
                if a in seen:
                    seen[a].add(b)
                if b in seen:
                    seen[b].add(a)
            yield rows, neighbours, similarities

    index.vectors.pairs_above = watched
    started = time.perf_counter()
    groups = duplicate_groups(index, THRESHOLD)  # the CLI's own function, with its pairs watched
    elapsed = time.perf_counter() - started
    wanted = sum(len(v) for v in truth.values())
    recall = sum(len(seen[row] & truth[row]) for row in truth) / wanted if wanted else 1.0
    return {"seconds": round(elapsed, 1), "grouped_rows": groups.num_rows, "groups": len(set(groups["group"].to_pylist())),
            "sample_pairs": wanted, "pair_recall": round(recall, 4),
            "false_pairs": sum(len(seen[row] - truth[row]) for row in truth)}


def _status() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: round(int(fields[key].split()[0]) / 1024) for key in ("VmHWM", "RssAnon", "RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2_000_000)
    parser.add_argument("--max_memory", default="4GB")
    parser.add_argument("--steps", default="build,query,duplicates")
    parser.add_argument("--keep", action="store_true", help="keep the generated files for another run")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    index_dir = os.path.join(WORK, "index")
    if args.step:
        result = step(args.step, index_dir, args)
        status = _status()  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent
        print(json.dumps({**result, "peak_rss_mb": status.pop("VmHWM"), "end_mb": status}))
        return
    ready = os.path.join(WORK, "duplicate_truth.json")
    if not os.path.exists(ready):
        started = time.perf_counter()
        generate(args.count)
        print(f"generated in {time.perf_counter() - started:.0f} s", flush=True)
        with open(ready + ".tmp", "w") as f:
            json.dump({k: sorted(v) for k, v in duplicate_truth(args.count).items()}, f)
        os.replace(ready + ".tmp", ready)
    results = {"count": args.count, "dim": DIM, "max_memory": args.max_memory}
    for name in args.steps.split(","):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--step", name, "--max_memory", args.max_memory],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = {"wall_s": round(time.perf_counter() - started, 1),
                         **json.loads(done.stdout.strip().splitlines()[-1])}
        print(name, json.dumps(results[name]), flush=True)
    with open(os.path.join(HERE, "results", "search_scale.json"), "w") as f:
        json.dump(results, f, indent=2)
    if not args.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
