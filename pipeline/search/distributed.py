"""search build across workers: the passes over the vectors run as Beam jobs; the launcher trains and merges.

    1. the launcher plans the build (layout, budget, which rows to sample) from the files' footers;
    2. a Beam job: each worker reads its shards (one embeddings file each) and writes the sampled rows;
    3. the launcher trains the quantizer (and codebooks) on the sample and writes the empty trained index;
    4. a Beam job: each worker adds its shards' vectors with their global row numbers to a copy of the trained
       index, writes its inverted lists, its items and exact-vector segments, and its shards' share of the
       sample queries' exact neighbours; the ids' fingerprints are grouped by Beam to find repeated ids;
    5. the launcher merges the shards' lists in row order (faiss merge_from), tunes the probes on the sample
       queries, and publishes search.json as a single-process build does.

The same seed samples the same rows as a single-process build, so both train the same quantizer and fill the
same lists in the same order: the two indexes answer alike. The launcher holds the sample while training and
then the merged index (codes, for compressed) and one shard's lists; never a batch of the collection's vectors.
Every file is named for the build's generation, so a killed build's files are removed by a later publish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
from typing import Callable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipeline.interrupt import run_interruptibly, run_to_end
from pipeline.runtime import is_local_runner, runner_name, with_direct_defaults
from pipeline.search.collection import Collection
from pipeline.search.items import ItemsWriter, repeated
from pipeline.search.store import (
    MANIFEST,
    Generation,
    SearchIndexError,
    _manifest_version,
    local_copy,
    publish_manifest,
    refuse_repeated_ids,
    save_index_files,
    search_manifest,
)
from pipeline.search.vector_index import (
    TRUTH_DEPTH,
    Filling,
    Plan,
    TopK,
    _rows,
    finish,
    import_faiss,
    normalised,
    plan_build,
    start_filling,
)
from pipeline.storage import read_bytes, upload


@dataclasses.dataclass(frozen=True)
class Shard:
    """One embeddings file's kept rows, and the global row number of its first."""

    number: int
    base: int
    part: Collection

    @property
    def rows(self) -> int:
        return self.part.count

    @property
    def label(self) -> str:
        return f"shard-{self.number:05d}"


def shards_of(collection: Collection) -> list:
    shards, base = [], 0
    for number, part in enumerate(collection.parts()):
        shards.append(Shard(number, base, part))
        base += part.count
    return shards


def _name(kind: str, generation: str, label: str, extension: str) -> str:
    """A file of this build: named for its generation, so that a later publish removes it if this build dies."""
    return f"{kind}-{generation}.{label}.{extension}"


def _repeated_name(generation: str) -> str:
    return _name("truth", generation, "repeated", "npz")


def _read(root: str, name: str) -> bytes:
    return read_bytes(FileSystems.join(root, name))


@contextlib.contextmanager
def _writing(root: str, name: str) -> Iterator[str]:
    """A local path to write ROOT/NAME at: the file itself, or a scratch file uploaded once written."""
    if "://" not in root:
        yield os.path.join(root, name)
        return
    handle, local = tempfile.mkstemp(prefix="search-shard-")
    os.close(handle)
    try:
        yield local
        upload(local, FileSystems.join(root, name))
    finally:
        os.remove(local)


def _save_arrays(root: str, name: str, **arrays) -> None:
    with _writing(root, name) as path, open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_arrays(root: str, name: str) -> dict:
    with np.load(io.BytesIO(_read(root, name))) as arrays:
        return {key: arrays[key] for key in arrays.files}


class _SampleShard(beam.DoFn):
    """Writes the sampled rows of a shard (normalised), with their places in the launcher's sample."""

    def __init__(self, root: str, generation: str, dim: int):
        self.root, self.generation, self.dim = root, generation, dim

    def process(self, element):
        shard, local, places = element
        vectors = _rows((batch.vectors for batch in shard.part.batches()), local, self.dim)
        _save_arrays(self.root, _name("truth", self.generation, f"sample-{shard.number:05d}", "npz"),
                     places=places, vectors=vectors)
        yield shard.number


