"""Manifests in every format yield (row, id, uri); the id defaults to the URI exactly as given."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms.source import ManifestError, ManifestRow, check_manifest, input_kind, read_manifest


def _rows(path):
    return [(r.id, r.uri) for r in read_manifest(str(path)) if not r.problem]


def test_input_kind_tells_globs_from_manifests(tmp_path):
    assert input_kind("/data/**/*.jpg") == "glob"
    assert input_kind("gs://bucket/img?.png") == "glob"
    for ext in ("txt", "csv", "tsv", "jsonl", "parquet", "CSV"):
        assert input_kind(f"/m/list.{ext}") == "manifest"
    with pytest.raises(ManifestError, match="is a directory; give a glob"):
        input_kind(str(tmp_path))
    with pytest.raises(ManifestError, match="neither a glob nor a manifest"):
        input_kind("/data/photo.jpg")


def test_txt_manifest_skips_blank_and_comment_lines_and_uses_the_uri_as_id(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes("\ufeff/a/one.jpg\r\n\r\n# a comment\r\n  gs://b/two words.png  \r\n/a/été.jpg\n".encode())
    assert _rows(path) == [("/a/one.jpg", "/a/one.jpg"), ("gs://b/two words.png", "gs://b/two words.png"),
                           ("/a/été.jpg", "/a/été.jpg")]


def test_csv_manifest_reads_quoted_fields_and_optional_ids(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,uri,label\r\nx1,"/a/with, comma.jpg",cat\r\n,/a/no-id.jpg,dog\r\n\r\n', encoding="utf-8")
    assert _rows(path) == [("x1", "/a/with, comma.jpg"), ("/a/no-id.jpg", "/a/no-id.jpg")]


def test_tsv_manifest_without_id_column(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("uri\tsize\n/a/1.jpg\t10\n/a/2.jpg\t20\n")
    assert _rows(path) == [("/a/1.jpg", "/a/1.jpg"), ("/a/2.jpg", "/a/2.jpg")]


def test_jsonl_manifest_reports_unusable_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": 7, "uri": "/a/7.jpg"}), "", json.dumps({"uri": "/a/u.jpg"}), "{broken", "[1]",
             json.dumps({"id": "no-uri"})]
    path.write_text("\n".join(lines) + "\n")
    rows = list(read_manifest(str(path)))
    assert [(r.id, r.uri) for r in rows if not r.problem] == [("7", "/a/7.jpg"), ("/a/u.jpg", "/a/u.jpg")]
    problems = {r.row: r.problem for r in rows if r.problem}
    assert problems == {4: "Manifest row 4 is not valid JSON (Expecting property name enclosed in double quotes).",
                        5: "Manifest row 5 is not a JSON object.", 6: "Manifest row 6 has an empty uri."}


def test_parquet_manifest_with_integer_ids(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["/a/1.jpg", "/a/2.jpg"], "id": [101, 102]}), path)
    assert _rows(path) == [("101", "/a/1.jpg"), ("102", "/a/2.jpg")]


def test_rows_are_numbered_in_file_order(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("/a\n\n/b\n")
    assert list(read_manifest(str(path))) == [ManifestRow(1, "/a", "/a"), ManifestRow(3, "/b", "/b")]


@pytest.mark.parametrize("name, content", [("m.csv", "id,path\n1,/a.jpg\n"), ("m.tsv", "")])
def test_a_manifest_without_uri_column_is_refused_before_the_run(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ManifestError, match="has no 'uri' column"):
        check_manifest(str(path))


def test_a_missing_manifest_is_refused_before_the_run(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        check_manifest(str(tmp_path / "nope.csv"))
