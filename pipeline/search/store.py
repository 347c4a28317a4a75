"""A search index folder: the vectors' index, the table of what each row is, and a manifest written last.

    INDEX_DIR/vectors-BUILD.faiss    the faiss index (row i = row i of the items table)
    INDEX_DIR/items-BUILD.parquet    row, id, uri, sha256
    INDEX_DIR/search.json            model and preprocessing (as the embeddings recorded them), metric, index
                                     kind and parameters, source, counts, and which two files are the index;
                                     its presence marks a finished build

A rebuild (--overwrite) writes new files under a new BUILD name, then replaces search.json in one atomic
write, then deletes the old files: a reader sees the old pair or the new pair, never new vectors with old ids.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Callable, Optional

import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.search.collection import Collection, CollectionError
from pipeline.search.items import Items, ItemsWriter
from pipeline.search.vector_index import METRIC, VectorIndex, build, choose_layout, import_faiss

MANIFEST, VECTORS, ITEMS = "search.json", "vectors.faiss", "items.parquet"
FORMAT = 1
COPY_BLOCK = 64 << 20
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "beam-image-embeddings", "search")


class SearchIndexError(ValueError):
    """The search index folder is missing, unfinished, or cannot answer this request."""


@dataclasses.dataclass
class SearchIndex:
    root: str
    manifest: dict
    items: Items
    vectors: VectorIndex

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def rows_of(self, ids: list) -> list:
        """The row of each id, or None for ids not in the index."""
        return self.items.rows_of(ids)


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def write_parquet(table: pa.Table, path: str) -> None:
    """`table` as one Parquet file at `path`, local or on any Beam filesystem."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue().to_pybytes())


def build_search_index(collection: Collection, root: str, kind: str, overwrite: bool,
                       log: Callable[[str], None], max_memory: Optional[int] = None) -> dict:
    """Builds and writes the index of `collection` into `root`; returns the manifest."""
    root = root.rstrip("/")
    manifest_path = FileSystems.join(root, MANIFEST)
    if FileSystems.exists(manifest_path) and not overwrite:
        raise SearchIndexError(f"{root} already holds a search index; pass --overwrite to replace it, or another "
                               f"--output.")
    layout = choose_layout(kind, collection.count, collection.dim, max_memory)
    build_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    files = {"vectors": f"vectors-{build_id}.faiss", "items": f"items-{build_id}.parquet"}
    if layout.kind == "compressed":
        files["exact_vectors"] = f"exact-{build_id}.f32"
    remote = "://" in root
    if not FileSystems.exists(root):
        FileSystems.mkdirs(root)
    local = tempfile.mkdtemp(prefix="search-build-") if remote else root
    written = [os.path.join(local, name) for name in files.values()]
    try:
        items = ItemsWriter(os.path.join(local, files["items"]))

        def batches(adding: bool):
            for batch in collection.batches():
                if adding:
                    items.add(batch.ids, batch.uris, batch.sha256)
                yield batch.vectors

        index = build(batches, collection.count, collection.dim, layout.kind, log=log,
                      max_memory=max_memory, stored_path=os.path.join(local, files.get("exact_vectors", "-")))
        _refuse_repeated_ids(items.close(), os.path.join(local, files["items"]), collection)
        index.save(os.path.join(local, files["vectors"]))
        if remote:
            for name in files.values():
                _upload(os.path.join(local, name), FileSystems.join(root, name))
    except BaseException:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    previous = _files_of(_read_manifest(manifest_path)) if FileSystems.exists(manifest_path) else {}
    manifest = {
        "format": FORMAT,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": collection.described,
        "count": index.count,
        "dim": collection.dim,
        "model": collection.metadata,
        "metric": METRIC,
        "vectors": "L2-normalised inside the search index only; the embeddings files keep the model's vectors",
        "index": {"library": f"faiss-cpu {import_faiss().__version__}", "kind": index.kind, **index.params},
        "with_sha256": items.with_sha256,
        "files": files,
    }
    _publish(manifest_path, json.dumps(manifest, indent=2).encode())
    old = [FileSystems.join(root, name) for name in previous.values() if name not in files.values()]
    old = [path for path in old if FileSystems.exists(path)]
    if old:
        FileSystems.delete(old)
    return manifest


