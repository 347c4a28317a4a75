"""A search index folder: the vectors' index, the table of what each row is, and a manifest written last.

    INDEX_DIR/vectors-GEN.faiss       the faiss index (row i = row i of the items)
    INDEX_DIR/items-GEN.parquet       row, id, uri, sha256: the build's rows, then one file per update's rows
    INDEX_DIR/exact-GEN.f32           compressed: the normalised vectors, a segment per build and update
    INDEX_DIR/removed-GEN.npy         rows removed by updates (ids that left the view or changed), never returned
    INDEX_DIR/truth-GEN.npz           ann, compressed: sample queries and their exact nearest rows (tuning, drift)
    INDEX_DIR/search.json             model and preprocessing (as the embeddings recorded them), metric, index
                                      kind and parameters, source (and the index log it reflects), counts, and
                                      which files are the index; its presence marks a finished build

A build or an update (search update) writes its files under a new GEN name (segments of earlier generations are
shared, never rewritten), then replaces search.json in one conditional write against the version it started
from, then deletes what no longer belongs: a reader sees the old set or the new set, never a mix, and of two
writers at once one is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline.search.collection import Collection, CollectionError
from pipeline.search.items import Items, ItemsWriter
from pipeline.search.vector_index import METRIC, TopK, VectorIndex, build, choose_layout, import_faiss
from pipeline.storage import (
    Conflict,
    UnsupportedStore,
    download,
    objects_for,
    read_bytes,
    timestamped_name,
    upload,
    write_bytes,
)
from transforms.crashpoints import reach

MANIFEST, VECTORS, ITEMS = "search.json", "vectors.faiss", "items.parquet"
FORMAT = 2
READS = (1, 2)  # format 1: one items file, fixed or named; no updates recorded
GENERATION = re.compile(r"^(vectors|items|exact|removed|truth)-(\d{8}T\d{6}Z)-[0-9a-f]{6}\.")
ORPHAN_AGE = 600  # seconds: files of a generation that started this long before the manifest's can never publish
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "beam-image-embeddings", "search")


class SearchIndexError(ValueError):
    """The search index folder is missing, unfinished, or cannot answer this request."""


@dataclasses.dataclass
class SearchIndex:
    root: str
    manifest: dict
    items: Items
    vectors: VectorIndex
    version: Optional[object] = None  # of search.json as read: an update replaces exactly this one

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def rows_of(self, ids: list) -> list:
        """The row of each id, or None for ids not in the index."""
        return self.items.rows_of(ids)


def write_parquet(table: pa.Table, path: str) -> None:
    """`table` as one Parquet file at `path`, local or on any Beam filesystem."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue().to_pybytes())


class Generation:
    """The new files of one build or update: written in a local folder (the index itself, or a scratch folder
    uploaded from for a remote one), then made the index by `publish`."""

    def __init__(self, root: str):
        self.root, self.name = root.rstrip("/"), timestamped_name()
        self.remote = "://" in self.root
        if not FileSystems.exists(self.root):
            FileSystems.mkdirs(self.root)
        self.local = tempfile.mkdtemp(prefix="search-build-") if self.remote else self.root
        self.files: list = []

    def path(self, kind: str, extension: str) -> str:
        """The local path of this generation's file of `kind` (recorded for upload or removal)."""
        name = f"{kind}-{self.name}.{extension}"
        self.files.append(name)
        return os.path.join(self.local, name)

    def upload(self) -> None:
        if self.remote:
            for name in self.files:
                upload(os.path.join(self.local, name), FileSystems.join(self.root, name))

    def discard(self) -> None:
        for name in self.files:
            path = os.path.join(self.local, name)
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, failed, *_) -> None:
        """Removes what was written if the writer failed; then the scratch folder of a remote index."""
        if failed is not None:
            self.discard()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def save_index_files(generation: Generation, vectors: VectorIndex, files: dict) -> None:
    """Writes the faiss index, the removed rows and the sample queries' truth of `vectors` into `generation`,
    naming them in `files`."""
    files["vectors"] = os.path.basename(generation.path("vectors", "faiss"))
    vectors.save(os.path.join(generation.local, files["vectors"]))
    files.pop("removed", None)
    files.pop("truth", None)
    if len(vectors.removed):
        path = generation.path("removed", "npy")
        np.save(path, vectors.removed)
        files["removed"] = os.path.basename(path)
    if vectors.truth:
        path = generation.path("truth", "npz")
        with open(path, "wb") as f:
            np.savez(f, **{k: v for name, truth in vectors.truth.items() for k, v in truth.arrays(name).items()})
        files["truth"] = os.path.basename(path)


