"""Nothing lost: every input ends in exactly one output, bad inputs are reported with a reason, faults are retried."""

import glob
import os
import struct
import zlib
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from helpers import PHOTO_NAMES, encode, photo, read_embeddings, read_errors, run_pipeline, vectors_by_id
from servers import WebServer
from transforms.decode import ImageDecodeError, PreprocessConfig, decode_image
from transforms.uri_reader import ReadConfig, ReadError, read_uri

CONFIG = PreprocessConfig(image_size=64)


def png_declaring(width, height):
    """A tiny, valid-looking PNG whose header declares width x height (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def jpeg_declaring(width, height):
    """A real small JPEG with its frame header patched to declare width x height."""
    data = bytearray(encode(photo("rocket")[:64, :64], "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated(data, keep=0.6):
    return data[: int(len(data) * keep)]


# --- decode: hostile and odd files ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [png_declaring, jpeg_declaring])
def test_decompression_bombs_are_rejected_from_the_header(make):
    with pytest.raises(ImageDecodeError, match="declares 40000x40000 = 1600000000 pixels, over the 100000000"):
        decode_image(make(40000, 40000), CONFIG)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_errors_by_default_and_accepted_on_request(fmt):
    data = truncated(encode(photo("chelsea"), fmt))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data, CONFIG)
    pixels = decode_image(data, PreprocessConfig(image_size=64, allow_truncated=True))
    assert pixels.shape == (64, 64, 3)


def test_unsupported_formats_are_named_in_the_error():
    ico = encode(Image.fromarray(photo("rocket")[:32, :32]), "ICO")
    with pytest.raises(ImageDecodeError, match="Not a supported image .supported: JPEG, PNG, GIF, BMP, WEBP, TIFF"):
        decode_image(ico, CONFIG)


@pytest.mark.parametrize("shape", [(1, 1), (50, 10000), (10000, 50)])
def test_extreme_shapes_embed(shape):
    pixels = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    assert decode_image(encode(pixels, "PNG"), CONFIG).shape == (64, 64, 3)


def test_huge_real_photo_embeds():
    big = Image.fromarray(photo("astronaut")).resize((8000, 6000))
    assert decode_image(encode(big, "JPEG", quality=90), CONFIG).shape == (64, 64, 3)


# Pillow's exif_transpose method for each orientation; the stored image is its inverse applied to the upright one.
STORED_FROM_UPRIGHT = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_pixels(orientation):
    upright = Image.fromarray(photo("chelsea"))
    method = STORED_FROM_UPRIGHT[orientation]
    stored = upright.transpose(method) if method is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    expected = decode_image(encode(upright, "PNG"), CONFIG)
    np.testing.assert_array_equal(decode_image(encode(stored, "PNG", exif=exif), CONFIG), expected)


# --- reading: files and http ------------------------------------------------------------------------------------

def test_file_read_errors_name_the_problem(tmp_path):
    with pytest.raises(ReadError, match="does not exist"):
        read_uri(str(tmp_path / "missing.jpg"))
    with pytest.raises(ReadError, match="is a directory, not a file"):
        read_uri(str(tmp_path))
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    with pytest.raises(ReadError, match="larger than the 100-byte limit"):
        read_uri(str(tmp_path / "big.jpg"), ReadConfig(max_bytes=100))


def test_permission_denied_is_a_read_error(tmp_path):
    with mock.patch("apache_beam.io.filesystems.FileSystems.open", side_effect=PermissionError(13, "denied")):
        with pytest.raises(ReadError, match="Permission denied reading"):
            read_uri(str(tmp_path / "x.jpg"))


@pytest.fixture
def server():
    s = WebServer(encode(photo("rocket"), "JPEG"))
    yield s
    s.close()


FAST_RETRIES = ReadConfig(http_timeout_s=0.3, retries=3, backoff_s=0.01)


def test_http_reads_retry_5xx_and_resets_with_backoff(server):
    assert read_uri(server.url + "/flaky.jpg", FAST_RETRIES)[:2] == b"\xff\xd8"
    assert read_uri(server.url + "/reset.jpg", FAST_RETRIES)[:2] == b"\xff\xd8"
    assert server.hits["/flaky.jpg"] == 3 and server.hits["/reset.jpg"] == 2


def test_http_4xx_is_not_retried(server):
    with pytest.raises(ReadError, match="HTTP 404"):
        read_uri(server.url + "/missing.jpg", FAST_RETRIES)
    assert server.hits["/missing.jpg"] == 1


def test_http_read_timeout_is_bounded_and_reported(server):
    with pytest.raises(ReadError, match="still failing after 4 attempts .no complete answer within 0.3 s"):
        read_uri(server.url + "/slow.jpg", FAST_RETRIES)
    assert server.hits["/slow.jpg"] == 4


def test_http_size_cap(server):
    with pytest.raises(ReadError, match="larger than the 1000-byte limit"):
        read_uri(server.url + "/ok.jpg", ReadConfig(max_bytes=1000))


def test_unreachable_http_host_is_reported_after_bounded_retries():
    with pytest.raises(ReadError, match="after 2 attempts"):
        read_uri("http://127.0.0.1:9/x.jpg", ReadConfig(http_timeout_s=0.3, retries=1, backoff_s=0.01))


# --- the invariant over a mixed corpus ---------------------------------------------------------------------------

def test_mixed_corpus_every_manifest_row_lands_in_exactly_one_output(tmp_path, server, mobilenet_handle):
    good = []
    for name in PHOTO_NAMES[:4]:
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(encode(photo(name), "JPEG"))
        good.append(str(path))
    bad = {
        "empty.jpg": b"", "page.jpg": b"<!doctype html><html></html>", "bomb.png": png_declaring(40000, 40000),
        "cut.jpg": truncated(encode(photo("coffee"), "JPEG")), "cut.png": truncated(encode(photo("coffee"), "PNG")),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a-directory.jpg").mkdir()
    rows = [("g0", good[0]), ("g1", good[1]), ("g2", good[2]), ("g3", good[3]),
            ("http-ok", server.url + "/flaky.jpg"), ("http-404", server.url + "/missing.jpg"),
            ("dup", good[0]), ("dup", good[1]), ("", str(tmp_path / "missing.jpg")), ("dir", str(tmp_path / "a-directory.jpg"))]
    rows += [(name, str(tmp_path / name)) for name in bad]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,uri\n" + "".join(f'{i},"{u}"\n' for i, u in rows))
    out = str(tmp_path / "out")
    assert run_pipeline("--input", str(manifest), "--output", out, "--model_handle", mobilenet_handle,
                        "--http_timeout", "2") == 0

    embedded, errors = read_embeddings(out).to_pylist(), read_errors(out).to_pylist()
    assert len(embedded) + len(errors) == len(rows)
    assert len({r["id"] for r in embedded}) == len(embedded)
    assert sorted(r["id"] for r in embedded) == ["dup", "g0", "g1", "g2", "g3", "http-ok"]
    stages = {r["id"]: r["stage"] for r in errors}
    assert stages == {"http-404": "read", "dup": "manifest", str(tmp_path / "missing.jpg"): "read", "dir": "read",
                      "empty.jpg": "decode", "page.jpg": "decode", "bomb.png": "decode", "cut.jpg": "decode",
                      "cut.png": "decode"}
    assert all(r["error"] and "\n" not in r["error"] for r in errors)


def test_empty_manifest_gives_a_message_and_empty_valid_outputs(tmp_path, capsys, mobilenet_handle):
    manifest = tmp_path / "empty.txt"
    manifest.write_text("# nothing yet\n")
    out = str(tmp_path / "out")
    assert run_pipeline("--input", str(manifest), "--output", out, "--model_handle", mobilenet_handle) == 0
    assert "No inputs" in capsys.readouterr().out
    assert read_embeddings(out).num_rows == 0 and read_errors(out).num_rows == 0
    assert read_embeddings(out).schema.field("embedding").type.list_size == 1664


# --- faults ------------------------------------------------------------------------------------------------------

def _fails_first(real, failures, fault):
    """Wraps `real` to raise `fault` on the first `failures` calls."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise fault
        return real(*args, **kwargs)
    return wrapper


