"""The nearest-neighbour index: cosine similarity as the inner product of L2-normalised vectors, in faiss.

Small collections get exact search (every vector compared); large ones an inverted-file index (IVF,
flat storage) whose number of lists probed is tuned at build time on the collection's own vectors until
recall@10 against exact search reaches TUNED_RECALL. faiss was chosen over ScaNN by measurement
(benchmarks/search_ann.py, README "Search"); it also adds vectors a batch at a time, returns stored
vectors by row, and answers range queries, which bound build memory and make `duplicates` exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

KINDS = ("auto", "exact", "ann")
METRIC = "cosine similarity: inner product of L2-normalised vectors"
EXACT_UP_TO = 100_000  # auto: below this, exact search answers a query in milliseconds
TUNED_RECALL = 0.97  # recall@10 the tuning aims for on sample queries; leaves room for queries from outside
TUNING_QUERIES = 400
TRAINING_PER_LIST = 40  # training vectors per inverted list (faiss warns below 39)
SEARCH_CHUNK = 4096  # queries per call: bounds the memory of range and batched searches


class SearchDependencyError(ImportError):
    pass


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchDependencyError(
            "Search needs faiss: pip install '.[search]' (or pip install faiss-cpu) in this environment."
        ) from None
    return faiss


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero); a new float32 array."""
    vectors = np.array(vectors, np.float32, copy=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def list_count(count: int) -> int:
    """Inverted lists for `count` vectors: about 4 sqrt(n), and at least 40 training vectors per list."""
    return max(1, min(int(4 * np.sqrt(count)), count // TRAINING_PER_LIST))


@dataclasses.dataclass
class VectorIndex:
    index: object  # a faiss index over normalised vectors; row i is the i-th vector added
    kind: str  # "exact" or "ann"
    params: dict

    @property
    def count(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each [queries, k], nearest first; rows are -1 where fewer than k exist."""
        queries = normalised(queries)
        k = min(k, self.count)
        found = [self.index.search(queries[i:i + SEARCH_CHUNK], k) for i in range(0, len(queries), SEARCH_CHUNK)]
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])

    def vectors(self, rows) -> np.ndarray:
        """The stored (normalised) vectors of `rows`."""
        return self.index.reconstruct_batch(np.asarray(rows, np.int64))

    def pairs_above(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, neighbour rows, similarities) of every pair with similarity >= threshold, each pair once.

        Exact on every kind: an inverted-list index probes all its lists here (its lists hold the full vectors),
        since the probe count tuned for top-k queries misses pairs that straddle two lists.
        """
        if self.kind == "ann":
            ivf = import_faiss().extract_index_ivf(self.index)
            tuned, ivf.nprobe = ivf.nprobe, ivf.nlist
            try:
                yield from self._pairs_above(threshold)
            finally:
                ivf.nprobe = tuned
            return
        yield from self._pairs_above(threshold)

    def _pairs_above(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, self.count, SEARCH_CHUNK):
            rows = np.arange(start, min(start + SEARCH_CHUNK, self.count))
            # faiss keeps inner products strictly above the radius; nextafter makes the threshold inclusive
            limits, similarities, neighbours = self.index.range_search(
                self.vectors(rows), float(np.nextafter(np.float32(threshold), np.float32(-1))))
            owners = rows[np.repeat(np.arange(len(rows)), np.diff(limits).astype(np.int64))]
            once = owners < neighbours
            yield owners[once], neighbours[once], similarities[once]

    def save(self, path: str) -> None:
        faiss = import_faiss()
        if "://" not in path:
            faiss.write_index(self.index, path)
            return
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: str, kind: str, params: dict) -> "VectorIndex":
        faiss = import_faiss()
        if "://" in path:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        else:
            index = faiss.read_index(path)
        if kind == "ann":  # the row -> vector map built at build time is saved with the index
            faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        return cls(index, kind, params)


def build(batches: Callable[[], Iterator[np.ndarray]], count: int, dim: int, kind: str = "auto",
          seed: int = 0, log: Optional[Callable[[str], None]] = None) -> VectorIndex:
    """An index over every vector `batches()` yields (called once for exact, twice for ann: sample, then add)."""
    faiss = import_faiss()
    log = log or (lambda message: None)
    if kind == "auto":
        kind = "exact" if count < EXACT_UP_TO else "ann"
    if kind == "exact" or count < 2 * TRAINING_PER_LIST:
        index = faiss.IndexFlatIP(dim)
        for vectors in batches():
            index.add(normalised(vectors))
        return VectorIndex(index, "exact", {"index": "IndexFlatIP"})

    lists = list_count(count)
    rng = np.random.default_rng(seed)
    training_rows = np.sort(rng.choice(count, size=min(count, lists * TRAINING_PER_LIST), replace=False))
    sample = _rows(batches(), training_rows, dim)
    log(f"Training {lists} inverted lists on {len(sample)} vectors ...")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(sample)
    log(f"Adding {count} vectors ...")
    for vectors in batches():
        index.add(normalised(vectors))
    index.make_direct_map()
    nprobe, recall = _tune(index, sample[rng.choice(len(sample), min(TUNING_QUERIES, len(sample)), replace=False)])
    log(f"Probing {nprobe} of {lists} lists: recall@10 {recall:.3f} against exact search on sample queries.")
    return VectorIndex(index, "ann", {"index": "IndexIVFFlat", "lists": lists, "nprobe": nprobe,
                                      "tuned_recall_at_10": round(recall, 4), "tuning_queries": TUNING_QUERIES})


def _rows(batches: Iterator[np.ndarray], wanted: np.ndarray, dim: int) -> np.ndarray:
    """The normalised vectors at the sorted row numbers `wanted`, gathered in one pass."""
    out, base, filled = np.empty((len(wanted), dim), np.float32), 0, 0
    for vectors in batches:
        upto = np.searchsorted(wanted, base + len(vectors))
        out[filled:upto] = normalised(vectors[wanted[filled:upto] - base])
        filled, base = upto, base + len(vectors)
    return out


def _tune(index, queries: np.ndarray, k: int = 10) -> tuple[int, float]:
    """The fewest lists to probe (doubling) whose recall@k against probing every list reaches TUNED_RECALL."""
    k = min(k, index.ntotal)
    index.nprobe = index.nlist
    _, exact = index.search(queries, k)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))
        if recall >= TUNED_RECALL or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, index.nlist)
