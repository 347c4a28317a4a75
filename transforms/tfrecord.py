"""TFRecord files of tf.train.Example images -> rows, with TFRecord's framing checked record by record.

A TFRecord record is `length (8 bytes) | masked crc32c of length | data | masked crc32c of data`. The length
is trusted only once its CRC matches, so a damaged length never becomes an allocation; a record over the size
limit is skipped without being held; a record whose data CRC fails is that record's failure. A damaged length
ends what can be read of the file: its tail is one failure row, since the records after it cannot be found.

The files are read twice, so that the encoded images are never shuffled: once for the ids (the duplicate-id
rule groups ids only, as for manifests), then again for the images of the records that rule kept, fused with
decoding (source.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.manifest import ManifestRow, checked_row
from transforms.records import ImageRef, describe_exception

_EXAMPLES_PER_DECODE = 256
_SKIP_CHUNK = 1 << 20
# A tf.train.Example around an image holds a few hundred bytes more than the image.
_EXAMPLE_OVERHEAD = 1 << 16


@dataclasses.dataclass(frozen=True)
class TFRecordFeatures:
    """Feature names of tf.train.Example image records (defaults: the ImageNet / TFDS layout)."""

    image: str = "image/encoded"
    id: str = "image/filename"


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: crc32c, rotated and offset (so that a CRC of CRCs is not trivially valid)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _skip(f, count: int) -> bool:
    """Reads past `count` bytes a chunk at a time; False when the file ends first."""
    while count > 0:
        chunk = f.read(min(count, _SKIP_CHUNK))
        if not chunk:
            return False
        count -= len(chunk)
    return True


def tfrecords(f, max_bytes: int) -> Iterator[tuple]:
    """(index, record bytes or None, problem or None) of each record of the open file `f`."""
    for index in itertools.count():
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            yield index, None, f"is truncated ({len(header)} of the 12 bytes of a record header)"
            return
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            yield index, None, ("has a damaged length field (its CRC does not match): this record and the rest "
                                "of the file cannot be read")
            return
        if length > max_bytes:
            if not _skip(f, length + 4):
                yield index, None, f"is truncated (a record of {length:,} bytes announced)"
                return
            yield index, None, f"is {length:,} bytes, over the {max_bytes:,}-byte limit (--max_image_bytes)"
            continue
        record, footer = f.read(length), f.read(4)
        if len(record) < length or len(footer) < 4:
            yield index, None, f"is truncated ({len(record):,} of the {length:,} bytes announced)"
            return
        if masked_crc32c(record) != struct.unpack("<I", footer)[0]:
            yield index, None, "is damaged (its data CRC does not match)"
            continue
        yield index, record, None


def read_tfrecord_file(path: str, features: TFRecordFeatures, max_image_bytes: int) -> Iterator[ManifestRow]:
    """One TFRecord file -> a ManifestRow per record (the image in `data`), in record order.

    tfx-bsl decodes the serialized examples a batch at a time into Arrow natively, so only the two
    needed features are materialised in Python.
    """
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.coders.example_coder import ExamplesToRecordBatchDecoder

    schema = schema_pb2.Schema()
    for name in (features.image, features.id):
        schema.feature.add(name=name, type=schema_pb2.BYTES)
    decoder = ExamplesToRecordBatchDecoder(schema.SerializeToString())
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
            records = tfrecords(f, max_image_bytes + _EXAMPLE_OVERHEAD)
            while chunk := list(itertools.islice(records, _EXAMPLES_PER_DECODE)):
                yield from _rows_from_records(path, chunk, decoder, features)
    except OSError as exc:  # a compressed file whose stream is damaged
        where = f"the rest of {path}"
        yield ManifestRow((path, float("inf")), where, f"<{where}>", path,
                          f"The TFRecord file {path} could not be read to its end ({describe_exception(exc)}).")


def _failed(path: str, index: int, problem: str) -> ManifestRow:
    where = f"record {index} of {path}"
    return ManifestRow((path, index), where, f"<{where}>", path, f"The TFRecord {where} {problem}.")


def _rows_from_records(path, chunk, decoder, features) -> Iterator[ManifestRow]:
    complete = [(index, record) for index, record, _ in chunk if record is not None]
    for index, record, problem in chunk:
        if record is None:
            yield _failed(path, index, problem)
    try:
        batch = decoder.DecodeBatch([record for _, record in complete])
    except Exception:  # one bad example fails the batch: decode one by one to report just that one
        for index, record in complete:
            try:
                yield from _rows_from_batch(path, [index], decoder.DecodeBatch([record]), features)
            except Exception:
                yield _failed(path, index, "is not a tf.train.Example")
        return
    yield from _rows_from_batch(path, [index for index, _ in complete], batch, features)


def _rows_from_batch(path, indices, batch, features) -> Iterator[ManifestRow]:
    images = batch.column(features.image).to_pylist()
    ids = batch.column(features.id).to_pylist()
    for index, images_of_row, ids_of_row in zip(indices, images, ids):
        order, where = (path, index), f"record {index} of {path}"
        try:
            id_ = ids_of_row[0].decode("utf-8") if ids_of_row else ""
        except UnicodeDecodeError as exc:
            yield _failed(path, index, f"has an id that is not UTF-8 (byte {ids_of_row[0][exc.start]:#04x} at "
                                       f"position {exc.start})")
            continue
        if not id_:
            yield _failed(path, index, f"has no '{features.id}'")
        elif not images_of_row:
            row = checked_row(order, where, id_, f"{path}#{id_}", what="The TFRecord", check_uri=False)
            yield row if row.problem else row._replace(problem=f"Record {id_} has no '{features.image}' feature.")
        else:
            yield checked_row(order, where, id_, f"{path}#{id_}", what="The TFRecord",
                              check_uri=False)._replace(data=images_of_row[0])


class KeptImages(beam.DoFn):
    """The second read: a TFRecord file -> ImageRef (image included) of each usable record the duplicate-id rule
    kept; `passed_over` (a side input) holds the (file, index) of the rows it did not keep."""

    def __init__(self, features: TFRecordFeatures, max_image_bytes: int):
        self._features, self._max_image_bytes = features, max_image_bytes
        self._grouped_for, self._dropped = None, {}

    def process(self, path: str, passed_over):
        if passed_over is not self._grouped_for:  # grouped once per side input, not once per file
            self._dropped = {}
            for file, index in passed_over:
                self._dropped.setdefault(file, set()).add(index)
            self._grouped_for = passed_over
        dropped = self._dropped.get(path, set())
        for row in read_tfrecord_file(path, self._features, self._max_image_bytes):
            if row.problem is None and row.order[1] not in dropped:
                yield ImageRef(row.id, row.uri, row.data)
