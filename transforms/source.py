"""Source: a manifest file or a glob of image files -> unique (id, uri) inputs, spread across workers.

Manifest formats, picked by extension:
  .txt                          one URI a line; blank lines and lines starting with '#' are skipped
  .csv / .tsv                   a header with a `uri` column and an optional `id` column
  .jsonl                        one JSON object a line with "uri" and optional "id"
  .parquet                      columns `uri` and optional `id`
Without an id the id is the URI exactly as given. Ids must be unique: the first row with an id is
embedded and every later row with the same id is reported as a duplicate (stage "manifest").
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.records import FAILED, Failure, ImageRef, Stage

MANIFEST_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
GLOB_CHARACTERS = "*?["
SKIPPED_COUNTER = "skipped_existing"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (raised before the pipeline starts)."""


class ManifestRow(NamedTuple):
    """One manifest row, numbered from 1 in file order; `problem` is set when the row is unusable."""

    row: int
    id: str
    uri: str
    problem: Optional[str] = None
    data: Optional[bytes] = None  # the encoded image, for inputs that carry it (TFRecord)


def input_kind(path: str) -> str:
    """'tfrecord', 'glob' or 'manifest' for `--input`; anything else is a clear error."""
    if ".tfrecord" in os.path.basename(path).lower():
        return "tfrecord"
    if any(ch in path for ch in GLOB_CHARACTERS):
        return "glob"
    if path.lower().endswith(MANIFEST_EXTENSIONS):
        return "manifest"
    if os.path.isdir(path):
        raise ManifestError(f"--input {path} is a directory; give a glob such as '{path.rstrip('/')}/**/*.jpg'.")
    raise ManifestError(
        f"--input {path} is neither a glob nor a manifest ({', '.join(MANIFEST_EXTENSIONS)})."
    )


def _manifest_format(path: str) -> str:
    return os.path.splitext(path.lower())[1].lstrip(".")


def _open_text(path: str):
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    # utf-8-sig drops a BOM; newline="" lets the csv module handle CRLF and quoted newlines.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def check_manifest(path: str) -> None:
    """Fails fast, before any worker starts, on a manifest that is missing or lacks a `uri` column."""
    if not FileSystems.exists(path):
        raise ManifestError(f"Manifest {path} does not exist.")
    fmt = _manifest_format(path)
    if fmt in ("csv", "tsv"):
        with _open_text(path) as f:
            header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), None)
        columns = [c.strip() for c in header or []]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            columns = pq.ParquetFile(f).schema_arrow.names
    else:
        return  # .txt has no columns; a .jsonl row without "uri" is reported per row
    if "uri" not in columns:
        raise ManifestError(f"Manifest {path} has no 'uri' column (columns: {', '.join(columns) or 'none'}).")


def check_input(path: str) -> None:
    """The launcher's checks of `--input`: manifest header, or TFRecord files that exist."""
    kind = input_kind(path)
    if kind == "manifest":
        check_manifest(path)
    elif kind == "tfrecord" and not FileSystems.match([path])[0].metadata_list:
        raise ManifestError(f"--input {path} matches no TFRecord files.")


def read_manifest(path: str) -> Iterator[ManifestRow]:
    """Streams the rows of a manifest without holding it in memory."""
    fmt = _manifest_format(path)
    if fmt == "parquet":
        yield from _read_parquet_manifest(path)
        return
    with _open_text(path) as f:
        if fmt == "txt":
            yield from _read_text_manifest(f)
        elif fmt == "jsonl":
            yield from _read_jsonl_manifest(f)
        else:
            yield from _read_csv_manifest(f, delimiter="," if fmt == "csv" else "\t")


def _row(row: int, uri, id_=None) -> ManifestRow:
    uri = "" if uri is None else str(uri).strip()
    id_ = "" if id_ is None else str(id_).strip()
    if not uri:
        return ManifestRow(row, id_ or f"<row {row}>", "", f"Manifest row {row} has an empty uri.")
    return ManifestRow(row, id_ or uri, uri)


def _read_text_manifest(f) -> Iterator[ManifestRow]:
    for number, line in enumerate(f, start=1):
        uri = line.strip()
        if uri and not uri.startswith("#"):
            yield _row(number, uri)


def _read_csv_manifest(f, delimiter: str) -> Iterator[ManifestRow]:
    reader = csv.DictReader(f, delimiter=delimiter)
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    for number, record in enumerate(reader, start=1):
        if not any((value or "").strip() for value in record.values() if isinstance(value, str)):
            continue  # a blank line
        yield _row(number, record.get("uri"), record.get("id"))


def _read_jsonl_manifest(f) -> Iterator[ManifestRow]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield ManifestRow(number, f"<row {number}>", "", f"Manifest row {number} is not valid JSON ({exc.msg}).")
            continue
        if not isinstance(record, dict):
            yield ManifestRow(number, f"<row {number}>", "", f"Manifest row {number} is not a JSON object.")
            continue
        yield _row(number, record.get("uri"), record.get("id"))


def _read_parquet_manifest(path: str) -> Iterator[ManifestRow]:
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet = pq.ParquetFile(f)
        columns = [c for c in ("uri", "id") if c in parquet.schema_arrow.names]
        number = 0
        for batch in parquet.iter_batches(columns=columns, batch_size=65536):
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * batch.num_rows
            for uri, id_ in zip(batch.column("uri").to_pylist(), ids):
                number += 1
                yield _row(number, uri, id_)