@pytest.fixture
def four_photos(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in PHOTO_NAMES[:4]:
        (images / f"{name}.png").write_bytes(encode(photo(name)[:200, :200], "PNG"))
    return images


def test_transient_read_errors_are_retried_within_the_step_on_the_plain_direct_runner(tmp_path, four_photos,
                                                                                       mobilenet_handle):
    from apache_beam.io.filesystems import FileSystems

    flaky_open = _fails_first(FileSystems.open, 3, ConnectionError("injected reset"))
    out = str(tmp_path / "out")
    with mock.patch.object(FileSystems, "open", flaky_open):
        assert run_pipeline("--input", f"{four_photos}/*", "--output", out, "--model_handle", mobilenet_handle) == 0
    assert sorted(read_embeddings(out).column("id").to_pylist()) == sorted(glob.glob(f"{four_photos}/*"))


def test_a_read_that_stays_transient_becomes_a_failure_row_and_the_job_succeeds(tmp_path, four_photos,
                                                                                  mobilenet_handle):
    from apache_beam.io.filesystems import FileSystems

    real_open = FileSystems.open

    def open_never_rocket(path, *args, **kwargs):
        if path.endswith("rocket.png"):
            raise TimeoutError("injected: the store keeps timing out")
        return real_open(path, *args, **kwargs)

    out = str(tmp_path / "out")
    with mock.patch.object(FileSystems, "open", open_never_rocket):
        assert run_pipeline("--input", f"{four_photos}/*", "--output", out, "--model_handle", mobilenet_handle,
                            "--read_retries", "2") == 0
    [error] = read_errors(out).to_pylist()
    assert error["id"].endswith("rocket.png") and error["stage"] == "read"
    assert "still failing after 3 attempts (TimeoutError: injected" in error["error"]
    assert "the next run tries it again" in error["error"]
    assert read_embeddings(out).num_rows == 3


def test_environment_errors_of_the_model_are_retried_by_the_runner_and_each_id_is_written_once(
        tmp_path, four_photos, mobilenet_handle):
    import transforms.embed

    fault = transforms.embed.ModelEnvironmentError("injected ResourceExhaustedError")
    flaky = _fails_first(transforms.embed.HubEmbedder.__call__, 1, fault)
    out = str(tmp_path / "out")
    with mock.patch.object(transforms.embed.HubEmbedder, "__call__", flaky):
        assert run_pipeline("--input", f"{four_photos}/*", "--output", out, "--model_handle", mobilenet_handle,
                            "--runner", "BundleBasedDirectRunner") == 0
    ids = read_embeddings(out).column("id").to_pylist()
    assert sorted(ids) == sorted(glob.glob(f"{four_photos}/*")) and read_errors(out).num_rows == 0


@pytest.fixture(scope="module")
def fails_on_black_images(tmp_path_factory):
    """A hub-style SavedModel (dim 3) whose batch call fails whenever the batch holds an all-black image."""
    import tensorflow as tf

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            brightest = tf.reduce_max(images, axis=[1, 2, 3])
            with tf.control_dependencies([tf.debugging.assert_greater(brightest, 0.0, message="black image")]):
                return tf.reduce_mean(images, axis=[1, 2])

    path = str(tmp_path_factory.mktemp("models") / "fails_on_black")
    tf.saved_model.save(Model(), path)
    return path


def test_a_batch_failure_is_retried_image_by_image_and_only_bad_images_are_reported(tmp_path, fails_on_black_images):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in PHOTO_NAMES[:5]:
        (images / f"{name}.png").write_bytes(encode(photo(name)[:100, :100], "PNG"))
    (images / "black.png").write_bytes(encode(np.zeros((40, 40, 3), np.uint8), "PNG"))
    out = str(tmp_path / "out")
    assert run_pipeline("--input", f"{images}/*", "--output", out, "--model", "custom", "--model_handle",
                        fails_on_black_images, "--image_size", "32", "--embedding_dim", "3", "--batch_size", "6") == 0
    vectors = vectors_by_id(read_embeddings(out))
    assert sorted(vectors) == sorted(str(images / f"{n}.png") for n in PHOTO_NAMES[:5])
    [error] = read_errors(out).to_pylist()
    assert error["id"] == str(images / "black.png") and error["stage"] == "embed"
    assert "black image" in error["error"]


def test_a_failed_run_leaves_no_file_that_looks_like_a_result(tmp_path, mobilenet_handle):
    import transforms.embed

    out = tmp_path / "out"
    crash = mock.patch.object(transforms.embed.DecodedImagesModelHandler, "run_inference",
                              side_effect=RuntimeError("injected worker crash"))
    with crash, pytest.raises(Exception, match="injected worker crash"):
        run_pipeline("--input", f"{os.path.dirname(__file__)}/../samples/*", "--output", str(out),
                     "--model_handle", mobilenet_handle)
    assert glob.glob(str(out / "embeddings-*")) == [] and glob.glob(str(out / "errors-*")) == []


def test_a_bomb_is_rejected_without_allocating_its_pixels(tmp_path):
    """In a fresh process: peak RSS barely moves, though the declared 40000x40000 RGB would take 4.8 GB."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(40000, 40000))
    script = (
        "import resource\n"
        "from transforms.decode import PreprocessConfig, ImageDecodeError, decode_image\n"
        f"data = open({str(bomb)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_image(data, PreprocessConfig(image_size=224))\n"
        "except ImageDecodeError as exc:\n"
        "    print('rejected-from-header' if '-pixel limit' in str(exc) else 'failed-later')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    verdict, growth_mb = result.stdout.split()
    assert verdict == "rejected-from-header" and int(growth_mb) < 50
