"""ANN libraries side by side on the same vectors: recall@10 against exact search, queries/s, build time, memory.

    .venv/bin/python benchmarks/search_ann.py [--sizes 100000 1000000] [--queries 1000]

Vectors are synthetic with the structure of image embeddings rather than uniform noise: clusters of
different sizes and spreads in a 64-dimensional subspace of the 1664 dimensions, a small isotropic
noise floor, non-negative (post-ReLU pooled features are), L2-normalised (the index searches by cosine).
Queries are new draws from the same distribution. Each candidate runs in a fresh process that reads
the vectors in chunks (not mapped), so its peak RSS is what the index holds plus one chunk (and, for a
library that needs the whole dataset in one array to build, that array). Ground truth: exact inner
product over all vectors. Writes benchmarks/results/search_ann.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipeline.models import MODELS  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DIM = MODELS["mobilenet_v2_130_224"].dim
SUBSPACE = 64
CHUNK = 50_000
K = 10


def draws(count: int, seed: int):
    """count x DIM float32 rows drawn from a fixed clustered mixture, CHUNK rows at a time."""
    mixture = np.random.default_rng(1234)  # the same mixture for every size, database and queries
    basis = np.linalg.qr(mixture.standard_normal((DIM, SUBSPACE)))[0].astype(np.float32)
    clusters = 2000
    centres = mixture.standard_normal((clusters, SUBSPACE)).astype(np.float32) * 3
    spreads = mixture.uniform(0.4, 1.6, clusters).astype(np.float32)
    weights = mixture.pareto(1.5, clusters) + 1  # uneven cluster sizes, like photo collections
    weights /= weights.sum()
    offset = np.abs(mixture.standard_normal(DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        which = rng.choice(clusters, n, p=weights)
        low = centres[which] + rng.standard_normal((n, SUBSPACE), np.float32) * spreads[which, None]
        rows = low @ basis.T + offset + rng.standard_normal((n, DIM), np.float32) * 0.05
        np.maximum(rows, 0, out=rows)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield rows.astype(np.float32)


def generate(path: str, count: int, seed: int) -> None:
    """draws() into a raw .f32 file."""
    with open(path + ".tmp", "wb") as f:
        for rows in draws(count, seed):
            rows.tofile(f)
    os.replace(path + ".tmp", path)


def chunks(path: str):
    """The rows of a .f32 file, CHUNK at a time, read into fresh memory."""
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, np.float32, CHUNK * DIM)
            if not block.size:
                return
            yield block.reshape(-1, DIM)


def ground_truth(data: str, queries: np.ndarray) -> np.ndarray:
    """Exact top-K ids per query by inner product, chunk by chunk."""
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), K), np.int64)
    base = 0
    for block in chunks(data):
        scores = queries @ block.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        merged_ids = np.concatenate([best_ids, top + base], 1)
        order = np.argsort(-merged_scores, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(merged_scores, order, 1), np.take_along_axis(merged_ids, order, 1)
        base += len(block)
    return best_ids


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t)) / K for f, t in zip(found, truth)]))


def rates(search, queries: np.ndarray, singles: int) -> tuple[float, float, np.ndarray]:
    """(batched queries/s, single queries/s, ids of the batched search)."""
    start = time.perf_counter()
    ids = search(queries)
    batched = len(queries) / (time.perf_counter() - start)
    start = time.perf_counter()
    for query in queries[:singles]:
        search(query[None])
    single = singles / (time.perf_counter() - start)
    return batched, single, ids


def candidate(name: str, data: str, count: int, queries_path: str, truth_path: str, singles: int) -> None:
    """Builds one library's index in this process and prints one JSON line per search setting."""
    queries, truth = np.load(queries_path), np.load(truth_path)
    start = time.perf_counter()
    results = []
    if name == "exact":
        import faiss

        index = faiss.IndexFlatIP(DIM)
        for block in chunks(data):
            index.add(block)
        build = time.perf_counter() - start
        settings = [({}, lambda q: index.search(q, K)[1])]
    elif name == "faiss-ivf":  # the project's own build: inverted lists, the number probed tuned for recall
        from pipeline.search.vector_index import build as build_index

        built = build_index(lambda adding: chunks(data), count, DIM, "ann")
        build = time.perf_counter() - start
        ivf, tuned = built.index, built.params["nprobe"]

        def at(nprobe):
            def search(q):
                ivf.nprobe = nprobe
                return ivf.search(q, K)[1]
            return search

        settings = [({"lists": built.params["lists"], "nprobe": p, "tuned": p == tuned}, at(p))
                    for p in sorted({tuned, 4, 8, 16, 32, 64})]
    elif name == "faiss-ivf-sq8":  # the same lists, vectors stored as 8-bit scalars (a quarter of the memory)
        import faiss

        lists = int(4 * np.sqrt(count))
        sample = np.concatenate([block for _, block in zip(range(40 * lists // CHUNK + 1), chunks(data))])
        index = faiss.index_factory(DIM, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
        index.train(sample[: 40 * lists])
        del sample
        for block in chunks(data):
            index.add(block)
        build = time.perf_counter() - start
        ivf = faiss.extract_index_ivf(index)

        def at(nprobe):
            def search(q):
                ivf.nprobe = nprobe
                return index.search(q, K)[1]
            return search

        settings = [({"lists": lists, "nprobe": p}, at(p)) for p in (8, 16, 32, 64)]
    elif name == "scann":
        # scann 1.4.2's TensorFlow op does not load beside TensorFlow 2.21 (an ABI mismatch: undefined absl
        # symbol), and its package imports that op whenever TensorFlow is installed; its pybind searcher,
        # which is what is measured here, needs no TensorFlow, so hide TensorFlow from the import.
        sys.modules["tensorflow"] = None
        import scann

        dataset = np.concatenate(list(chunks(data)))  # ScaNN builds from one array
        leaves = int(np.sqrt(count) * 2)
        searcher = (scann.scann_ops_pybind.builder(dataset, K, "dot_product")
                    .tree(num_leaves=leaves, num_leaves_to_search=leaves // 20,
                          training_sample_size=min(count, 100_000))
                    .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
        del dataset
        build = time.perf_counter() - start

        def at(leaves_to_search, reorder):
            def search(q):
                if len(q) == 1:
                    return np.asarray(searcher.search(q[0], final_num_neighbors=K,
                                                      leaves_to_search=leaves_to_search,
                                                      pre_reorder_num_neighbors=reorder)[0])[None]
                return searcher.search_batched(q, final_num_neighbors=K, leaves_to_search=leaves_to_search,
                                               pre_reorder_num_neighbors=reorder)[0]
            return search

        settings = [({"leaves": leaves, "leaves_to_search": s, "reorder": r}, at(s, r))
                    for s, r in ((leaves // 100, 100), (leaves // 50, 100), (leaves // 20, 100), (leaves // 20, 250),
                                 (leaves // 10, 250))]
    else:
        raise SystemExit(f"unknown candidate {name}")
    for params, search in settings:
        batched, single, ids = rates(search, queries, singles)
        results.append({"candidate": name, "vectors": count, "params": params, "build_s": round(build, 1),
                        "recall_at_10": round(recall(ids, truth), 4), "batched_qps": round(batched, 1),
                        "single_qps": round(single, 1), "peak_rss_mb": round(peak_rss_mb())})
        print(json.dumps(results[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--candidates", nargs="+", default=["exact", "faiss-ivf", "scann", "faiss-ivf-sq8"])
    parser.add_argument("--candidate", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    parser.add_argument("--query_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.candidate:
        return candidate(args.candidate, args.data, args.count, args.query_file, args.truth, args.singles)

    work = os.path.join(RESULTS, "work-search")
    os.makedirs(work, exist_ok=True)
    report = []
    for count in args.sizes:
        data = os.path.join(work, f"vectors-{count}.f32")
        if not os.path.exists(data):
            print(f"generating {count} vectors ...", flush=True)
            generate(data, count, seed=count)
        query_data = os.path.join(work, f"queries-{args.queries}.f32")
        if not os.path.exists(query_data):
            generate(query_data, args.queries, seed=7)
        queries = np.fromfile(query_data, np.float32).reshape(-1, DIM)
        query_file, truth_file = os.path.join(work, "queries.npy"), os.path.join(work, f"truth-{count}.npy")
        np.save(query_file, queries)
        if not os.path.exists(truth_file):
            print("exact ground truth ...", flush=True)
            np.save(truth_file, ground_truth(data, queries))
        for name in args.candidates:
            print(f"{count} vectors, {name} ...", flush=True)
            command = [sys.executable, __file__, "--candidate", name, "--data", data, "--count", str(count),
                       "--truth", truth_file, "--query_file", query_file, "--singles", str(args.singles)]
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode:
                print(output.stderr[-2000:], flush=True)
                report.append({"candidate": name, "vectors": count, "error": output.stderr[-500:]})
                continue
            for line in output.stdout.splitlines():
                if line.startswith("{"):
                    report.append(json.loads(line))
                    print("  " + line, flush=True)
        with open(os.path.join(RESULTS, "search_ann.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
