"""The whole job on DirectRunner, both models: inputs in, Parquet out, every input accounted for once.

Each embedding must equal what calling the model directly on the same preprocessed pixels gives.
"""

import glob
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import (
    PHOTO_NAMES,
    assert_matches_direct_calls,
    direct_vectors,
    encode,
    photo,
    read_embeddings,
    read_errors,
    run_pipeline,
    vectors_by_id,
)
from pipeline.models import MODELS

MOBILENET, INCEPTION = MODELS["mobilenet_v2_130_224"], MODELS["inception_resnet_v2"]
FORMATS = [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tif")]


def _write_photo_corpus(root, names, sizes=((360, 240), (240, 320), (500, 500), (200, 150))):
    """Real photos, resized to web-like shapes, spread over every format and a nested folder."""
    paths = []
    for index, name in enumerate(names):
        fmt, ext = FORMATS[index % len(FORMATS)]
        folder = root / ("nested" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo(name)).resize(sizes[index % len(sizes)])
        path = folder / f"{name}.{ext}"
        path.write_bytes(encode(image, fmt, **({"quality": 92} if fmt == "JPEG" else {})))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def mobilenet_job(tmp_path_factory, mobilenet_handle):
    root = tmp_path_factory.mktemp("corpus")
    paths = _write_photo_corpus(root, PHOTO_NAMES)
    (root / "not-an-image.jpg").write_text("<html>404</html>")
    out = tmp_path_factory.mktemp("out") / "mobilenet"
    code = run_pipeline("--input", f"{root}/**", "--output", str(out), "--model", MOBILENET.name,
                        "--model_handle", mobilenet_handle, "--batch_size", "4")
    return {"code": code, "out": str(out), "paths": paths, "bad": str(root / "not-an-image.jpg"),
            "handle": mobilenet_handle}


def test_job_succeeds_and_accounts_for_every_matched_file_once(mobilenet_job):
    assert mobilenet_job["code"] == 0
    embedded = read_embeddings(mobilenet_job["out"]).column("id").to_pylist()
    failed = read_errors(mobilenet_job["out"]).column("id").to_pylist()
    assert sorted(embedded) == sorted(mobilenet_job["paths"])  # glob input: the id is the matched path
    assert failed == [mobilenet_job["bad"]]


def test_undecodable_file_is_reported_with_its_stage_and_a_sentence(mobilenet_job):
    row = read_errors(mobilenet_job["out"]).to_pylist()[0]
    assert row["stage"] == "decode" and row["uri"] == mobilenet_job["bad"]
    assert row["error"].startswith("Not a supported image") and "an HTML page" in row["error"]
    assert "<html>" not in row["error"]  # the file's bytes are described, never echoed


def test_embeddings_schema_and_metadata(mobilenet_job):
    files = glob.glob(os.path.join(mobilenet_job["out"], "embeddings-*.parquet"))
    assert files
    schema = pq.read_schema(files[0])
    assert schema.remove_metadata() == pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), MOBILENET.dim)),
    ])
    metadata = {k.decode(): v.decode() for k, v in pq.read_metadata(files[0]).metadata.items()}
    assert metadata["embedding.model"] == MOBILENET.name
    assert metadata["embedding.handle"] == mobilenet_job["handle"]
    assert metadata["embedding.image_size"] == str(MOBILENET.input_size)
    assert metadata["embedding.dim"] == str(MOBILENET.dim)
    assert "stretch to 224x224" in metadata["embedding.preprocessing"]
    assert metadata["embedding.weights"].startswith("STAND-IN") and "NOT meaningful" in metadata["embedding.weights"]