class _FillShard(beam.DoFn):
    """Adds a shard's vectors to a copy of the trained index; writes its lists, items, exact vectors and its
    share of the sample queries' neighbours; yields its ids' fingerprints by bucket, for the repeated-id check."""

    def __init__(self, root: str, generation: str, kind: str, described: str, dim: int, buckets: int):
        self.root, self.generation, self.kind, self.described = root, generation, kind, described
        self.dim, self.buckets = dim, buckets

    def setup(self):
        faiss = import_faiss()
        self._trained, self._queries = None, None
        if self.kind != "exact":
            self._trained = faiss.deserialize_index(np.frombuffer(
                _read(self.root, _name("vectors", self.generation, "trained", "faiss")), np.uint8))
            self._queries = _load_arrays(self.root, _name("truth", self.generation, "queries", "npz"))

    def _filling(self) -> Filling:
        faiss = import_faiss()
        if self.kind == "exact":
            return Filling(faiss.IndexFlatIP(self.dim), "exact", "IndexFlatIP", {})
        return Filling(faiss.clone_index(self._trained), self.kind, self.described, {},
                       TopK(self._queries["tuning"], TRUTH_DEPTH), TopK(self._queries["held_out"], TRUTH_DEPTH))

    def process(self, shard: Shard):
        faiss = import_faiss()
        label = shard.label
        filling = self._filling()
        compressed = self.kind == "compressed"
        with _writing(self.root, _name("items", self.generation, label, "parquet")) as items_path, \
                (_writing(self.root, _name("exact", self.generation, label, "f32")) if compressed
                 else contextlib.nullcontext()) as exact_path:
            items = ItemsWriter(items_path, first_row=shard.base)
            exact = open(exact_path, "wb") if compressed else contextlib.nullcontext()
            with exact:
                base = shard.base
                for batch in shard.part.batches():
                    unit = normalised(batch.vectors)
                    filling.add(unit, base)
                    items.add(batch.ids, batch.uris, batch.sha256)
                    if compressed:
                        unit.tofile(exact)
                    base += len(unit)
            items.close()
        with _writing(self.root, _name("vectors", self.generation, label, "faiss")) as path:
            faiss.write_index(filling.index, path)
        truth = {} if self.kind == "exact" else {**filling.truth.arrays("tuning"), **filling.check.arrays("held_out")}
        _save_arrays(self.root, _name("truth", self.generation, label, "npz"), rows=np.int64(base - shard.base),
                     with_sha256=np.int64(items.with_sha256), **truth)
        prints = items.fingerprints
        for bucket in range(self.buckets):
            yield bucket, prints[prints % np.uint64(self.buckets) == bucket]


def _repeated_in(bucket) -> np.ndarray:
    _, arrays = bucket
    return repeated(np.concatenate(list(arrays)))


def _write_repeated(found: list, root: str, name: str) -> None:
    _save_arrays(root, name, prints=np.concatenate(found) if found else np.zeros(0, np.uint64))


def build_across_workers(collection: Collection, root: str, kind: str, overwrite: bool, log: Callable[[str], None],
                         beam_args: Sequence[str], max_memory: Optional[int] = None, seed: int = 0) -> dict:
    """Builds the search index of `collection` into `root` with Beam jobs for the passes over the vectors (see
    the module's docstring); returns the manifest."""
    root = root.rstrip("/") if "://" in root else os.path.abspath(root)
    args = with_direct_defaults(beam_args)
    runner = runner_name(PipelineOptions(args))
    if not is_local_runner(PipelineOptions(args)) and "://" not in root:
        log(f"WARNING: on {runner} every worker writes --output {root} itself: that works on a cluster on this "
            f"machine or with a mount every worker shares at the same path, not otherwise.")
    current = _manifest_version(FileSystems.join(root, MANIFEST))
    if current is not None and not overwrite:
        raise SearchIndexError(f"{root} already holds a search index; pass --overwrite to replace it, or another "
                               f"--output.")
    plan = plan_build(collection.count, collection.dim, kind, seed, max_memory, collection.row_group_bytes)
    shards = shards_of(collection)
    staged: list = []
    generation = Generation(root)
    try:
        with generation:
            filling = _train(plan, shards, root, generation.name, collection.dim, args, runner, staged, log, seed)
            log(f"Adding {collection.count:,} vectors in {len(shards)} shards on {runner} ...")
            _fill(plan, shards, root, generation.name, filling.described, collection.dim, args, staged)
            manifest = _merge(plan, shards, filling, collection, root, generation, staged, log, max_memory,
                              {"built_by": {"runner": runner, "shards": len(shards)}})
            generation.upload()
        publish_manifest(root, manifest, current)
    except BaseException:
        _remove(root, [FileSystems.join(root, name) for name in staged] + _named_for(root, generation.name))
        raise
    _remove(root, [FileSystems.join(root, name) for name in staged])
    return manifest


def _run(args: Sequence[str], build: Callable[[beam.Pipeline], None]) -> None:
    """Runs the job `build` makes, to its end (Ctrl-C taken by this process alone, as pipeline.run does)."""
    options = PipelineOptions(list(args))
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    _, state = run_interruptibly(lambda: run_to_end(pipeline), local_workers=is_local_runner(options))
    if state != PipelineState.DONE:
        raise SearchIndexError(f"the Beam job ended {state} on {runner_name(options)}; nothing of this build is "
                               f"served. Run it again.")


