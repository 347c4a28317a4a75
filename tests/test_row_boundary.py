"""Whatever a manifest row or a TFRecord record holds, it costs that row: every row ends in exactly one output,
once, and the job goes on.

The rows are generated (hypothesis): good images, missing files, malformed URLs, unknown schemes, arbitrary
unicode, lone surrogates, NUL, control characters, very long fields and repeated ids, written in every manifest
format. The expected outcome of each row comes from a reference written here from the rules as the README states
them (first usable row of an id wins; an id must be UTF-8 text without NUL of at most 2,048 bytes), not from
the reading code.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import examples, read_embeddings, read_errors, run_and_collect, run_pipeline, tiles

MAX_ID_BYTES = 2048
FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet", "tfrecord")
BAD_URIS = ("http://[broken/x.jpg", "gs://bucket[1]/x.jpg", "file://[x/y.jpg", "ftp://host/x.jpg",
            "mailto:someone@example.com", "http:///no-host.jpg", "gs:///no-bucket.jpg", "http://h:port/x.jpg",
            "javascript:alert(1)", "s3://")

# Text with no line breaks (a manifest row is one line): any other unicode, control characters included.
line_text = st.text(st.characters(exclude_characters="\n\r", exclude_categories=("Cs",)), max_size=40)
evil_ids = st.one_of(
    st.builds(lambda a, b: f"{a}\ud800{b}", line_text, line_text),  # a lone surrogate: valid JSON, not UTF-8
    st.builds(lambda a, b: f"{a}\x00{b}", line_text, line_text),
    st.builds(lambda n: "i" * n, st.integers(MAX_ID_BYTES + 1, MAX_ID_BYTES + 300)),
)


@st.composite
def rows(draw):
    """[(id or None, uri kind, uri text)]: kind is good / missing / malformed (a uri no reader takes) / free."""
    count = draw(st.integers(1, 14))
    shared_ids = draw(st.lists(st.one_of(st.from_regex(r"[a-z0-9._/-]{1,12}", fullmatch=True), line_text,
                                         evil_ids), min_size=1, max_size=4))
    out = []
    for number in range(count):
        kind = draw(st.sampled_from(("good", "good", "missing", "malformed", "free")))
        uri = {"good": lambda: draw(st.sampled_from(("GOOD0", "GOOD1", "GOOD2"))),
               "missing": lambda: f"/nonexistent/{number}.png",
               "malformed": lambda: draw(st.sampled_from(BAD_URIS)),
               "free": lambda: f"free{number}:" + draw(line_text)}[kind]()
        id_ = None if draw(st.booleans()) and kind != "free" else draw(st.sampled_from(shared_ids))
        if kind == "free":  # arbitrary text of unknown fate: an id of its own, so it never competes for one
            id_ = f"free-{number}"
        out.append((id_, kind, uri))
    return out


def _valid_id(id_: str) -> bool:
    try:
        encoded = id_.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in id_ and len(encoded) <= MAX_ID_BYTES


def as_written(generated, fmt, images):
    """The rows as format `fmt` holds them: GOOD0..2 resolved to image files; .txt has no ids, TSV no tabs."""
    written = []
    for id_, kind, uri in generated:
        uri = images.get(uri, uri)
        if fmt == "txt":
            id_ = None
        if fmt == "tsv":
            id_, uri = (None if id_ is None else id_.replace("\t", " ")), uri.replace("\t", " ")
        written.append((id_, kind, uri))
    return written


def expected(written, fmt):
    """(embedded {id: uri}, the ids of failure rows that keep their id, the ids rows of unknown fate may keep,
    failure rows in all) by the README's rules:
    ids and uris are stripped (not in TFRecord), a row without an id is named by its uri, the first usable row
    of an id wins."""
    winners, embedded, failing_ids, free_ids, failures = {}, {}, collections.Counter(), collections.Counter(), 0
    for id_, kind, uri in written:
        if fmt == "txt" and (not uri.strip() or uri.strip().startswith("#")):
            continue  # a blank or comment line is no row
        effective = (id_ or uri) if fmt == "tfrecord" else (id_ or "").strip() or uri.strip()
        if not _valid_id(effective) or (fmt == "tfrecord" and not effective):
            failures += 1
            continue
        if kind in ("malformed", "free") and fmt != "tfrecord":
            failures += 1  # refused or failing at some stage; never competes for its id
            (failing_ids if kind == "malformed" else free_ids)[effective] += 1
            continue
        failures += 0 if effective not in winners and kind == "good" else 1
        if effective in winners:
            failing_ids[effective] += 1  # a duplicate
        elif kind == "good":
            embedded[effective] = uri
            winners[effective] = uri
        else:
            winners[effective] = uri
            failing_ids[effective] += 1
    return embedded, failing_ids, free_ids, failures


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def write_manifest(folder, fmt, written):
    """The rows in format `fmt` (TFRecord: the image files' bytes, the uri's text as junk bytes otherwise)."""
    resolved = [(id_, uri) for id_, _, uri in written]
    path = os.path.join(folder, f"m.{fmt}")
    if fmt == "txt":
        with open(path, "wb") as f:
            f.write(b"".join(_utf8(uri) + b"\n" for _, uri in resolved))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(["id", "uri"])
        writer.writerows([id_ or "", uri] for id_, uri in resolved)
        with open(path, "wb") as f:
            f.write(_utf8(buffer.getvalue()))
    elif fmt == "tsv":  # no quoting at all: a field is the text between tabs
        with open(path, "wb") as f:
            f.write(_utf8("id\turi\n" + "".join(f"{id_ or ''}\t{uri}\n" for id_, uri in resolved)))
    elif fmt == "jsonl":
        with open(path, "w") as f:
            f.write("".join(json.dumps({"uri": uri, **({"id": id_} if id_ is not None else {})}) + "\n"
                            for id_, uri in resolved))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": pa.array([_utf8(i) if i is not None else None for i, _ in resolved],
                                                pa.binary()),
                                 "uri": pa.array([_utf8(u) for _, u in resolved], pa.binary())}), path)
    else:
        path = os.path.join(folder, "m.tfrecord")
        write_tfrecord(path, [(_utf8(id_ or uri), _image_bytes(uri)) for id_, uri in resolved])
    return path


def _image_bytes(uri):
    if os.path.isfile(uri):
        with open(uri, "rb") as f:
            return f.read()
    return _utf8(uri)  # not an image: a decode failure


def masked_crc(data: bytes) -> int:
    """TFRecord's masked crc32c, written out here from the format's definition (tensorflow/core/lib/hash)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _example(id_: bytes, image: bytes) -> bytes:
    import tensorflow as tf

    def feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/filename": feature(id_), "image/encoded": feature(image)})).SerializeToString()


def tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def write_tfrecord(path, records):
    with open(path, "wb") as f:
        f.write(b"".join(tfrecord_frame(_example(id_, image)) for id_, image in records))


def read_every_format(folder, written):
    """The real reading path (source and decode) over the rows written in every format, in one Beam job:
    [(format, 'embedded' or 'failed', id, uri)]."""
    import apache_beam as beam

    from transforms.decode import DecodeImages, PreprocessConfig
    from transforms.records import FAILED
    from transforms.source import ReadImageRefs

    paths = {fmt: write_manifest(folder, fmt, written[fmt]) for fmt in FORMATS}

    def build(p):
        outputs = []
        for fmt, path in paths.items():
            inputs = p | f"Read{fmt}" >> ReadImageRefs(path)
            decoded = inputs["refs"] | f"Decode{fmt}" >> DecodeImages(PreprocessConfig(image_size=16))
            outputs += [
                decoded.decoded | f"Ok{fmt}" >> beam.Map(lambda d, fmt=fmt: (fmt, "embedded", d.id, d.uri)),
                (inputs[FAILED], decoded[FAILED]) | f"Failures{fmt}" >> beam.Flatten()
                | f"Failed{fmt}" >> beam.Map(lambda f, fmt=fmt: (fmt, "failed", f.id, f.uri)),
            ]
        return outputs | beam.Flatten()

    return run_and_collect(build)


@pytest.fixture(scope="module")
def good_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    return {f"GOOD{n}": path for n, path in enumerate(tiles(folder, 3))}


@settings(max_examples=examples(12), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(generated=rows())
def test_every_row_of_every_format_ends_in_exactly_one_output(tmp_path_factory, good_images, generated):
    folder = str(tmp_path_factory.mktemp("rows"))
    written = {fmt: as_written(generated, fmt, good_images) for fmt in FORMATS}
    outputs = read_every_format(folder, written)
    for fmt in FORMATS:
        embedded, failing_ids, free_ids, failures = expected(written[fmt], fmt)
        if fmt == "tfrecord":
            embedded = {id_: f"{folder}/m.tfrecord#{id_}" for id_ in embedded}
        mine = [o for o in outputs if o[0] == fmt]
        got = [(id_, uri) for _, outcome, id_, uri in mine if outcome == "embedded"]
        assert sorted(got) == sorted(embedded.items()), fmt
        failed = [id_ for _, outcome, id_, _ in mine if outcome == "failed"]
        assert len(failed) == failures, fmt  # every other row once: nothing dropped, nothing twice
        named = collections.Counter(i for i in failed if not i.startswith(("<row", "<record")))
        assert not named - failing_ids - free_ids, fmt
        for id_, count in failing_ids.items():
            assert named[id_] == count, (fmt, id_)


# --- TFRecord framing: damaged records are their own failures, a damaged length ends the file ---------------

@settings(max_examples=examples(30), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 6), damage=st.sampled_from(("data", "length", "truncate", "huge_length")),
       at=st.integers(0, 5), byte=st.integers(0, 10_000))
