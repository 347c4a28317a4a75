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

import dataclasses
import datetime
import json
import uuid
from typing import Callable

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.search.collection import Collection, CollectionError
from pipeline.search.vector_index import METRIC, VectorIndex, build, import_faiss

MANIFEST, VECTORS, ITEMS = "search.json", "vectors.faiss", "items.parquet"
FORMAT = 1
ITEMS_SCHEMA = pa.schema([pa.field("row", pa.int64(), nullable=False), pa.field("id", pa.string(), nullable=False),
                          pa.field("uri", pa.string()), pa.field("sha256", pa.string())])


class SearchIndexError(ValueError):
    """The search index folder is missing, unfinished, or cannot answer this request."""


@dataclasses.dataclass
class SearchIndex:
    root: str
    manifest: dict
    items: pa.Table
    vectors: VectorIndex

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def rows_of(self, ids: list) -> list:
        """The row of each id, or None for ids not in the index."""
        import pyarrow.compute as pc

        return pc.index_in(pa.array(ids, pa.string()), value_set=self.items.column("id")).to_pylist()


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
                       log: Callable[[str], None]) -> dict:
    """Builds and writes the index of `collection` into `root`; returns the manifest."""
    root = root.rstrip("/")
    manifest_path = FileSystems.join(root, MANIFEST)
    if FileSystems.exists(manifest_path) and not overwrite:
        raise SearchIndexError(f"{root} already holds a search index; pass --overwrite to replace it, or another "
                               f"--output.")
    items = {}

    def batches():
        items.update(ids=[], uris=[], sha256=[])
        seen = set()
        for batch in collection.batches():
            for id_ in batch.ids:
                if id_ in seen:
                    raise CollectionError(
                        f"id {id_!r} appears more than once in {collection.described}: the files hold overlapping "
                        f"runs. Build from one run, a snapshot (python -m pipeline.index snapshot), or --index ROOT.")
                seen.add(id_)
            items["ids"] += batch.ids
            items["uris"] += batch.uris
            items["sha256"] += batch.sha256
            yield batch.vectors

    index = build(batches, collection.count, collection.dim, kind, log=log)
    if not FileSystems.exists(root):
        FileSystems.mkdirs(root)
    previous = _files_of(_read_manifest(manifest_path)) if FileSystems.exists(manifest_path) else {}
    build_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    files = {"vectors": f"vectors-{build_id}.faiss", "items": f"items-{build_id}.parquet"}
    index.save(FileSystems.join(root, files["vectors"]))
    table = pa.table({"row": np.arange(len(items["ids"]), dtype=np.int64), "id": items["ids"],
                      "uri": items["uris"], "sha256": items["sha256"]}, schema=ITEMS_SCHEMA)
    write_parquet(table, FileSystems.join(root, files["items"]))
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
        "with_sha256": sum(1 for s in items["sha256"] if s),
        "files": files,
    }
    _publish(manifest_path, json.dumps(manifest, indent=2).encode())
    old = [FileSystems.join(root, name) for name in previous.values() if name not in files.values()]
    old = [path for path in old if FileSystems.exists(path)]
    if old:
        FileSystems.delete(old)
    return manifest


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
    import pyarrow.parquet as pq

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
        with FileSystems.open(FileSystems.join(root, files["items"]),
                              compression_type=CompressionTypes.UNCOMPRESSED) as f:
            items = pq.read_table(f)
        params = {k: v for k, v in manifest["index"].items() if k not in ("library", "kind")}
        vectors = VectorIndex.load(FileSystems.join(root, files["vectors"]), manifest["index"]["kind"], params)
    except (OSError, RuntimeError) as exc:  # faiss raises RuntimeError for a file that is gone
        raise SearchIndexError(f"{root} was rebuilt while it was being opened ({exc}); open it again.") from None
    if not items.num_rows == vectors.count == manifest["count"]:
        raise SearchIndexError(f"{root} does not add up: {manifest['count']} in {MANIFEST}, {items.num_rows} items, "
                               f"{vectors.count} vectors. Rebuild it with python -m pipeline.search build --overwrite.")
    return SearchIndex(root, manifest, items, vectors)