def build_search_index(collection: Collection, root: str, kind: str, overwrite: bool,
                       log: Callable[[str], None], max_memory: Optional[int] = None,
                       trained: Optional[VectorIndex] = None, replacing: Optional[object] = None,
                       extra: Optional[dict] = None) -> dict:
    """Builds and writes the index of `collection` into `root`; returns the manifest.

    `replacing` is the version of search.json this build replaces (read by an update); `trained` keeps that
    index's training (a compaction); `extra` adds manifest fields (what an update carries on)."""
    root = root.rstrip("/")
    manifest_path = FileSystems.join(root, MANIFEST)
    current = replacing or _manifest_version(manifest_path)
    if current is not None and not overwrite:
        raise SearchIndexError(f"{root} already holds a search index; pass --overwrite to replace it, or another "
                               f"--output.")
    layout = choose_layout(kind, collection.count, collection.dim, max_memory, collection.row_group_bytes) \
        if trained is None else None
    with Generation(root) as generation:
        items = ItemsWriter(generation.path("items", "parquet"))
        stored = generation.path("exact", "f32") if (trained or layout).kind == "compressed" else None

        def batches(adding: bool):
            for batch in collection.batches():
                if adding:
                    items.add(batch.ids, batch.uris, batch.sha256)
                yield batch.vectors

        index = build(batches, collection.count, collection.dim, kind if trained is None else trained.kind, log=log,
                      max_memory=max_memory, stored_path=stored, trained=trained,
                      row_group_bytes=collection.row_group_bytes)
        refuse_repeated_ids(items.close(), [os.path.join(generation.local, generation.files[0])], collection)
        files = {"items": [generation.files[0]]}
        if index.kind == "compressed":
            files["exact_vectors"] = [os.path.basename(stored)]
        save_index_files(generation, index, files)
        generation.upload()
    manifest = search_manifest(collection, index, files, items.with_sha256, max_memory, extra)
    publish_manifest(root, manifest, current)
    return manifest