def _refuse_repeated_ids(prints, items_path: str, collection: Collection) -> None:
    if len(prints):
        _, ids = Items(items_path).rows_with("id", prints)
        if len(set(ids)) < len(ids):
            repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
            raise CollectionError(
                f"id {repeated[0]!r} appears more than once in {collection.described} ({len(repeated)} ids do): the "
                f"files hold overlapping runs. Build from one run, a snapshot (python -m pipeline.index snapshot), "
                f"or --index ROOT.")


def _upload(local: str, path: str) -> None:
    with open(local, "rb") as source, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        shutil.copyfileobj(source, f, COPY_BLOCK)


def _local_copy(root: str, name: str) -> str:
    """A local path of ROOT/NAME: the file itself, or for a remote index a copy in the cache (fetched once)."""
    if "://" not in root:
        return os.path.join(root, name)
    folder = os.path.join(os.environ.get("SEARCH_CACHE_DIR") or DEFAULT_CACHE,
                          hashlib.sha256(root.encode()).hexdigest()[:16])
    path = os.path.join(folder, name)
    remote = FileSystems.join(root, name)
    size = FileSystems.match([remote])[0].metadata_list[0].size_in_bytes
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        with FileSystems.open(remote, compression_type=CompressionTypes.UNCOMPRESSED) as f, open(partial, "wb") as out:
            shutil.copyfileobj(f, out, COPY_BLOCK)
        os.replace(partial, path)
    return path


def _files_of(manifest: dict) -> dict:
    """The two files a manifest points to (builds before named files used fixed names)."""
    return manifest.get("files") or {"vectors": VECTORS, "items": ITEMS}


def _read_manifest(path: str) -> dict:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.loads(f.read())


def _publish(path: str, data: bytes) -> None:
    """Writes the manifest in one atomic step: a reader sees the old one or the new one, whole."""
    from pipeline.index.objects import Conflict, UnsupportedStore, objects_for

    try:
        objects = objects_for(path)
    except UnsupportedStore:  # other object stores: one object's upload is atomic there
        write_bytes(path, data)
        return
    current = objects.read(path)
    try:
        objects.create(path, data) if current is None else objects.replace(path, data, current.generation)
    except Conflict:
        raise SearchIndexError(f"Another build wrote {path} at the same time; run the build again.") from None


def open_search_index(root: str) -> SearchIndex:
    root = root.rstrip("/")
    manifest_path = FileSystems.join(root, MANIFEST)
    if not FileSystems.exists(manifest_path):
        started = FileSystems.match([FileSystems.join(root, "items*.parquet")])[0].metadata_list
        what = "an unfinished build (rerun search build)" if started else "no search index"
        raise SearchIndexError(f"{root} holds {what}: no {MANIFEST}. Build one with python -m pipeline.search build.")
    manifest = _read_manifest(manifest_path)
    if manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{root} was written in search index format {manifest.get('format')}, this code reads "
                               f"{FORMAT}: rebuild it with python -m pipeline.search build.")
    files = _files_of(manifest)
    try:
        items = Items(_local_copy(root, files["items"]))
        params = {k: v for k, v in manifest["index"].items() if k not in ("library", "kind")}
        stored = _local_copy(root, files["exact_vectors"]) if "exact_vectors" in files else None
        vectors = VectorIndex.load(FileSystems.join(root, files["vectors"]), manifest["index"]["kind"], params, stored)
    except (OSError, RuntimeError, IndexError) as exc:  # faiss raises RuntimeError for a file that is gone
        raise SearchIndexError(f"{root} was rebuilt while it was being opened ({exc}); open it again.") from None
    if not items.num_rows == vectors.count == manifest["count"]:
        raise SearchIndexError(f"{root} does not add up: {manifest['count']} in {MANIFEST}, {items.num_rows} items, "
                               f"{vectors.count} vectors. Rebuild it with python -m pipeline.search build --overwrite.")
    return SearchIndex(root, manifest, items, vectors)