def test_a_damaged_tfrecord_costs_its_record_or_its_tail(tmp_path_factory, good_images, count, damage, at, byte):
    from transforms.tfrecord import TFRecordFeatures, read_tfrecord_file

    at = at % count
    with open(good_images["GOOD0"], "rb") as f:
        image = f.read()
    frames = [tfrecord_frame(_example(f"r{n}".encode(), image)) for n in range(count)]
    if damage == "data":  # one byte of record `at`'s data: its CRC fails, the others are whole
        frame = bytearray(frames[at])
        frame[12 + byte % (len(frame) - 16)] ^= 0xFF
        frames[at] = bytes(frame)
        whole, failed = [n for n in range(count) if n != at], 1
    elif damage == "length":  # a length field no longer matching its CRC: nothing after it can be found
        frames[at] = struct.pack("<Q", 2**62 + 100) + frames[at][8:]
        whole, failed = list(range(at)), 1
    elif damage == "huge_length":  # a well-framed length that is far too big: refused without allocating it
        length = struct.pack("<Q", 2**62 + 100)
        frames[at] = length + struct.pack("<I", masked_crc(length)) + frames[at][12:]
        whole, failed = list(range(at)), 1
    else:  # the file cut inside record `at`
        frames[at] = frames[at][:byte % len(frames[at])]
        frames = frames[:at + 1]
        whole, failed = list(range(at)), 1 if frames[at] else 0
    path = str(tmp_path_factory.mktemp("tfr") / "d.tfrecord")
    with open(path, "wb") as f:
        f.write(b"".join(frames))
    rows = list(read_tfrecord_file(path, TFRecordFeatures(), 1 << 20))
    assert [r.id for r in rows if not r.problem] == [f"r{n}" for n in whole]
    assert all(r.data == image for r in rows if not r.problem)
    assert len([r for r in rows if r.problem]) == failed


# --- The reproductions, through the whole job --------------------------------------------------------------

def test_a_job_over_every_kind_of_bad_row_succeeds_and_reports_each(tmp_path, mobilenet_handle):
    good = tiles(tmp_path / "img", 2)
    manifest = tmp_path / "m.jsonl"
    lines = [{"uri": good[0]}, {"uri": good[1], "id": "second"}, {"uri": "http://[broken/x.jpg"},
             {"uri": "gs://bucket[1]/x.jpg"}, {"uri": "file://[x/y.jpg"}, {"uri": good[0], "id": "bad\ud800id"},
             {"uri": good[0], "id": "nul\x00id"}, {"uri": "/etc/passwd", "id": "passwd"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run_pipeline("--input", str(manifest), "--output", str(out), "--model_handle", mobilenet_handle) == 0
    assert sorted(read_embeddings(str(out)).column("id").to_pylist()) == sorted([good[0], "second"])
    errors = read_errors(str(out)).to_pylist()
    assert len(errors) == len(lines) - 2
    text = " ".join(e["error"] for e in errors)
    assert "lone surrogate" in text and "NUL" in text and "not a valid URL" in text
    passwd = next(e for e in errors if e["id"] == "passwd")
    assert passwd["stage"] == "decode" and "root" not in passwd["error"] and "it holds text" in passwd["error"]


def test_a_tfrecord_with_a_damaged_length_is_embedded_up_to_it(tmp_path, mobilenet_handle):
    images = tiles(tmp_path / "img", 3)
    frames = []
    for n, path in enumerate(images):
        with open(path, "rb") as f:
            frames.append(tfrecord_frame(_example(f"r{n}".encode(), f.read())))
    frames[1] = frames[1][:12] + b"\x00" + frames[1][13:]  # a data byte: record 1's CRC fails
    frames[2] = struct.pack("<Q", 2**62 + 100) + frames[2][8:]  # a damaged length: the tail is one failure
    (tmp_path / "d.tfrecord").write_bytes(b"".join(frames))
    out = tmp_path / "out"
    assert run_pipeline("--input", str(tmp_path / "d.tfrecord"), "--output", str(out), "--model_handle",
                        mobilenet_handle) == 0
    assert read_embeddings(str(out)).column("id").to_pylist() == ["r0"]
    record1, record2 = sorted(e["error"] for e in read_errors(str(out)).to_pylist())
    assert "record 1 of" in record1 and "data CRC does not match" in record1
    assert "record 2 of" in record2 and "damaged length field" in record2