def search_manifest(collection: Collection, index: VectorIndex, files: dict, with_sha256: int,
                    max_memory: Optional[int], extra: Optional[dict] = None) -> dict:
    """search.json of a new build of `collection`."""
    return {
        "format": FORMAT,
        "built_at": now(),
        "written_at": now(),
        "source": collection.described,
        "count": index.count,
        "rows": index.rows,
        "dim": collection.dim,
        "model": collection.metadata,
        "metric": METRIC,
        "vectors": "L2-normalised inside the search index only; the embeddings files keep the model's vectors",
        "index": {"library": f"faiss-cpu {import_faiss().__version__}", "kind": index.kind, **index.params},
        "with_sha256": with_sha256,
        "files": files,
        **({"index_source": collection.source} if collection.source else {}),
        **({"max_memory": max_memory} if max_memory else {}),
        **(extra or {}),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def file_names(manifest: dict) -> dict:
    """The files a manifest points to, every kind as a list (builds before updates named one items file, and
    the first builds used fixed names)."""
    files = manifest.get("files") or {"vectors": VECTORS, "items": ITEMS}
    return {kind: [names] if isinstance(names, str) else list(names) for kind, names in files.items()}


def publish_manifest(root: str, manifest: dict, replacing: Optional[object]) -> None:
    """Makes `manifest` the index (one conditional write: refused if search.json is no longer `replacing`), then
    deletes the files of the one it replaced that it does not share, and leftovers of writers that lost."""
    manifest_path = FileSystems.join(root, MANIFEST)
    previous = file_names(json.loads(replacing.data)) if replacing is not None else {}
    _publish(manifest_path, json.dumps(manifest, indent=2).encode(), replacing)
    reach("search.published")
    kept = {name for names in file_names(manifest).values() for name in names}
    old = [FileSystems.join(root, name) for names in previous.values() for name in names if name not in kept]
    old += _orphans(root, manifest, kept)
    old = [path for path in sorted(set(old)) if FileSystems.exists(path)]
    if old:
        FileSystems.delete(old)


def _orphans(root: str, manifest: dict, kept: set) -> list:
    """Files of generations that began ORPHAN_AGE before this manifest was written and that it does not name:
    their writer read an older search.json, so its conditional write is refused (or it was killed)."""
    written = datetime.datetime.fromisoformat(manifest["written_at"]).timestamp()
    found = []
    for metadata in FileSystems.match([FileSystems.join(root, "*")])[0].metadata_list:
        name = metadata.path.rstrip("/").rsplit("/", 1)[-1]
        match = GENERATION.match(name)
        if match and name not in kept:
            began = datetime.datetime.strptime(match.group(2), "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            if began < written - ORPHAN_AGE:
                found.append(metadata.path)
    return found


def refuse_repeated_ids(prints, items_paths: list, collection: Collection) -> None:
    """Refuses a build whose items files hold an id twice; `prints` are the fingerprints seen more than once."""
    if len(prints):
        _, ids = Items(items_paths).rows_with("id", prints)
        if len(set(ids)) < len(ids):
            repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
            raise CollectionError(
                f"id {repeated[0]!r} appears more than once in {collection.described} ({len(repeated)} ids do): the "
                f"files hold overlapping runs. Build from one run, a snapshot (python -m pipeline.index snapshot), "
                f"or --index ROOT.")


def local_copy(root: str, name: str) -> str:
    """A local path of ROOT/NAME: the file itself, or for a remote index a copy in the cache (fetched once)."""
    if "://" not in root:
        return os.path.join(root, name)
    folder = os.path.join(os.environ.get("SEARCH_CACHE_DIR") or DEFAULT_CACHE,
                          hashlib.sha256(root.encode()).hexdigest()[:16])
    path = os.path.join(folder, name)
    remote = FileSystems.join(root, name)
    size = FileSystems.match([remote])[0].metadata_list[0].size_in_bytes
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        download(remote, path)
    return path


def _objects(path: str):

    try:
        return objects_for(path)
    except UnsupportedStore:  # other object stores: one object's upload is atomic there, without conditions
        return None


class _Read:
    """search.json as read from a store without conditional writes."""

    def __init__(self, data: bytes):
        self.data, self.generation = data, None


def _manifest_version(path: str):
    """search.json's content and version, or None when there is none."""
    objects = _objects(path)
    if objects is not None:
        return objects.read(path)
    if not FileSystems.exists(path):
        return None
    return _Read(read_bytes(path))


def _publish(path: str, data: bytes, replacing: Optional[object]) -> None:
    """Writes the manifest in one atomic step, only over the version `replacing` (or only if there is none)."""

    objects = _objects(path)
    if objects is None:
        write_bytes(path, data)
        return
    try:
        objects.create(path, data) if replacing is None else objects.replace(path, data, replacing.generation)
    except Conflict:
        raise SearchIndexError(f"Another build or update wrote {path} while this one ran; nothing of this one is "
                               f"served. Run it again.") from None


def open_search_index(root: str, with_truth: bool = False) -> SearchIndex:
    """The search index at `root`; `with_truth` also loads the sample queries an update measures it with."""
    root = root.rstrip("/")
    manifest_path = FileSystems.join(root, MANIFEST)
    version = _manifest_version(manifest_path)
    if version is None:
        started = FileSystems.match([FileSystems.join(root, "items*.parquet")])[0].metadata_list
        what = "an unfinished build (rerun search build)" if started else "no search index"
        raise SearchIndexError(f"{root} holds {what}: no {MANIFEST}. Build one with python -m pipeline.search build.")
    manifest = json.loads(version.data)
    if manifest.get("format") not in READS:
        raise SearchIndexError(f"{root} was written in search index format {manifest.get('format')}, this code reads "
                               f"{READS[-1]}: rebuild it with python -m pipeline.search build.")
    files = file_names(manifest)
    try:
        removed = np.load(local_copy(root, files["removed"][0])) if "removed" in files else None
        items = Items([local_copy(root, name) for name in files["items"]], removed)
        params = {k: v for k, v in manifest["index"].items() if k not in ("library", "kind")}
        stored = [local_copy(root, name) for name in files["exact_vectors"]] if "exact_vectors" in files else None
        vectors = VectorIndex.load(FileSystems.join(root, files["vectors"][0]), manifest["index"]["kind"], params,
                                   stored, removed)
        if with_truth and "truth" in files:
            with np.load(local_copy(root, files["truth"][0])) as arrays:
                vectors.truth = {name: TopK.from_arrays(arrays, name) for name in ("tuning", "held_out")}
    except (OSError, RuntimeError, IndexError, ValueError) as exc:  # faiss raises RuntimeError for a file that is gone
        raise SearchIndexError(f"{root} was rebuilt while it was being opened ({exc}); open it again.") from None
    rows = manifest.get("rows", manifest["count"])
    if not (items.num_rows == vectors.rows == rows and vectors.count == manifest["count"]):
        raise SearchIndexError(f"{root} does not add up: {manifest['count']} in {MANIFEST}, {items.num_rows} items, "
                               f"{vectors.rows} vectors. Rebuild it with python -m pipeline.search build --overwrite.")
    return SearchIndex(root, manifest, items, vectors, version)
