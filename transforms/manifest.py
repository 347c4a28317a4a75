"""Manifests -> rows, read in parallel with Beam's splittable sources, each row with a stable order key.

Formats, picked by extension:
  .txt                  one URI a line; blank lines and lines starting with '#' are skipped
  .csv / .tsv           a header with a `uri` column and an optional `id` column, one row per line
  .jsonl                one JSON object a line with "uri" and optional "id"
  .parquet              columns `uri` and optional `id` (string, binary as UTF-8, or integer)

Text manifests are split by byte range (a `FileBasedSource`), Parquet manifests by row group, so a
100M-row manifest is read by every worker at once. A row's order key is its byte offset (text) or
row number (Parquet): stable across runs and runners, it decides which row of a duplicated id wins.

Every line is parsed on its own: a stray quote, an over-long field or bytes that are not UTF-8 make
that row a reported failure; they never merge rows or stop the job. TSV has no quoting at all.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterator, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.records import describe_exception
from transforms.row_checks import id_problem, uri_problem, writable
from transforms.uri_reader import has_glob

MANIFEST_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
MAX_LINE_BYTES = 1 << 20
_BOM = "\ufeff"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (raised before the pipeline starts)."""


class ManifestRow(NamedTuple):
    """One input row. `order` sorts rows in file order; `where` names the row in messages."""

    order: tuple
    where: str
    id: str
    uri: str
    problem: Optional[str] = None
    data: Optional[bytes] = None  # the encoded image, for inputs that carry it (TFRecord)


def manifest_format(path: str) -> str:
    return os.path.splitext(path.lower())[1].lstrip(".")


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_header(path: str) -> list[str]:
    """The column names of a CSV/TSV/Parquet manifest ([] for .txt/.jsonl), or a clear ManifestError."""
    if not FileSystems.exists(path):
        raise ManifestError(f"Manifest {path} does not exist.")
    fmt = manifest_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
        _check_parquet_types(path, schema)
        return schema.names
    if fmt not in ("csv", "tsv"):
        return []
    with _open(path) as f:
        first = f.readline(MAX_LINE_BYTES)
    try:
        line = first.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"The header of manifest {path} is not UTF-8 (byte {first[exc.start]:#04x} at position {exc.start}); "
            f"save the manifest as UTF-8."
        ) from None
    return [name.strip() for name in _split(line.lstrip(_BOM).rstrip("\r\n"), fmt)]


def _check_parquet_types(path: str, schema) -> None:
    import pyarrow.types as t

    for column in ("uri", "id"):
        if column not in schema.names:
            continue
        kind = schema.field(column).type
        if not (t.is_string(kind) or t.is_large_string(kind) or t.is_binary(kind) or t.is_large_binary(kind)
                or (column == "id" and t.is_integer(kind))):
            raise ManifestError(
                f"Manifest {path}: column '{column}' has type {kind}; it must be a string"
                f"{' or an integer' if column == 'id' else ''} (a float id such as 1.0 would not round-trip). "
                f"Cast it before writing the manifest."
            )


def check_manifest(path: str) -> list[str]:
    """Fails fast, before any worker starts, on a missing manifest or one without a `uri` column."""
    columns = read_header(path)
    if manifest_format(path) in ("csv", "tsv", "parquet") and "uri" not in columns:
        raise ManifestError(f"Manifest {path} has no 'uri' column (columns: {', '.join(columns) or 'none'}).")
    return columns


def count_manifest_rows(path: str) -> int:
    """How many rows the manifest gives (blank and comment lines and the header excluded), read fast."""
    fmt = manifest_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    rows = 0
    with _open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped and not (fmt == "txt" and stripped.startswith(b"#")):
                rows += 1
    return rows - 1 if fmt in ("csv", "tsv") and rows else rows


def _split(line: str, fmt: str) -> list[str]:
    if fmt == "tsv":
        return line.split("\t")  # TSV has no quoting: a quote is an ordinary character
    if csv.field_size_limit() < MAX_LINE_BYTES:  # a field may be as long as its line
        csv.field_size_limit(MAX_LINE_BYTES)
    if _stray_quote(line):
        raise csv.Error("a quote inside a field that does not start with one")
    return next(csv.reader([line], strict=True), [])