@dataclasses.dataclass(frozen=True)
class TFRecordFeatures:
    """Feature names of tf.train.Example image records (defaults: the ImageNet / TFDS layout)."""

    image: str = "image/encoded"
    id: str = "image/filename"


class ReadTFExampleImages(beam.PTransform):
    """TFRecord files of tf.train.Example -> ManifestRow carrying the encoded image, read through tfx-bsl's TFXIO.

    TFXIO decodes the examples into Arrow record batches natively, so only the two needed features are
    materialised in Python.
    """

    def __init__(self, file_pattern: str, features: TFRecordFeatures):
        super().__init__()
        self._pattern = file_pattern
        self._features = features

    def expand(self, pbegin):
        from tensorflow_metadata.proto.v0 import schema_pb2
        from tfx_bsl.public import tfxio

        schema = schema_pb2.Schema()
        for name in (self._features.image, self._features.id):
            schema.feature.add(name=name, type=schema_pb2.BYTES)
        source = tfxio.TFExampleRecord(self._pattern, schema=schema, telemetry_descriptors=["beam-image-embeddings"])
        return (
            pbegin
            | "ReadExamples" >> source.BeamSource(batch_size=256)
            | "ToRows" >> beam.FlatMap(_rows_from_record_batch, self._pattern, self._features)
        )


def _rows_from_record_batch(batch, pattern: str, features: TFRecordFeatures) -> Iterator[ManifestRow]:
    images = batch.column(features.image).to_pylist()
    ids = batch.column(features.id).to_pylist()
    for images_of_row, ids_of_row in zip(images, ids):
        id_ = ids_of_row[0].decode("utf-8", "replace") if ids_of_row else ""
        uri = f"{pattern}#{id_}"
        if not id_:
            yield ManifestRow(0, "<record without id>", pattern, f"A record in {pattern} has no '{features.id}'.")
        elif not images_of_row:
            yield ManifestRow(0, id_, uri, f"Record {id_} has no '{features.image}' feature.")
        else:
            yield ManifestRow(0, id_, uri, data=images_of_row[0])


class _KeepFirstRowPerId(beam.DoFn):
    """After grouping by id: the lowest-numbered row is the input, the others are reported.

    An id already embedded by a previous run (`--skip_existing`) is skipped with all its rows.
    """

    def __init__(self):
        self._duplicates = Metrics.counter("embeddings", "duplicate_ids")
        self._skipped = Metrics.counter("embeddings", SKIPPED_COUNTER)

    def process(self, id_and_groups):
        id_, groups = id_and_groups
        rows = sorted(groups["rows"], key=lambda row: row.row)
        if not rows:
            return  # an id of the previous output that this run's input does not list
        if any(True for _ in groups["previous"]):
            self._skipped.inc(len(rows))
            return
        first, *others = rows
        yield ImageRef(id_, first.uri, first.data)
        for row in others:
            self._duplicates.inc()
            message = f"Duplicate id: row {row.row} repeats the id of row {first.row}, which is the one embedded."
            yield beam.pvalue.TaggedOutput(FAILED, Failure(id_, row.uri, Stage.MANIFEST, message))


def _split_problems(row: ManifestRow):
    if row.problem:
        yield beam.pvalue.TaggedOutput(FAILED, Failure(row.id, row.uri, Stage.MANIFEST, row.problem))
    else:
        yield row


class ReadImageRefs(beam.PTransform):
    """`--input` -> {main: ImageRef with unique ids, FAILED: Failure}.

    Grouping by id both enforces the duplicate rule and redistributes the inputs across workers,
    so no separate Reshuffle is needed. With `previous_embeddings` (a glob of an earlier run's
    embeddings files) the same grouping drops ids that are already embedded.
    """

    def __init__(
        self,
        input_path: str,
        previous_embeddings: Optional[str] = None,
        tfrecord_features: TFRecordFeatures = TFRecordFeatures(),
    ):
        super().__init__()
        self._input = input_path
        self._kind = input_kind(input_path)
        self._previous = previous_embeddings
        self._tfrecord_features = tfrecord_features

    def expand(self, pbegin):
        if self._kind == "glob":
            rows = (
                pbegin
                | "Pattern" >> beam.Create([self._input])
                | "MatchFiles" >> fileio.MatchAll()
                | "ToRows" >> beam.Map(lambda metadata: ManifestRow(0, metadata.path, metadata.path))
            )
        elif self._kind == "tfrecord":
            rows = pbegin | "ReadTFRecords" >> ReadTFExampleImages(self._input, self._tfrecord_features)
        else:
            rows = (
                pbegin
                | "Manifest" >> beam.Create([self._input])
                | "ReadManifest" >> beam.FlatMap(read_manifest)
            )
        usable = rows | "SplitUnusable" >> beam.FlatMap(_split_problems).with_outputs(FAILED, main="rows")
        keyed = {"rows": usable.rows | "KeyById" >> beam.Map(lambda row: (row.id, row))}
        if self._previous:
            keyed["previous"] = (
                pbegin
                | "ReadPreviousIds" >> beam.io.ReadFromParquet(self._previous, columns=["id"])
                | "KeyPreviousIds" >> beam.Map(lambda record: (record["id"], None))
            )
        else:
            keyed["previous"] = pbegin | "NoPreviousIds" >> beam.Create([])
        unique = (
            keyed
            | "GroupById" >> beam.CoGroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstRowPerId()).with_outputs(FAILED, main="refs")
        )
        failures = (usable[FAILED], unique[FAILED]) | "Failures" >> beam.Flatten()
        return {"refs": unique.refs, FAILED: failures}