def test_sha256_column_is_the_digest_of_each_input_file(mobilenet_job):
    rows = read_embeddings(mobilenet_job["out"]).select(["uri", "sha256"]).to_pylist()
    for row in rows:
        with open(row["uri"], "rb") as f:
            assert row["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_errors_schema(mobilenet_job):
    files = glob.glob(os.path.join(mobilenet_job["out"], "errors-*.parquet"))
    assert pq.read_schema(files[0]).names == ["id", "uri", "stage", "error", "bytes_version"]


def test_mobilenet_embeddings_equal_direct_model_calls(mobilenet_job):
    produced = vectors_by_id(read_embeddings(mobilenet_job["out"]))
    direct = direct_vectors(mobilenet_job["handle"], mobilenet_job["paths"], MOBILENET.input_size)
    assert_matches_direct_calls(produced, direct)


def test_output_reads_as_one_dataset_in_pandas_duckdb_polars_and_pyarrow(mobilenet_job):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    pattern = os.path.join(mobilenet_job["out"], "embeddings-*.parquet")
    expected = len(mobilenet_job["paths"])
    frame = pd.read_parquet(sorted(glob.glob(pattern)))
    assert len(frame) == expected and len(frame.embedding.iloc[0]) == MOBILENET.dim
    counted = duckdb.sql(f"select count(*), min(len(embedding)) from read_parquet('{pattern}')").fetchall()
    assert counted == [(expected, MOBILENET.dim)]
    assert pl.read_parquet(pattern).shape == (expected, 4)
    dataset = ds.dataset(sorted(glob.glob(pattern)), format="parquet")
    assert dataset.count_rows() == expected


def test_inception_resnet_v2_end_to_end_from_a_csv_manifest_with_ids(tmp_path, inception_handle):
    paths = _write_photo_corpus(tmp_path / "imgs", PHOTO_NAMES[:4])
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,uri\n" + "".join(f"img-{i},{p}\n" for i, p in enumerate(paths)))
    out = tmp_path / "out"
    assert run_pipeline("--input", str(manifest), "--output", str(out), "--model", INCEPTION.name,
                        "--model_handle", inception_handle) == 0
    table = read_embeddings(str(out))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), INCEPTION.dim)
    assert dict(zip(table.column("id").to_pylist(), table.column("uri").to_pylist())) == {
        f"img-{i}": p for i, p in enumerate(paths)}
    produced = {uri: vec for uri, vec in zip(table.column("uri").to_pylist(), vectors_by_id(table).values())}
    assert_matches_direct_calls(produced, direct_vectors(inception_handle, paths, INCEPTION.input_size))
    assert read_errors(str(out)).num_rows == 0


def test_inception_resnet_v2_at_another_image_size(tmp_path, inception_handle):
    paths = _write_photo_corpus(tmp_path / "imgs", PHOTO_NAMES[:2])
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{tmp_path}/imgs/**", "--output", str(out), "--model", INCEPTION.name,
                        "--model_handle", inception_handle, "--image_size", "160") == 0
    table = read_embeddings(str(out))
    assert table.num_rows == 2
    assert table.schema.metadata[b"embedding.image_size"] == b"160"
    assert_matches_direct_calls(vectors_by_id(table), direct_vectors(inception_handle, paths, 160))


def test_custom_hub_model_is_usable_with_its_declared_size_and_dim(tmp_path, mobilenet_handle):
    _write_photo_corpus(tmp_path / "imgs", PHOTO_NAMES[:2])
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{tmp_path}/imgs/**", "--output", str(out), "--model", "custom",
                        "--model_handle", mobilenet_handle, "--image_size", str(MOBILENET.input_size),
                        "--embedding_dim", str(MOBILENET.dim)) == 0
    table = read_embeddings(str(out))
    assert table.num_rows == 2 and table.schema.metadata[b"embedding.model"] == b"custom"


def test_center_crop_is_recorded_and_changes_the_vectors(tmp_path, mobilenet_handle):
    _write_photo_corpus(tmp_path / "imgs", ["astronaut"], sizes=((600, 200),))
    vectors = {}
    for mode in ("stretch", "center_crop"):
        out = tmp_path / mode
        assert run_pipeline("--input", f"{tmp_path}/imgs/**", "--output", str(out), "--model_handle",
                            mobilenet_handle, "--resize_mode", mode) == 0
        table = read_embeddings(str(out))
        assert f"{mode} to 224x224".encode() in table.schema.metadata[b"embedding.preprocessing"]
        vectors[mode] = table.column("embedding").to_pylist()[0]
    assert not np.allclose(vectors["stretch"], vectors["center_crop"])


def test_bfloat16_mode_is_opt_in_recorded_and_close_to_float32(tmp_path, mobilenet_handle):
    import subprocess
    import sys

    paths = _write_photo_corpus(tmp_path / "imgs", PHOTO_NAMES)
    out = tmp_path / "out"
    # A separate process: the oneDNN bfloat16 switch is process-wide and must not leak into other tests.
    subprocess.run([sys.executable, "-m", "pipeline.run", "--input", f"{tmp_path}/imgs/**", "--output", str(out),
                    "--model_handle", mobilenet_handle, "--bfloat16"], check=True, capture_output=True)
    table = read_embeddings(str(out))
    assert table.schema.metadata[b"embedding.precision"] == b"bfloat16 (oneDNN auto mixed precision)"
    produced = vectors_by_id(table)
    direct = direct_vectors(mobilenet_handle, paths, MOBILENET.input_size)
    for path in paths:
        a, b = produced[path], direct[path]
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.97  # measured: min 0.980 over 256 photos
    ids = sorted(paths)
    nearest = np.argmin(np.linalg.norm(np.stack([produced[i] for i in ids])[:, None]
                                       - np.stack([direct[i] for i in ids])[None], axis=-1), axis=1)
    assert list(nearest) == list(range(len(ids)))


def test_float32_is_the_default_precision(mobilenet_job):
    assert read_embeddings(mobilenet_job["out"]).schema.metadata[b"embedding.precision"] == b"float32"