def _stray_quote(line: str) -> bool:
    """True when a field that is not quoted holds the quote character.

    Python's csv reads `copy",/x.jpg` as the text `copy"`: for a quoted field whose newline split it into two
    lines, that would make the second half a row under a wrong id. Such a line is its own failure instead.
    """
    state = "start"
    for ch in line:
        if state == "start":
            state = "quoted" if ch == '"' else "start" if ch == "," else "plain"
        elif state == "plain":
            if ch == '"':
                return True
            if ch == ",":
                state = "start"
        elif state == "quoted":
            if ch == '"':
                state = "closing"
        else:  # a quote inside a quoted field: doubled, or the field's end
            state = "quoted" if ch == '"' else "start" if ch == "," else "after"
            if state == "after":
                return False  # text after the closing quote: csv's strict mode reports it
    return False


def checked_row(order: tuple, where: str, id_: str, uri: str, what: str = "Manifest",
                check_uri: bool = True) -> ManifestRow:
    """The row, or its failure when its id or uri could not be carried to every output (row_checks.py). A row
    whose id is unusable is named by where it is, since its id cannot be written."""
    bad_id = id_problem(id_)
    if bad_id:
        return ManifestRow(order, where, f"<{where}>", writable(uri), f"{what} {where} {bad_id}")
    bad_uri = uri_problem(uri) if check_uri else None
    if bad_uri:
        return ManifestRow(order, where, id_, writable(uri), f"{what} {where} {bad_uri}")
    return ManifestRow(order, where, id_, uri)


def _row(order: tuple, where: str, uri, id_=None) -> ManifestRow:
    uri = "" if uri is None else str(uri).strip()
    id_ = "" if id_ is None else str(id_).strip()
    if not uri:
        named = id_ and not id_problem(id_)
        return ManifestRow(order, where, id_ if named else f"<{where}>", "", f"Manifest {where} has an empty uri.")
    return checked_row(order, where, id_ or uri, uri)


def _bad(order: tuple, where: str, problem: str, text: str = "") -> ManifestRow:
    """A failure row; its uri column shows the line (up to 500 characters) so that a user can find it."""
    return ManifestRow(order, where, f"<{where}>", writable(text[:500]), f"Manifest {where} {problem}")


def parse_line(offset_and_line: tuple, path: str, columns: Sequence[str]) -> list:
    """One physical manifest line -> [ManifestRow] ([] for blank, comment and header lines); whatever the line
    holds, the worst it can be is its own failure row."""
    try:
        row = _parse_line(offset_and_line, path, columns)
    except Exception as exc:
        offset, raw = offset_and_line
        return [_bad((path, offset), f"row at byte {offset}", f"could not be parsed ({describe_exception(exc)}).",
                     (raw or b"").decode("utf-8", "replace").rstrip("\r\n"))]
    return [row] if row else []


def _parse_line(offset_and_line: tuple, path: str, columns: Sequence[str]) -> Optional[ManifestRow]:
    offset, raw = offset_and_line
    order, where = (path, offset), f"row at byte {offset}"
    fmt = manifest_format(path)
    if raw is None:
        return _bad(order, where, f"is longer than {MAX_LINE_BYTES} bytes.")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad(order, where, f"is not UTF-8 (byte {raw[exc.start]:#04x} at position {exc.start}); "
                                  f"save the manifest as UTF-8.", raw.decode("utf-8", "replace").rstrip("\r\n"))
    if offset == 0:
        line = line.lstrip(_BOM)
    line = line.rstrip("\r\n")
    if not line.strip() or (fmt == "txt" and line.strip().startswith("#")):
        return None
    if fmt in ("csv", "tsv") and offset == 0:
        return None  # the header
    if fmt == "txt":
        return _row(order, where, line)
    if fmt == "jsonl":
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return _bad(order, where, f"is not valid JSON ({exc.msg}).", line)
        if not isinstance(record, dict):
            return _bad(order, where, "is not a JSON object.", line)
        return _row(order, where, record.get("uri"), record.get("id"))
    try:
        values = _split(line, fmt)
    except csv.Error as exc:
        return _bad(order, where, f"is not valid CSV ({exc}); quote a field with \" and double the quotes "
                                  f"inside it.", line)
    if len(values) != len(columns):
        return _bad(order, where, f"has {len(values)} fields, the header has {len(columns)} ({', '.join(columns)}).",
                    line)
    record = dict(zip(columns, values))
    return _row(order, where, record.get("uri"), record.get("id"))


