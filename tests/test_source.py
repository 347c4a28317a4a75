"""Inputs: manifests in every format, read in parallel, one row per line; folders and globs; what `--input` is."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import run_and_collect
from transforms.manifest import ManifestError, ReadManifest, _ManifestLines, check_manifest, count_manifest_rows
from transforms.source import InputPlan, ReadImageRefs, glob_variants, input_kind, plan_input


def _read(path):
    """All ManifestRows of a manifest, through the Beam transform the pipeline uses."""
    rows = run_and_collect(lambda p: p | ReadManifest(str(path), check_manifest(str(path))))
    return sorted(rows, key=lambda r: r.order)


def _usable(path):
    return [(r.id, r.uri) for r in _read(path) if not r.problem]


def _problems(path):
    return [(r.where, r.problem) for r in _read(path) if r.problem]


def test_input_kind_is_decided_by_what_exists(tmp_path):
    assert input_kind("/data/**/*.jpg") == "glob"
    assert input_kind("gs://bucket/img?.png") == "glob"
    for ext in ("txt", "csv", "tsv", "jsonl", "parquet", "CSV"):
        assert input_kind(f"/m/list.{ext}") == "manifest"
    assert input_kind(str(tmp_path)) == "directory"
    assert input_kind("gs://bucket/photos/") == "directory"
    assert input_kind("gs://b/train.tfrecord-*") == "tfrecord"
    assert input_kind("/m/x.tfrecord.csv") == "manifest"  # the extension says manifest
    odd = tmp_path / "list[1]?.txt"
    odd.write_text("/a.jpg\n")
    assert input_kind(str(odd)) == "manifest"  # it exists, so it is not a glob
    assert _usable(odd) == [("/a.jpg", "/a.jpg")]
    with pytest.raises(ManifestError, match="not a folder, a glob, TFRecord files or a manifest"):
        input_kind("/data/photo.jpg")


def test_txt_manifest_skips_blank_and_comment_lines_and_uses_the_uri_as_id(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes("\ufeff/a/one.jpg\r\n\r\n# a comment\r\n  gs://b/two words.png  \r\n/a/été.jpg\n".encode())
    assert _usable(path) == [("/a/one.jpg", "/a/one.jpg"), ("gs://b/two words.png", "gs://b/two words.png"),
                             ("/a/été.jpg", "/a/été.jpg")]
    assert count_manifest_rows(str(path)) == 3


def test_csv_manifest_reads_quoted_fields_and_optional_ids(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,uri,label\r\nx1,"/a/with, comma.jpg",cat\r\n,/a/no-id.jpg,dog\r\n\r\n', encoding="utf-8")
    assert _usable(path) == [("x1", "/a/with, comma.jpg"), ("/a/no-id.jpg", "/a/no-id.jpg")]
    assert count_manifest_rows(str(path)) == 2


def test_a_stray_quote_fails_its_own_row_and_never_swallows_the_next_ones(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,uri\na,"/a.jpg\nb,/b.jpg\nc,/c.jpg\nd,"/d.jpg"x\ne,/e' + "x" * 200_000 + '.jpg\n')
    assert _usable(path) == [("b", "/b.jpg"), ("c", "/c.jpg"), ("e", "/e" + "x" * 200_000 + ".jpg")]
    problems = _problems(path)
    assert [where for where, _ in problems] == ["row at byte 7", "row at byte 35"]
    assert all("is not valid CSV" in problem for _, problem in problems)


def test_a_quoted_field_split_by_a_newline_fails_both_lines_and_gives_no_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,uri\n"photo 1\ncopy",/x/img01.png\nok,/x/img02.png\nq,"/x/""quoted"".png"\n')
    assert _usable(path) == [("ok", "/x/img02.png"), ("q", '/x/"quoted".png')]
    problems = _problems(path)
    assert [where for where, _ in problems] == ["row at byte 7", "row at byte 16"]
    assert "a quote inside a field that does not start with one" in problems[1][1]


def test_tsv_has_no_quoting(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text('uri\tid\n"/a/1.jpg\tone\n/a/2.jpg\ttwo\n/a/3.jpg\tthree\textra\n')
    assert _usable(path) == [("one", '"/a/1.jpg'), ("two", "/a/2.jpg")]
    assert [p for _, p in _problems(path)] == ["Manifest row at byte 34 has 3 fields, the header has 2 (uri, id)."]


def test_a_line_that_is_not_utf8_is_reported_and_the_others_are_read(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes(b"/a/1.jpg\n" + b"/a/" + b"x" * 2000 + b"\n/a/caf\xe9.jpg\n/a/3.jpg\n")
    assert [uri for _, uri in _usable(path)] == ["/a/1.jpg", "/a/" + "x" * 2000, "/a/3.jpg"]
    [(where, problem)] = _problems(path)
    assert problem == f"Manifest {where} is not UTF-8 (byte 0xe9 at position 6); save the manifest as UTF-8."


def test_a_csv_header_that_is_not_utf8_is_refused_before_the_run(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,ur\xefi\n1,/a.jpg\n")
    with pytest.raises(ManifestError, match="header of manifest .* is not UTF-8 .byte 0xef"):
        check_manifest(str(path))


def test_jsonl_manifest_reports_unusable_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": 7, "uri": "/a/7.jpg"}), "", json.dumps({"uri": "/a/u.jpg"}), "{broken", "[1]",
             json.dumps({"id": "no-uri"})]
    path.write_text("\n".join(lines) + "\n")
    assert _usable(path) == [("7", "/a/7.jpg"), ("/a/u.jpg", "/a/u.jpg")]
    assert [p for _, p in _problems(path)] == [
        "Manifest row at byte 50 is not valid JSON (Expecting property name enclosed in double quotes).",
        "Manifest row at byte 58 is not a JSON object.", "Manifest row at byte 62 has an empty uri."]


def test_parquet_manifest_ids_integer_and_binary_float_refused(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["/a/1.jpg", "/a/2.jpg"], "id": [101, 102]}), path)
    assert _usable(path) == [("101", "/a/1.jpg"), ("102", "/a/2.jpg")]
    pq.write_table(pa.table({"uri": [b"/a/1.jpg", b"/a/\xff.jpg"], "id": pa.array([b"abc", b"d"], pa.binary())}), path)
    assert _usable(path) == [("abc", "/a/1.jpg")]
    assert _problems(path) == [("row 2", "Manifest row 2 holds bytes that are not UTF-8 in 'uri' or 'id'.")]
    pq.write_table(pa.table({"uri": ["/a/1.jpg"], "id": [1.0]}), path)
    with pytest.raises(ManifestError, match="column 'id' has type double; it must be a string or an integer"):
        check_manifest(str(path))


def test_parquet_manifests_are_read_by_row_group_with_row_numbers(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/a/{i}.jpg" for i in range(10)]}), path, row_group_size=3)
    rows = _read(path)
    assert [r.where for r in rows] == [f"row {i}" for i in range(1, 11)]
    assert count_manifest_rows(str(path)) == 10


def test_text_manifests_split_into_byte_ranges_that_hold_every_line_once(tmp_path):
    path = tmp_path / "m.txt"
    lines = [f"/images/{i:05d}-{'x' * (i % 37)}.jpg" for i in range(3000)]
    path.write_text("\n".join(lines))  # no final newline
    source = _ManifestLines(str(path))
    splits = list(source.split(desired_bundle_size=997))
    assert len(splits) > 50
    read = [record for split in splits for record in split.source.read(split.source.get_range_tracker(
        split.start_position, split.stop_position))]
    assert [line.decode().strip() for _, line in read] == lines
    assert len({offset for offset, _ in read}) == len(lines)


@pytest.mark.parametrize("name, content", [("m.csv", "id,path\n1,/a.jpg\n"), ("m.tsv", "")])
def test_a_manifest_without_uri_column_is_refused_before_the_run(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ManifestError, match="has no 'uri' column"):
        check_manifest(str(path))


def test_a_missing_manifest_is_refused_before_the_run(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        check_manifest(str(tmp_path / "nope.csv"))


def test_double_star_matches_zero_or_more_folders():
    assert glob_variants("/p/**/*.jpg") == ["/p/**/*.jpg", "/p/*.jpg"]
    assert glob_variants("gs://b/**/x/**/*.png") == ["gs://b/**/x/**/*.png", "gs://b/**/x/*.png",
                                                     "gs://b/x/**/*.png", "gs://b/x/*.png"]


@pytest.fixture
def photo_tree(tmp_path):
    """A folder of images at every depth, unicode names, mixed-case extensions, and files that are not images."""
    root = tmp_path / "photos"
    files = ["top.jpg", "TOP2.JPG", "été/chat.jpeg", "a/b/c/deep.png", "a/b/shot.WebP", "a/x/x/x.jpg"]
    for name in files + ["notes.txt", "a/.DS_Store", "a/b/raw.cr2"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root, sorted(str(root / f) for f in files)


def _ids(input_path):
    return sorted(ref.id for ref in run_and_collect(lambda p: (p | ReadImageRefs(input_path))["refs"]))


def test_a_folder_gives_every_image_under_it_and_says_what_it_left_out(photo_tree):
    root, images = photo_tree
    assert _ids(str(root)) == images
    plan = plan_input(str(root))
    assert plan == InputPlan("directory", len(images), "files", left_out=3)
    assert plan.describe(str(root)) == (
        f"Reading --input {root} as a folder: 6 image files under it; 3 other files left out by extension "
        f"(images: .jpg, .jpeg, .jpe, .png, .gif, .bmp, .webp, .tif, .tiff).")


@pytest.mark.parametrize("pattern, expected", [
    ("**/*.jpg", ["top.jpg", "a/x/x/x.jpg"]),
    ("**", None),
    ("a/**/x/**/*.jpg", ["a/x/x/x.jpg"]),
])
def test_globs_match_zero_or_more_folders_and_each_file_once(photo_tree, pattern, expected):
    root, _ = photo_tree
    found = _ids(f"{root}/{pattern}")
    if expected is None:
        assert len(found) == 9
    else:
        assert found == sorted(str(root / e) for e in expected)
    assert plan_input(f"{root}/{pattern}").inputs == len(found)
