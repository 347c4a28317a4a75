"""The nearest-neighbour index: cosine similarity as the inner product of L2-normalised vectors, in faiss.

Three kinds, chosen by `auto` from the collection's size and the memory budget (`--max_memory`):
- exact: every vector compared (small collections);
- ann: inverted lists (IVF) holding the full vectors, the number probed tuned at build time on the
  collection's own vectors until recall@10 against exact search reaches TUNED_RECALL;
- compressed: inverted lists holding product-quantized codes (4-bit sub-quantizers in faiss's SIMD "fast scan"
  layout), whose candidates are re-ranked with the exact vectors read from a
  file on disk beside the index: memory per vector falls from 4 x dim bytes to dim/2 + 8 (or less, to fit a
  budget), and re-ranking gives back the recall the codes lose. 8-bit codes were measured too: their training
  takes minutes where fast-scan's takes seconds, for less recall per byte once re-ranked. An OPQ rotation was
  measured too and left out: at dim 1664 two of its 50 training iterations took over 5 minutes on 10,000 vectors.
faiss was chosen over ScaNN by measurement (benchmarks/search_ann.py, docs/search.md); it adds vectors a batch
at a time and answers range queries, which bound build memory and make `duplicates` possible at scale.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable, Iterator, Optional

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.storage import write_bytes

KINDS = ("auto", "exact", "ann", "compressed")
METRIC = "cosine similarity: inner product of L2-normalised vectors"
EXACT_UP_TO = 100_000  # auto: below this, exact search answers a query in milliseconds
TUNED_RECALL = 0.97  # recall@10 the tuning aims for on sample queries; leaves room for queries from outside
TUNING_QUERIES = 400
TRUTH_DEPTH = 50  # exact neighbours kept per tuning query: updates remove rows from the lists, adds merge in
TRAINING_PER_LIST = 40  # training vectors per inverted list (faiss warns below 39)
SEARCH_CHUNK = 4096  # queries per call: bounds the memory of range and batched searches
RERANK_CHUNK = 32  # compressed: queries re-ranked together (32 x 400 candidates of dim 1664: 85 MB)
PAIR_BLOCK = 2048  # compressed duplicates: rows of an inverted list compared with the rest at once
NEIGHBOUR_LISTS = 4  # compressed duplicates: each list is also compared with its nearest lists (by centroid)
RERANK_DEPTHS = (10, 20, 40, 100, 200)  # compressed: candidates re-ranked per neighbour asked for, tried in tuning
DIMS_PER_CODE_BYTE = (2, 4, 8, 16, 32)  # compressed: code sizes tried in this order (dim/2 bytes a vector first)
MAX_PROBES = 256  # tuning stops doubling the lists probed here: beyond, a query scans too much of the index
PROCESS_BASE = 400 * 2**20  # Python with Beam, pyarrow, faiss and the index reader loaded (measured: 376-407 MB)
TRAINING_SCRATCH = 1.6  # k-means blocks and buffers on top of the training data (at 2M x 1664: 2.35 GB for 2 x 0.76)
READ_COPIES = 6  # a batch of rows read from Parquet and normalised peaks at about 6 copies of its floats (measured)
ROW_GROUP_COPIES = 1.8  # a row group is read whole before it is cut into batches (measured: +1.16 GB for 640 MB)
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


class SearchDependencyError(ImportError):
    pass


class MemoryBudgetError(ValueError):
    """No index kind fits the memory budget; the message gives what the smallest one needs."""


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchDependencyError(
            "Search needs faiss: pip install '.[search]' (or pip install faiss-cpu) in this environment."
        ) from None
    return faiss


def parse_size(text: str) -> int:
    """'4GB', '4G', '512MiB', '1.5g', '3000000000' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    import argparse

    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in UNITS or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 4GB, 500MB or 2.5G, got {text!r}")
    return int(float(found.group(1)) * UNITS[found.group(2).lower()])


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.2f} {unit}" if unit in ("GB", "TB") else f"{size:.1f} {unit}" if unit != "B" else \
                f"{int(size)} B"
        size /= 1024
    raise AssertionError


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero); a new float32 array."""
    vectors = np.array(vectors, np.float32, copy=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def query_count(count: int) -> int:
    """Vectors set apart from training to tune the probes, and as many again to measure the result."""
    return min(TUNING_QUERIES, count // 10)


def list_count(count: int) -> int:
    """Inverted lists for `count` vectors: about 4 sqrt(n), and at least 40 training vectors per list."""
    return max(1, min(int(4 * np.sqrt(count)), (count - 2 * query_count(count)) // TRAINING_PER_LIST))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What an index kind holds in memory for `count` vectors of `dim` (the figures `--max_memory` checks)."""

    kind: str
    count: int
    dim: int
    code_bytes: int = 0  # compressed: bytes per vector (two 4-bit product-quantizer codes a byte)
    fewer_lists: int = 1  # compressed under a tight budget: list_count / this (a smaller training sample)
    row_group_bytes: int = 0  # the largest row group of the files read (uncompressed)

    @property
    def lists(self) -> int:
        return max(1, list_count(self.count) // self.fewer_lists)

    @property
    def memory(self) -> int:
        """Bytes of the loaded index (faiss structures; ids and uris stay on disk)."""
        if self.kind == "exact":
            return self.count * self.dim * 4
        centroids = self.lists * self.dim * 4
        if self.kind == "ann":  # full vectors, list ids, the row -> list map for reconstruction
            return self.count * (self.dim * 4 + 16) + centroids
        return self.count * (self.code_bytes + 8) + centroids + self.dim * 16 * 4

    @property
    def build_memory(self) -> int:
        """Bytes a build process holds at its peak: the process, a batch being read, and the larger of training
        (the sample, and for compressed codes faiss's residuals of it, plus k-means scratch) and the filled index."""
        queries = 2 * query_count(self.count)
        sample = 0 if self.kind == "exact" else \
            (min(self.count - queries, self.lists * TRAINING_PER_LIST) + queries) * self.dim * 4
        training = sample * (2 if self.kind == "compressed" else 1) * TRAINING_SCRATCH
        return PROCESS_BASE + self.reading + int(max(training, self.memory + (sample if self.kind == "ann" else 0)))

    @property
    def reading(self) -> int:
        """Bytes the reader holds: a batch and its copies, and the whole row group it is cut from."""
        return int(min(self.count, 8192) * self.dim * 4 * READ_COPIES + ROW_GROUP_COPIES * self.row_group_bytes)

    def describe(self) -> str:
        if self.kind == "compressed":
            return f"compressed ({self.factory}, {self.code_bytes} bytes a vector)"
        return self.kind

    @property
    def factory(self) -> str:
        """The faiss index_factory description of a compressed layout."""
        return f"IVF{self.lists},PQ{2 * self.code_bytes}x4fs"


def choose_layout(kind: str, count: int, dim: int, max_memory: Optional[int], row_group_bytes: int = 0) -> Layout:
    """The layout `kind` (or auto) gives; with a budget, the best one whose build and index fit it."""
    def compressed():
        sizes = [dim // per for per in DIMS_PER_CODE_BYTE if dim % per == 0] or [dim // 2]
        layouts = [Layout("compressed", count, dim, m, fewer, row_group_bytes) for m in sizes
                   for fewer in (1, 2, 4, 8, 16)]
        if max_memory is None:
            return layouts[0]
        fitting = [layout for layout in layouts if layout.build_memory <= max_memory]
        # None fits: the refusal names the smallest layout (ties in build memory, set by training, go to smaller codes)
        return fitting[0] if fitting else min(layouts, key=lambda layout: (layout.build_memory, layout.memory))

    if kind == "auto":
        small = count < EXACT_UP_TO
        candidates = ([Layout("exact", count, dim, row_group_bytes=row_group_bytes)] if small else []) + \
            [Layout("ann", count, dim, row_group_bytes=row_group_bytes)]
        if max_memory is None:
            layout = candidates[0]
        else:
            layout = next((c for c in candidates if c.build_memory <= max_memory), None) or compressed()
    elif kind == "compressed":
        layout = compressed()
    else:
        layout = Layout(kind, count, dim, row_group_bytes=row_group_bytes)
    if max_memory is not None and layout.build_memory > max_memory:
        instead = ("the smallest codes were tried" if layout.kind == "compressed" else
                   "or use --kind compressed (or auto), which needs the least")
        if layout.reading > layout.build_memory / 3:
            instead += (f"; {human(layout.reading)} of it is reading: the files' row groups of up to "
                        f"{human(row_group_bytes)} are read whole. A snapshot (python -m pipeline.index snapshot) "
                        f"or the pipeline's own outputs have small ones")
        raise MemoryBudgetError(
            f"A {layout.describe()} index of {count:,} vectors of dim {dim} needs about {human(layout.build_memory)} "
            f"to build and {human(layout.memory)} to query, more than --max_memory {human(max_memory)}. Raise "
            f"--max_memory ({instead}).")
    return layout


class StoredVectors:
    """The normalised vectors of a compressed index, row after row as float32, in local segment files (the build's,
    then one per update) read on demand.

    Rows are read with pread, not a memory map: the pages stay in the page cache, which the kernel can reclaim,
    instead of counting in the process's resident memory.
    """

    def __init__(self, paths, count: int, dim: int):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.paths, self.count, self.dim = paths, count, dim
        self._row_bytes = dim * 4
        sizes = [os.path.getsize(path) for path in paths]
        if sum(sizes) != count * self._row_bytes or any(size % self._row_bytes for size in sizes):
            raise ValueError(f"{', '.join(paths)} hold {sum(sizes)} bytes, not the {count * self._row_bytes} of "
                             f"{count} vectors of dim {dim}.")
        self._starts = np.cumsum([0] + [size // self._row_bytes for size in sizes])
        self._fds = [os.open(path, os.O_RDONLY) for path in paths]

    def __del__(self, close=os.close):  # os itself may be gone at interpreter exit
        for fd in getattr(self, "_fds", ()):
            close(fd)

    def rows(self, rows) -> np.ndarray:
        """The vectors of `rows` (any order, repeats allowed), read in file order."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        unique, where = np.unique(rows, return_inverse=True)
        out = np.empty((len(unique), self.dim), np.float32)
        buffer, size = memoryview(out).cast("B"), self._row_bytes
        segments = np.searchsorted(self._starts, unique, side="right") - 1
        offsets = (unique - self._starts[segments]) * size
        for position, (segment, offset) in enumerate(zip(segments.tolist(), offsets.tolist())):
            os.preadv(self._fds[segment], [buffer[position * size:(position + 1) * size]], offset)
        return out[where.reshape(-1)]


@dataclasses.dataclass
class VectorIndex:
    index: object  # a faiss index over normalised vectors; row i is the i-th vector added
    kind: str  # "exact", "ann" or "compressed"
    params: dict
    stored: Optional[StoredVectors] = None  # compressed: the exact vectors, for re-ranking and duplicates
    removed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # tombstoned rows
    truth: Optional[dict] = None  # ann and compressed: the "tuning" and "held_out" TopK of the collection's vectors

    def __post_init__(self):
        self.remove(self.removed)

    def remove(self, rows) -> None:
        """Tombstones `rows`: no search returns them from now on (their vectors stay until a compaction)."""
        self.removed = np.union1d(self.removed, np.asarray(rows, np.int64))
        self._selection = None

    def _selector(self):
        """A faiss selector of the rows not removed (None when none is), made again once rows were added."""
        if not len(self.removed):
            return None
        if self._selection is None or self._selection[0] != self.rows:
            faiss = import_faiss()
            live = np.ones(self.rows, bool)
            live[self.removed] = False
            bitmap = np.packbits(live, bitorder="little")  # kept alive with the selector, which points into it
            self._selection = (self.rows, bitmap, faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(bitmap)))
        return self._selection[2]

    @property
    def rows(self) -> int:
        """Rows added, removed ones included."""
        return self.index.ntotal

    @property
    def count(self) -> int:
        """Rows a search can return."""
        return self.index.ntotal - len(self.removed)

    def live(self, rows: np.ndarray) -> np.ndarray:
        """The mask of `rows` not removed."""
        return ~np.isin(rows, self.removed) if len(self.removed) else np.ones(len(rows), bool)

    def _params(self, nprobe: Optional[int] = None):
        """faiss search parameters that skip removed rows (None when nothing is removed and nprobe is as tuned)."""
        selector = self._selector()
        if selector is None and nprobe is None:
            return None
        faiss = import_faiss()
        if self.kind == "exact":
            return faiss.SearchParameters(sel=selector)
        probes = nprobe or faiss.extract_index_ivf(self.index).nprobe
        return faiss.SearchParametersIVF(sel=selector, nprobe=probes) if selector is not None else \
            faiss.SearchParametersIVF(nprobe=probes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each [queries, k], nearest first; rows are -1 where fewer than k exist."""
        queries = normalised(queries)
        k = min(k, self.count)
        found = [self._search(queries[i:i + SEARCH_CHUNK], k) for i in range(0, len(queries), SEARCH_CHUNK)]
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.stored is None:
            return self.index.search(queries, k, params=self._params())
        _, candidates = self.index.search(queries, min(self.count, k * self.params.get("rerank_depth", 1)),
                                          params=self._params())
        return _rerank(queries, candidates, self.stored, k)

    def vectors(self, rows) -> np.ndarray:
        """The stored (normalised) vectors of `rows`: exact on every kind."""
        if self.stored is not None:
            return self.stored.rows(rows)
        return self.index.reconstruct_batch(np.asarray(rows, np.int64))

    def pairs_above(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, neighbour rows, similarities) of every pair with similarity >= threshold, each pair once.

        exact and ann: exact (an inverted-list index probes all its lists here, since the probe count tuned for
        top-k queries misses pairs that straddle two lists). compressed: every pair within each inverted list and
        between it and its nearest lists, compared with the exact vectors read a list at a time; a pair whose
        vectors fell into lists farther apart is missed (recall measured by benchmarks/search_scale.py).
        """
        if self.kind == "compressed":
            yield from self._pairs_within_lists(threshold)
            return
        yield from self._pairs_above(threshold)

    def _pairs_above(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        everywhere = self._params(nprobe=import_faiss().extract_index_ivf(self.index).nlist) \
            if self.kind == "ann" else self._params()
        for start in range(0, self.rows, SEARCH_CHUNK):
            rows = np.arange(start, min(start + SEARCH_CHUNK, self.rows))
            rows = rows[self.live(rows)]
            if not len(rows):
                continue
            # faiss keeps inner products strictly above the radius; nextafter makes the threshold inclusive
            limits, similarities, neighbours = self.index.range_search(
                self.vectors(rows), float(np.nextafter(np.float32(threshold), np.float32(-1))), params=everywhere)
            owners = rows[np.repeat(np.arange(len(rows)), np.diff(limits).astype(np.int64))]
            once = owners < neighbours
            yield owners[once], neighbours[once], similarities[once]

    def _pairs_within_lists(self, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Pairs within each inverted list and between it and its NEIGHBOUR_LISTS nearest lists, compared exactly."""
        faiss = import_faiss()
        ivf = faiss.extract_index_ivf(self.index)
        lists = ivf.invlists
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        near = min(NEIGHBOUR_LISTS, ivf.nlist - 1)
        compared = set()

        def members(number):
            size = lists.list_size(number)
            rows = np.sort(faiss.rev_swig_ptr(lists.get_ids(number), size).astype(np.int64)) if size else \
                np.zeros(0, np.int64)
            return rows[self.live(rows)]

        for number in range(ivf.nlist):
            own = members(number)
            if not len(own):
                continue
            closeness = centroids[number] @ centroids.T
            closeness[number] = -np.inf
            partners = [int(n) for n in np.argsort(-closeness)[:near]] if near > 0 else []
            others = [n for n in partners if (min(n, number), max(n, number)) not in compared]
            compared.update((min(n, number), max(n, number)) for n in others)
            rows = np.concatenate([own] + [members(n) for n in others])
            vectors = self.stored.rows(rows)
            for start in range(0, len(own), PAIR_BLOCK):  # own rows against own and partner rows
                similarities = vectors[start:start + PAIR_BLOCK] @ vectors[start:].T
                a, b = np.nonzero(similarities >= np.float32(threshold))
                left, right = rows[a + start], rows[b + start]
                once = (left != right) & ((b + start < len(own)) & (a < b) | (b + start >= len(own)))
                yield (np.minimum(left, right)[once], np.maximum(left, right)[once],
                       similarities[a[once], b[once]])

    def save(self, path: str) -> None:
        faiss = import_faiss()
        if "://" not in path:
            faiss.write_index(self.index, path)
            return
        write_bytes(path, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: str, kind: str, params: dict, stored: Optional[list] = None,
             removed: Optional[np.ndarray] = None) -> "VectorIndex":
        """The index at `path`; a compressed one needs `stored`, the local paths of its exact vectors' segments."""
        faiss = import_faiss()
        if "://" in path:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        else:
            index = faiss.read_index(path)
        if kind in ("ann", "compressed"):  # an ann index's row -> vector map is saved with it
            faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        vectors = StoredVectors(stored, index.ntotal, index.d) if kind == "compressed" else None
        return cls(index, kind, params, vectors, np.zeros(0, np.int64) if removed is None else removed)


def _rerank(queries: np.ndarray, candidates: np.ndarray, stored: StoredVectors, k: int):
    """The k best of each query's candidate rows by exact inner product with the stored vectors."""
    if len(queries) > RERANK_CHUNK:
        found = [_rerank(queries[i:i + RERANK_CHUNK], candidates[i:i + RERANK_CHUNK], stored, k)
                 for i in range(0, len(queries), RERANK_CHUNK)]
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    valid = candidates >= 0
    vectors = stored.rows(np.where(valid, candidates, 0).reshape(-1)).reshape(*candidates.shape, -1)
    scores = np.einsum("qd,qcd->qc", queries, vectors)
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    similarities = np.take_along_axis(scores, order, 1).astype(np.float32)
    rows = np.take_along_axis(candidates, order, 1)
    rows[~np.isfinite(similarities)] = -1
    return similarities, rows


@dataclasses.dataclass
class Plan:
    """What a build of `count` vectors makes, and the rows it samples (`chosen`): training rows, then the tuning
    queries, then the held-out queries."""

    layout: Layout
    lists: int = 0
    chosen: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    training: int = 0
    queries: int = 0
    rng: Optional[np.random.Generator] = None

    @property
    def trains(self) -> bool:
        return self.layout.kind != "exact"


def plan_build(count: int, dim: int, kind: str = "auto", seed: int = 0, max_memory: Optional[int] = None,
               row_group_bytes: int = 0, trained: Optional["VectorIndex"] = None) -> Plan:
    """The layout (checked against the budget) and the sample of a build; with `trained` (a compaction), the
    kind and lists of that index, and a sample of queries only."""
    if trained is not None:
        layout = Layout(trained.kind, count, dim, trained.params.get("code_bytes", 0))
    else:
        layout = choose_layout(kind, count, dim, max_memory, row_group_bytes)
    if layout.kind == "exact" or count < 2 * TRAINING_PER_LIST:
        return Plan(Layout("exact", count, dim))
    lists = layout.lists if trained is None else import_faiss().extract_index_ivf(trained.index).nlist
    rng = np.random.default_rng(seed)
    queries = query_count(count)
    training = 0 if trained is not None else min(count - 2 * queries, lists * TRAINING_PER_LIST)
    # Queries that tune the probes and queries that measure the result: neither trained on, nor each other.
    chosen = rng.choice(count, size=training + 2 * queries, replace=False)
    return Plan(layout, lists, chosen, training, queries, rng)


@dataclasses.dataclass
class Filling:
    """An index being filled: the (trained) faiss index, and the sample queries' exact neighbours gathered as
    vectors are added. A distributed build fills one per shard from the same trained index and merges them."""

    index: object
    kind: str
    described: str
    training: dict  # what the quantizer was trained on
    truth: Optional["TopK"] = None
    check: Optional["TopK"] = None

    def add(self, unit: np.ndarray, base: int) -> None:
        """Adds normalised vectors as rows base, base + 1, ..."""
        if self.kind == "exact":
            self.index.add(unit)
        else:
            self.index.add_with_ids(unit, np.arange(base, base + len(unit), dtype=np.int64))
            self.truth.add(unit, base)
            self.check.add(unit, base)


def start_filling(plan: Plan, gathered: Optional[np.ndarray], dim: int, seed: int = 0,
                  log: Optional[Callable[[str], None]] = None, trained: Optional["VectorIndex"] = None) -> Filling:
    """An empty index of the plan: exact, or trained on the sample `gathered` (the plan's chosen rows, normalised;
    the sample is a view into it, never copied), or `trained`'s quantizer and codebooks kept (its vectors go)."""
    faiss = import_faiss()
    log = log or (lambda message: None)
    if not plan.trains:
        return Filling(faiss.IndexFlatIP(dim), "exact", "IndexFlatIP", {})
    sample = gathered[:plan.training]
    tuning = gathered[plan.training:plan.training + plan.queries].copy()
    held_out = gathered[plan.training + plan.queries:].copy()
    if trained is not None:
        index, described = trained.index, trained.params["index"]
        index.reset()  # the vectors go; the coarse quantizer and the codebooks stay
        if plan.layout.kind == "ann":  # made again once filled: rows are added with their ids
            index.set_direct_map_type(faiss.DirectMap.NoMap)
        facts = trained.params["training"]
        log(f"Compacting: adding {plan.layout.count} vectors to the inverted lists trained before ...")
    else:
        if not plan.queries:  # every vector trains (a small collection): tuned on training vectors, nothing held out
            tuning = sample[np.sort(plan.rng.choice(plan.training, min(TUNING_QUERIES, plan.training),
                                                    replace=False))]
        log(f"Training {plan.layout.describe()} on {len(sample)} vectors ...")
        if plan.layout.kind == "ann":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.lists, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            described = "IndexIVFFlat"
        else:
            described = plan.layout.factory
            index = faiss.index_factory(dim, described, faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(index).cp.seed = seed
        index.train(sample)
        facts = {"vectors": len(sample), "collection": plan.layout.count, "added_since": 0}
    return Filling(index, plan.layout.kind, described, facts, TopK(tuning, TRUTH_DEPTH), TopK(held_out, TRUTH_DEPTH))


def finish(filling: Filling, plan: Plan, stored: Optional[list], log: Optional[Callable[[str], None]] = None,
           compacting: bool = False) -> VectorIndex:
    """The filled index, tuned on its sample queries; `stored` are the exact vectors' segment files (compressed)."""
    log = log or (lambda message: None)
    count, dim = plan.layout.count, plan.layout.dim
    if filling.kind == "exact":
        return VectorIndex(filling.index, "exact", {"index": "IndexFlatIP",
                                                    "memory_bytes": Layout("exact", count, dim).memory})
    index = filling.index
    params = {"index": filling.described, "lists": plan.lists, "tuning_queries": len(filling.truth.queries),
              "training": filling.training}
    if filling.kind == "ann":
        index.make_direct_map()
        built = VectorIndex(index, "ann", params)
    else:
        params.update(code_bytes=plan.layout.code_bytes)
        built = VectorIndex(index, "compressed", params, StoredVectors(stored, count, dim))
    built.truth = {"tuning": filling.truth, "held_out": filling.check}
    retune(built, log)
    if not compacting and "held_out_recall_at_10" in params:
        filling.training["held_out_recall_at_10"] = params["held_out_recall_at_10"]
    params["memory_bytes"] = plan.layout.memory
    return built


def build(batches: Callable[[bool], Iterator[np.ndarray]], count: int, dim: int, kind: str = "auto",
          seed: int = 0, log: Optional[Callable[[str], None]] = None, max_memory: Optional[int] = None,
          stored_path: Optional[str] = None, trained: Optional["VectorIndex"] = None,
          row_group_bytes: int = 0) -> VectorIndex:
    """An index over every vector `batches(adding)` yields: called with adding=True once, after a sampling pass
    (adding=False) for the kinds that train.

    A compressed index writes the normalised vectors to `stored_path` (a local file) while adding them. With
    `trained` (an index of the kind whose quantizer and codebooks to keep: a compaction), nothing is trained and
    the sampling pass gathers only the queries that tune and measure it.
    """
    log = log or (lambda message: None)
    plan = plan_build(count, dim, kind, seed, max_memory, row_group_bytes, trained)
    # Gathered in one pass straight into place: the sample is a view, never copied (a copy doubled its memory).
    gathered = _rows(batches(False), plan.chosen, dim) if plan.trains else None
    filling = start_filling(plan, gathered, dim, seed, log, trained)
    del gathered
    if plan.trains and trained is None:
        log(f"Adding {count} vectors ...")
    writer = open(stored_path, "wb") if plan.layout.kind == "compressed" else None
    try:
        base = 0
        for vectors in batches(True):
            unit = normalised(vectors)
            filling.add(unit, base)
            base += len(unit)
            if writer:
                unit.tofile(writer)
    finally:
        if writer:
            writer.close()
    return finish(filling, plan, [stored_path] if writer else None, log, compacting=trained is not None)


def retune(index: "VectorIndex", log: Callable[[str], None], keep_if_reached: bool = False) -> None:
    """Tunes the probes (and re-rank depth) on the index's tuning queries and records the held-out recall.

    `keep_if_reached` (an update): the setting in use is kept while it still reaches TUNED_RECALL, one measurement
    instead of a search over settings, each of which reads candidates' exact vectors from disk."""
    truth, check, params = index.truth["tuning"], index.truth["held_out"], index.params
    recall = recall_at_k(index, truth) if keep_if_reached else 0.0
    if recall >= TUNED_RECALL:
        nprobe, depth = params["nprobe"], params.get("rerank_depth", 1)
    else:
        nprobe, depth, recall = _tune(index, truth)
    params.update(nprobe=nprobe, tuned_recall_at_10=round(recall, 4), tuning_queries=int(truth.usable(10).sum()))
    if index.kind == "compressed":
        params["rerank_depth"] = depth
    measured = ""
    if check.usable(10).any():
        held_recall = recall_at_k(index, check)
        params.update(held_out_recall_at_10=round(held_recall, 4), held_out_queries=int(check.usable(10).sum()))
        measured = f", {held_recall:.3f} on {params['held_out_queries']} held-out vectors"
    log(f"Probing {nprobe} of {params['lists']} lists: recall@10 {recall:.3f} against exact search on the tuning "
        f"queries{measured} (neither set trained on).")


def recall_at_k(index: "VectorIndex", truth: "TopK", k: int = 10) -> float:
    """Mean share of each query's exact k nearest rows that the index returns (the query's own row counted), over
    the queries whose k nearest are known."""
    k = min(k, index.count)
    usable = truth.usable(k)
    _, found = index.search(truth.queries[usable], k)
    return float(np.mean([len(set(f) & set(e[:k])) / k for f, e in zip(found, truth.rows[usable])]))


class TopK:
    """The exact nearest rows of a few queries, kept up to date as vectors are added and rows removed.

    `bound` is, per query, the highest score of any row that left the list by being outscored: a listed row
    scoring above it is certainly among the query's nearest, so after removals the list is still exact down to
    there, and rows added later merge in. A query whose list is exact for fewer than k rows no longer counts.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.rows = np.full((len(queries), k), -1, np.int64)
        self.bound = np.full(len(queries), -np.inf, np.float32)

    def add(self, vectors: np.ndarray, base: int) -> None:
        scores = self.queries @ vectors.T
        self._keep(scores, np.broadcast_to(np.arange(base, base + len(vectors)), scores.shape))

    def merge(self, scores: np.ndarray, rows: np.ndarray, bound: np.ndarray) -> None:
        """Merges in the lists of the same queries over other rows (a shard's, in a distributed build)."""
        self.bound = np.maximum(self.bound, bound)
        self._keep(scores, rows)

    def _keep(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Keeps the k best of the lists and the candidates `scores` at `rows`; the best dropped raise the bound."""
        merged = np.concatenate([self.scores, scores], 1)
        rows = np.concatenate([self.rows, rows], 1)
        order = np.argsort(-merged, axis=1, kind="stable")
        if order.shape[1] > self.k:
            self.bound = np.maximum(self.bound, np.take_along_axis(merged, order[:, self.k:], 1).max(axis=1))
        order = order[:, :self.k]
        self.scores, self.rows = np.take_along_axis(merged, order, 1), np.take_along_axis(rows, order, 1)

    def remove(self, rows: np.ndarray) -> None:
        gone = np.isin(self.rows, rows)
        self.scores[gone], self.rows[gone] = -np.inf, -1
        order = np.argsort(-self.scores, axis=1, kind="stable")
        self.scores, self.rows = np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.rows, order, 1)

    def usable(self, k: int) -> np.ndarray:
        """The mask of queries whose k nearest rows are known exactly."""
        return ((self.scores > self.bound[:, None]) & (self.rows >= 0)).sum(axis=1) >= k

    def arrays(self, name: str) -> dict:
        """Its arrays, named for np.savez beside other sets'."""
        return {f"{name}_{field}": getattr(self, field) for field in ("queries", "scores", "rows", "bound")}

    @classmethod
    def from_arrays(cls, arrays, name: str) -> "TopK":
        found = cls.__new__(cls)
        for field in ("queries", "scores", "rows", "bound"):
            setattr(found, field, arrays[f"{name}_{field}"])
        found.k = found.rows.shape[1]
        return found


def _rows(batches: Iterator[np.ndarray], chosen: np.ndarray, dim: int) -> np.ndarray:
    """The normalised vectors at the distinct row numbers `chosen`, in that order, gathered in one pass."""
    order = np.argsort(chosen, kind="stable")
    wanted = chosen[order]
    out, base, filled = np.empty((len(chosen), dim), np.float32), 0, 0
    for vectors in batches:
        upto = np.searchsorted(wanted, base + len(vectors))
        out[order[filled:upto]] = normalised(vectors[wanted[filled:upto] - base])
        filled, base = upto, base + len(vectors)
    return out


def _tune(index: VectorIndex, truth: TopK) -> tuple[int, int, float]:
    """(lists probed, re-rank depth, recall@10): the quickest setting whose recall@10 against exact search on the
    sample queries reaches TUNED_RECALL, timed on them; if none does, the most accurate one tried.

    Lists probed double up to all lists (MAX_PROBES for a compressed index); a compressed index also tries each
    re-rank depth, shallowest first, and stops deepening at the first that reaches the target, since deeper only
    costs more reads.
    """
    ivf = import_faiss().extract_index_ivf(index.index)
    compressed = index.kind == "compressed"
    depths = RERANK_DEPTHS if compressed else (1,)
    limit = min(ivf.nlist, MAX_PROBES) if compressed else ivf.nlist
    tried = []  # (reached, seconds or -recall, nprobe, depth, recall)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        for depth in depths:
            if compressed:
                index.params["rerank_depth"] = depth
            started = time.perf_counter()
            recall = recall_at_k(index, truth)
            seconds = time.perf_counter() - started
            reached = recall >= TUNED_RECALL
            tried.append((not reached, seconds if reached else -recall, nprobe, depth, recall))
            if reached:
                break
        if nprobe >= limit or (tried[-1][0] is False and depth == depths[0]):
            break  # more lists cannot be quicker once the shallowest depth reaches the target
        nprobe = min(2 * nprobe, limit)
    _, _, nprobe, depth, recall = min(tried)
    ivf.nprobe = nprobe
    if compressed:
        index.params["rerank_depth"] = depth
    return nprobe, depth, recall