class _ManifestLines(filebasedsource.FileBasedSource):
    """(byte offset, line bytes) of a text file, split into byte ranges that workers read in parallel.

    A range owns the lines that start inside it. A line over MAX_LINE_BYTES comes out as (offset, None)
    without being held in memory.
    """

    def __init__(self, path: str):
        super().__init__(path, compression_type=CompressionTypes.UNCOMPRESSED, splittable=True, validate=False)

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        with self.open_file(file_name) as f:
            if start > 0:  # the line that crosses into this range belongs to the previous one
                f.seek(start - 1)
                start = start - 1 + _skip_line(f)
            yield from _lines_from(f, start, range_tracker.try_claim)


def _lines_from(f, position: int, claim) -> Iterator[tuple]:
    while claim(position):
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            yield position, None
            position += len(line) + _skip_line(f)
        else:
            yield position, line
            position += len(line)


def _all_lines(path: str) -> Iterator[tuple]:
    with _open(path) as f:
        yield from _lines_from(f, 0, lambda position: True)


def _skip_line(f) -> int:
    """Reads up to and including the next newline; returns the bytes consumed."""
    consumed = 0
    while True:
        chunk = f.readline(MAX_LINE_BYTES)
        consumed += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return consumed


def _parquet_row_groups(path: str) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        metadata = pq.ParquetFile(f).metadata
    first_row = 1
    for index in range(metadata.num_row_groups):
        yield path, index, first_row
        first_row += metadata.row_group(index).num_rows


def _read_parquet_row_group(group: tuple) -> Iterator[ManifestRow]:
    import pyarrow.parquet as pq

    path, index, first_row = group
    with _open(path) as f:
        parquet = pq.ParquetFile(f)
        rows = parquet.metadata.row_group(index).num_rows
        try:
            columns = [c for c in ("uri", "id") if c in parquet.schema_arrow.names]
            table = parquet.read_row_group(index, columns=columns)
        except Exception as exc:  # a damaged row group costs its own rows, each reported
            for number in range(first_row, first_row + rows):
                yield _bad((path, number), f"row {number}", f"is in row group {index}, which could not be read "
                                                             f"({describe_exception(exc)}).")
            return
    uris = table.column("uri").to_pylist()
    ids = table.column("id").to_pylist() if "id" in columns else [None] * table.num_rows
    for offset, (uri, id_) in enumerate(zip(uris, ids)):
        number = first_row + offset
        order, where = (path, number), f"row {number}"
        try:
            uri, id_ = (_text(value) for value in (uri, id_))
        except UnicodeDecodeError:
            yield _bad(order, where, "holds bytes that are not UTF-8 in 'uri' or 'id'.")
            continue
        try:
            yield _row(order, where, uri, id_)
        except Exception as exc:
            yield _bad(order, where, f"could not be parsed ({describe_exception(exc)}).")


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


class ReadManifest(beam.PTransform):
    """A manifest path -> ManifestRow, read in parallel (byte ranges or row groups)."""

    def __init__(self, path: str, columns: Sequence[str]):
        super().__init__()
        self._path = path
        self._columns = tuple(columns)

    def expand(self, pbegin):
        if manifest_format(self._path) == "parquet":
            return (
                pbegin
                | "Manifest" >> beam.Create([self._path])
                | "RowGroups" >> beam.FlatMap(_parquet_row_groups)
                | "Spread" >> beam.Reshuffle()
                | "ReadRowGroup" >> beam.FlatMap(_read_parquet_row_group)
            )
        if has_glob(self._path):
            # Beam's sources take a glob and cannot quote its characters: read this one file whole.
            lines = pbegin | "Manifest" >> beam.Create([self._path]) | "ReadLines" >> beam.FlatMap(_all_lines)
        else:
            lines = pbegin | "ReadLines" >> beam.io.Read(_ManifestLines(self._path))
        return lines | "ParseLines" >> beam.FlatMap(parse_line, self._path, self._columns)