def _train(plan: Plan, shards: list, root: str, generation: str, dim: int, args, runner: str, staged: list,
           log, seed: int) -> Filling:
    """The sampling job, then the training here; writes the trained index and the sample queries for the
    workers. Returns the empty trained index (an exact one for exact search)."""
    if not plan.trains:
        return start_filling(plan, None, dim)
    log(f"Sampling {len(plan.chosen):,} vectors from {len(shards)} shards on {runner} ...")
    starts = np.array([shard.base for shard in shards] + [plan.layout.count])
    owner = np.searchsorted(starts, plan.chosen, side="right") - 1
    work = []
    for shard in shards:
        places = np.flatnonzero(owner == shard.number)
        if len(places):
            work.append((shard, plan.chosen[places] - shard.base, places))
            staged.append(_name("truth", generation, f"sample-{shard.number:05d}", "npz"))
    _run(args, lambda p: p | "Shards" >> beam.Create(work) | beam.Reshuffle()
         | "Sample" >> beam.ParDo(_SampleShard(root, generation, dim)))
    gathered = np.empty((len(plan.chosen), dim), np.float32)
    for shard, _, _ in work:
        sample = _load_arrays(root, _name("truth", generation, f"sample-{shard.number:05d}", "npz"))
        gathered[sample["places"]] = sample["vectors"]
    filling = start_filling(plan, gathered, dim, seed, log)
    del gathered
    trained, queries = _name("vectors", generation, "trained", "faiss"), _name("truth", generation, "queries", "npz")
    staged += [trained, queries]
    with _writing(root, trained) as path:
        import_faiss().write_index(filling.index, path)
    _save_arrays(root, queries, tuning=filling.truth.queries, held_out=filling.check.queries)
    return filling


def _fill(plan: Plan, shards: list, root: str, generation: str, described: str, dim: int, args,
          staged: list) -> None:
    """The add job: every shard's lists and segments written by a worker, repeated ids found by a shuffle."""
    buckets = max(1, len(shards))
    staged += [_name(kind, generation, shard.label, extension) for shard in shards
               for kind, extension in (("vectors", "faiss"), ("truth", "npz"))]
    staged.append(_repeated_name(generation))

    def job(pipeline):
        prints = (pipeline | "Shards" >> beam.Create(shards) | beam.Reshuffle()
                  | "Fill" >> beam.ParDo(_FillShard(root, generation, plan.layout.kind, described, dim, buckets)))
        (prints | "ByBucket" >> beam.GroupByKey() | "Repeated" >> beam.Map(_repeated_in)
         | beam.combiners.ToList() | "Write" >> beam.Map(_write_repeated, root, _repeated_name(generation)))

    _run(args, job)


def _merge(plan: Plan, shards: list, filling: Filling, collection: Collection, root: str, generation: Generation,
           staged: list, log, max_memory, extra: dict) -> dict:
    """The shards' lists merged in row order into the trained index, tuned, saved into `generation`."""
    faiss = import_faiss()
    log(f"Merging {len(shards)} shards ...")
    files: dict = {"items": [], **({"exact_vectors": []} if plan.layout.kind == "compressed" else {})}
    with_sha256 = 0
    for shard in shards:
        label = shard.label
        record = _load_arrays(root, _name("truth", generation.name, label, "npz"))
        if int(record["rows"]) != shard.rows:
            raise SearchIndexError(f"shard {shard.number} ({shard.part.described}) added {int(record['rows'])} "
                                   f"vectors where its file holds {shard.rows}: the file changed during the build. "
                                   f"Build again.")
        with_sha256 += int(record["with_sha256"])
        part = faiss.deserialize_index(np.frombuffer(_read(root, _name("vectors", generation.name, label, "faiss")),
                                                     np.uint8))
        filling.index.merge_from(part, 0)
        del part
        if filling.kind != "exact":
            filling.truth.merge(record["tuning_scores"], record["tuning_rows"], record["tuning_bound"])
            filling.check.merge(record["held_out_scores"], record["held_out_rows"], record["held_out_bound"])
        files["items"].append(_name("items", generation.name, label, "parquet"))
        if "exact_vectors" in files:
            files["exact_vectors"].append(_name("exact", generation.name, label, "f32"))
    if filling.index.ntotal != collection.count:
        raise SearchIndexError(f"the shards hold {filling.index.ntotal} vectors, not the {collection.count} of "
                               f"{collection.described}: a file changed during the build. Build again.")
    prints = _load_arrays(root, _repeated_name(generation.name))["prints"]
    refuse_repeated_ids(prints, [local_copy(root, name) for name in files["items"]], collection)
    stored = [local_copy(root, name) for name in files.get("exact_vectors", [])]
    index = finish(filling, plan, stored or None, log)
    save_index_files(generation, index, files)
    return search_manifest(collection, index, files, with_sha256, max_memory, extra)


def _named_for(root: str, generation: str) -> list:
    """Every file of `generation` in `root` (what workers and the launcher wrote)."""
    return [m.path for m in FileSystems.match([FileSystems.join(root, f"*-{generation}.*")])[0].metadata_list]


def _remove(root: str, paths: list) -> None:
    paths = [path for path in sorted(set(paths)) if FileSystems.exists(path)]
    if paths:
        FileSystems.delete(paths)
