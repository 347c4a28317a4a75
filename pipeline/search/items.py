"""What each row of a search index is (row, id, uri, sha256): written while building, read a row group at a time.

Neither building nor searching holds every id: a build streams the items file as it adds vectors and checks
that ids are unique with 8-byte fingerprints; a query reads only the row groups of its hits, and a lookup by
id scans the id column one row group at a time.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

ITEMS_SCHEMA = pa.schema([pa.field("row", pa.int64(), nullable=False), pa.field("id", pa.string(), nullable=False),
                          pa.field("uri", pa.string()), pa.field("sha256", pa.string())])
ROW_GROUP = 65536  # rows per Parquet row group: the unit a query reads


def fingerprints(values: Iterable[Optional[str]]) -> np.ndarray:
    """An 8-byte fingerprint of each string (0 for None): equal strings, equal fingerprints."""
    return np.array([0 if v is None else int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(),
                                                         "little") for v in values], np.uint64)


def repeated(prints: np.ndarray) -> np.ndarray:
    """The fingerprints that occur more than once (0, for None, excepted)."""
    values, counts = np.unique(prints, return_counts=True)
    return values[(counts > 1) & (values != 0)]


class ItemsWriter:
    """Appends batches of (id, uri, sha256) to a local items file, numbering rows from `first_row` (an update's
    segment continues the rows before it); remembers id fingerprints."""

    def __init__(self, path: str, first_row: int = 0):
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(path, ITEMS_SCHEMA)
        self._pending: list = []
        self._prints: list = []
        self.first_row = first_row
        self.rows = first_row
        self.with_sha256 = 0

    def add(self, ids: list, uris: list, sha256: list) -> None:
        self._pending.append(pa.table({"row": np.arange(self.rows, self.rows + len(ids), dtype=np.int64), "id": ids,
                                       "uri": uris, "sha256": sha256}, schema=ITEMS_SCHEMA))
        self._prints.append(fingerprints(ids))
        self.rows += len(ids)
        self.with_sha256 += sum(1 for digest in sha256 if digest)
        if sum(t.num_rows for t in self._pending) >= ROW_GROUP:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending)
        whole = table.num_rows if final else table.num_rows // ROW_GROUP * ROW_GROUP
        if whole:
            self._writer.write_table(table.slice(0, whole), row_group_size=ROW_GROUP)
        self._pending = [table.slice(whole)] if whole < table.num_rows else []

    def close(self) -> np.ndarray:
        """Finishes the file; returns the id fingerprints that occur more than once (checked by `Items`), and
        keeps them all in `fingerprints` (a distributed build checks them across shards)."""
        if self._pending:
            self._flush(final=True)
        self._writer.close()
        self.fingerprints = np.concatenate(self._prints) if self._prints else np.zeros(0, np.uint64)
        return repeated(self.fingerprints)


class Items:
    """Local items files (the build's, then one per update, rows numbered on), read by row group.

    Rows in `removed` (tombstones of ids that left the view or changed) are never returned by a lookup.
    """

    def __init__(self, paths, removed: Optional[np.ndarray] = None):
        import pyarrow.parquet as pq

        self._files = [pq.ParquetFile(path) for path in ([paths] if isinstance(paths, str) else paths)]
        self._groups_of = [(f, g) for f in self._files for g in range(f.metadata.num_row_groups)]
        sizes = [f.metadata.row_group(g).num_rows for f, g in self._groups_of]
        self._starts = np.cumsum([0] + sizes)  # first row of each row group, then the end
        self.num_rows = int(self._starts[-1])
        self.removed = np.zeros(0, np.int64) if removed is None else np.asarray(removed, np.int64)

    def _groups(self, columns: list):
        for number, (file, group) in enumerate(self._groups_of):
            table = file.read_row_group(group, columns=columns)
            if len(self.removed) and "row" in columns:
                table = table.filter(pa.array(~np.isin(table.column("row").to_numpy(), self.removed)))
            yield number, table

    def take(self, rows) -> pa.Table:
        """The items of `rows`, in that order (row groups read once each)."""
        rows = np.asarray(rows, np.int64)
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        needed = np.unique(groups)
        tables = [self._groups_of[int(g)][0].read_row_group(self._groups_of[int(g)][1]) for g in needed]
        table = pa.concat_tables(tables) if tables else ITEMS_SCHEMA.empty_table()
        read_before = np.cumsum([0] + [t.num_rows for t in tables])[np.searchsorted(needed, groups)]
        return table.take(pa.array(read_before + rows - self._starts[groups], pa.int64()))

    def rows_of(self, ids: list) -> list:
        """The row of each id, or None for ids not in the index (removed rows are not in it)."""
        import pyarrow.compute as pc

        asked = pa.array(ids, pa.string())
        found: dict = {}
        for _, table in self._groups(["row", "id"]):
            positions = pc.index_in(table.column("id"), value_set=asked)
            hits = pc.is_valid(positions)
            for position, row in zip(pc.filter(positions, hits).to_pylist(),
                                     pc.filter(table.column("row"), hits).to_pylist()):
                found.setdefault(ids[position], row)
        return [found.get(id_) for id_ in ids]

    def removed_ids(self, ids: list) -> set:
        """Those of `ids` that only removed rows hold: ids the index had and no longer has."""
        if not len(self.removed) or not ids:
            return set()
        wanted, held = set(ids), set()
        for file, group in self._groups_of:
            held.update(v for v in file.read_row_group(group, columns=["id"]).column("id").to_pylist() if v in wanted)
        return {id_ for id_, row in zip(sorted(held), self.rows_of(sorted(held))) if row is None}

    def rows_with(self, column: str, prints: np.ndarray) -> tuple[np.ndarray, list]:
        """(rows, values) of the live rows whose `column` value has one of the fingerprints `prints`."""
        rows, values = [], []
        for _, table in self._groups(["row", column]):
            keep = np.isin(fingerprints(table.column(column).to_pylist()), prints)
            rows.append(table.column("row").to_numpy()[keep])
            values += [v for v, k in zip(table.column(column).to_pylist(), keep) if k]
        return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), values

    def duplicated(self, column: str) -> tuple[np.ndarray, list]:
        """(rows, values) of the live rows whose `column` value (not null) occurs more than once."""
        prints = [fingerprints(table.column(column).to_pylist()) for _, table in self._groups(["row", column])]
        candidates = repeated(np.concatenate(prints) if prints else np.zeros(0, np.uint64))
        rows, values = self.rows_with(column, candidates)
        counts: dict = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        keep = np.array([counts[v] > 1 for v in values], bool)
        return rows[keep] if len(rows) else rows, [v for v, k in zip(values, keep) if k]
