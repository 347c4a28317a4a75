"""What a search index is built from: a run's or snapshot's embeddings files, or an index ROOT's current view.

Read in batches of rows, so that building holds the search index and one batch, never a second copy of
every vector. Files of different models or preprocessing are refused, as are ids listed twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline.embeddings_io import embedding_metadata, open_parquet, row_count, vectors
from pipeline.preflight import metadata_differences

BATCH_ROWS = 8192


class CollectionError(ValueError):
    """The embeddings to index cannot be used as given; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: list
    uris: list
    sha256: list  # None where the run predates the column
    vectors: np.ndarray  # float32 [rows, dim], as the model gave them


@dataclasses.dataclass(frozen=True)
class Collection:
    """Embeddings files that hold the vectors of one model, with the rows to keep from each."""

    described: str  # where the vectors came from, for the manifest and messages
    files: tuple  # Parquet paths
    metadata: dict  # the embedding.* metadata they share
    count: int
    keep: Optional[tuple] = None  # per file, a mask of the rows in an index's current view; None keeps every row
    source: Optional[dict] = None  # from an index: its root, index_id and the log length (seq) of the view
    row_group_bytes: int = 0  # the largest row group of the files, uncompressed: a reader holds one whole

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    def batches(self, rows: int = BATCH_ROWS) -> Iterator[Batch]:
        """Every kept row once, in a fixed order (file by file), `rows` at a time at most."""
        for table in self._tables(("id", "uri", "sha256", "embedding"), rows):
            yield _to_batch(table, self.dim)

    def ids(self) -> Iterator[str]:
        """The id of every kept row, in the order of `batches`, read without the vectors."""
        for table in self._tables(("id",), BATCH_ROWS):
            yield from table.column("id").to_pylist()

    def parts(self) -> Iterator["Collection"]:
        """The collection as one collection per file (with rows to keep), in the order of `batches`; files
        without kept rows are left out."""
        for position, path in enumerate(self.files):
            if self.keep is not None:
                mask = self.keep[position]
                count = int(np.count_nonzero(mask))
            else:
                count, mask = row_count(path), None
            if count:
                yield dataclasses.replace(self, described=path, files=(path,), count=count,
                                          keep=None if mask is None else (mask,))

    def _tables(self, wanted: tuple, rows: int) -> Iterator[pa.Table]:
        for position, path in enumerate(self.files):
            with open_parquet(path, pre_buffer=False) as parquet:
                columns = [c for c in wanted if c in parquet.schema_arrow.names]
                start = 0
                for record_batch in parquet.iter_batches(batch_size=rows, columns=columns):
                    table = pa.Table.from_batches([record_batch])
                    if self.keep is not None:
                        table = table.filter(pa.array(self.keep[position][start:start + table.num_rows]))
                        start += record_batch.num_rows
                    if table.num_rows:
                        yield table


def _to_batch(table: pa.Table, dim: int) -> Batch:
    sha = table.column("sha256").to_pylist() if "sha256" in table.column_names else [None] * table.num_rows
    return Batch(table.column("id").to_pylist(), table.column("uri").to_pylist(), sha, vectors(table, dim))


def _read_footers(files: list) -> tuple[dict, int, int]:
    """The shared metadata, the total row count and the largest row group (uncompressed bytes); refuses files
    whose vectors are not comparable."""
    metadata, first, count, largest = None, None, 0, 0
    for path in files:
        with open_parquet(path) as parquet:
            count += parquet.metadata.num_rows
            largest = max([largest] + [parquet.metadata.row_group(g).total_byte_size
                                       for g in range(parquet.metadata.num_row_groups)])
            this = embedding_metadata(parquet.schema_arrow)
        if "embedding" not in parquet.schema_arrow.names or "dim" not in this:
            raise CollectionError(f"{path} is not an embeddings file of this pipeline (no embedding column or "
                                  f"embedding.dim metadata).")
        if metadata is None:
            metadata, first = this, path
        elif metadata_differences(metadata, this):
            raise CollectionError(
                f"{first} and {path} hold vectors of different models or preprocessing "
                f"({'; '.join(metadata_differences(metadata, this))}); an index holds one model. Build from one "
                f"model's files.")
    return metadata, count, largest


def from_files(pattern: str) -> Collection:
    """Embeddings files matching `pattern` (a run's OUT/embeddings-*.parquet, a snapshot, or several runs)."""
    if FileSystems.exists(pattern) and not pattern.endswith(".parquet"):
        raise CollectionError(f"--embeddings {pattern} is a folder: pass its files, e.g. "
                              f"--embeddings '{FileSystems.join(pattern, 'embeddings-*.parquet')}'.")
    # Beam matches a bare relative glob ('embeddings-*.parquet') against nothing: matched as an absolute one
    matched = pattern if "://" in pattern else os.path.abspath(pattern)
    files = sorted(m.path for m in FileSystems.match([matched])[0].metadata_list)
    if not files:
        raise CollectionError(f"--embeddings {pattern} matches no files.")
    metadata, count, largest = _read_footers(files)
    return Collection(described=pattern, files=tuple(files), metadata=metadata, count=count, row_group_bytes=largest)


def from_index(root: str) -> Collection:
    """The current view of an index ROOT (pipeline.index): each live id's latest vector."""
    from pipeline.index.store import IndexStore
    from pipeline.index.view import current_selection

    store = IndexStore(root.rstrip("/"))
    if store.identity() is None:
        raise CollectionError(f"--index {root} is not an index (no index.json); make one with python -m pipeline.index create.")
    entries = store.log()
    files, masks, count = current_selection(store, entries)
    if not count:
        raise CollectionError(f"The index at {root} has no embedded images yet; run pipeline.index update first.")
    return selected(f"index {root}", files, masks, count, index_source(store, entries))


def index_source(store, entries) -> dict:
    """What a search index records of the index view it holds: the next update starts from there."""
    return {"root": store.root, "index_id": store.identity()["index_id"], "seq": len(entries)}


def selected(described: str, files: list, masks: list, count: int, source: dict) -> Collection:
    """The rows of `masks` in the (seq, path) `files` of an index."""
    used = [(path, mask) for (_, path), mask in zip(files, masks) if mask.any()]
    metadata, _, largest = _read_footers([path for path, _ in used]) if used else ({}, 0, 0)
    return Collection(described=described, files=tuple(p for p, _ in used), metadata=metadata, count=count,
                      keep=tuple(mask for _, mask in used), source=source, row_group_bytes=largest)
