"""Nothing lost on what production reads: object stores, flaky web servers, odd URIs, many threads, odd pixels."""

import concurrent.futures
import json
import os
import time
from unittest import mock

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.transforms import window
from PIL import Image

from helpers import PHOTO_NAMES, encode, photo, read_embeddings, read_errors, run_and_collect, run_pipeline
from servers import ForwardProxy, GcsEmulator, WebServer
from transforms.decode import DecodeImagesFn, PreprocessConfig, _high_depth_to_uint8, decode_image
from transforms.records import FAILED, Failure, ImageRef
from transforms.uri_reader import ReadConfig, ReadError, read_uri

FAST = ReadConfig(http_timeout_s=2, retries=2, backoff_s=0.01)


@pytest.fixture
def gcs(monkeypatch):
    emulator = GcsEmulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    # Anonymous at once: Beam would first spend about 25 s retrying to find Google credentials on this machine.
    monkeypatch.setattr("apache_beam.internal.gcp.auth._Credentials.get_service_credentials",
                        classmethod(lambda cls, options: None))
    yield emulator
    emulator.close()


@pytest.fixture
def web():
    server = WebServer(encode(photo("rocket")[:120, :160], "JPEG"))
    yield server
    server.close()


# --- object stores -------------------------------------------------------------------------------------------

def test_gcs_objects_are_read_and_missing_or_forbidden_ones_are_this_inputs_read_error(gcs):
    gcs.objects[("bkt", "a/ok.jpg")] = b"jpeg bytes"
    gcs.objects[("bkt", "a/secret.jpg")] = b"x"
    gcs.forbidden.add(("bkt", "a/secret.jpg"))
    assert read_uri("gs://bkt/a/ok.jpg", FAST) == b"jpeg bytes"
    with pytest.raises(ReadError, match=r"^gs://bkt/a/missing.jpg does not exist\.$"):
        read_uri("gs://bkt/a/missing.jpg", FAST)
    with pytest.raises(ReadError, match=r"^Permission denied reading gs://bkt/a/secret.jpg\.$"):
        read_uri("gs://bkt/a/secret.jpg", FAST)


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/a.jpg", "the scheme ftp:// is not supported; use a local path, file://, gs://"),
    ("s3://bucket/a.jpg", "Could not read s3://bucket/a.jpg"),
    ("mailto:x@y", "the scheme mailto:// is not supported"),
])
def test_unsupported_or_uninstalled_schemes_are_read_errors(uri, message):
    with pytest.raises(ReadError, match=message):
        read_uri(uri, FAST)


def test_file_uris_are_read(tmp_path):
    (tmp_path / "é b.jpg").write_bytes(b"abc")
    assert read_uri((tmp_path / "é b.jpg").as_uri(), FAST) == b"abc"


# --- http ----------------------------------------------------------------------------------------------------

def test_a_body_shorter_than_its_content_length_is_a_transient_error_retried(web):
    image = read_uri(f"{web.url}/short.jpg", FAST)  # first answer cut short, the retry complete
    assert image == read_uri(f"{web.url}/ok.jpg", FAST) and web.hits["/short.jpg"] == 2
    web.failures_left["/short.jpg"] = 10
    with pytest.raises(ReadError, match="closed after .* of the .* bytes announced"):
        read_uri(f"{web.url}/short.jpg", FAST)


def test_http_and_https_proxies_from_the_environment_are_used_and_no_proxy_is_honoured(web, monkeypatch):
    image = read_uri(f"{web.url}/ok.jpg", FAST)
    proxy = ForwardProxy(image)
    try:
        for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.setenv("https_proxy", proxy.url)
        monkeypatch.setenv("no_proxy", "localhost")
        assert read_uri("http://images.example.invalid/a/photo.jpg", FAST) == image  # resolved by the proxy
        with pytest.raises(ReadError):
            read_uri("https://images.example.invalid/b.jpg", FAST)  # the proxy refuses the tunnel
        assert proxy.seen[:2] == ["GET http://images.example.invalid/a/photo.jpg",
                                  "CONNECT images.example.invalid:443"]
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        before = len(proxy.seen)
        assert read_uri(f"{web.url}/ok.jpg", FAST) == image and len(proxy.seen) == before  # straight there
    finally:
        proxy.close()


def test_http_429_and_408_are_retried_honouring_retry_after(web):
    assert read_uri(web.url + "/busy.jpg", FAST)[:2] == b"\xff\xd8"
    assert read_uri(web.url + "/timeout.jpg", FAST)[:2] == b"\xff\xd8"
    first, second = web.times["/busy.jpg"]
    assert web.hits["/busy.jpg"] == 2 and second - first >= 0.95  # Retry-After: 1, not the 0.01 s backoff
    assert web.hits["/timeout.jpg"] == 2


def test_the_http_timeout_is_a_total_deadline_even_for_a_trickling_server(web):
    started = time.monotonic()
    with pytest.raises(ReadError, match=r"no complete answer within 0.5 s \(--http_timeout\)"):
        read_uri(web.url + "/trickle.jpg", ReadConfig(http_timeout_s=0.5, retries=0))
    assert time.monotonic() - started < 1.0


def test_urls_with_non_ascii_characters_are_fetched(web):
    assert read_uri(web.url + "/fotos/café ü.jpg?w=1&q=é", FAST)[:2] == b"\xff\xd8"
    assert "/fotos/café ü.jpg" in web.hits


def test_redirects_are_followed(web):
    import http.server

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", web.url + "/target.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()

    from servers import _Running
    redirector = _Running(Redirect)
    try:
        assert read_uri(redirector.url + "/old.jpg", FAST)[:2] == b"\xff\xd8"
    finally:
        redirector.close()


def test_http_downloads_overlap_even_with_one_decode_thread(web):
    web.delay_s = 0.3
    refs = [ImageRef(f"id{i}", f"{web.url}/img{i}.jpg") for i in range(12)]
    fn = DecodeImagesFn(PreprocessConfig(image_size=32), FAST, threads=1)
    fn.setup()
    fn.start_bundle()
    outputs = [out for ref in refs for out in fn.process(ref, window.GlobalWindow(), 0)] + list(fn.finish_bundle())
    fn.teardown()
    assert len(outputs) == 12 and [o.value.id for o in outputs] == [r.id for r in refs]
    assert web.max_in_flight >= 8  # the 12 downloads waited on the server together (measured: 11-12)


# --- threads, windows ------------------------------------------------------------------------------------------

def test_allow_truncated_images_is_per_call_even_across_threads():
    cut = encode(photo("chelsea"), "JPEG")[:-3000]
    strict, lenient = PreprocessConfig(image_size=32), PreprocessConfig(image_size=32, allow_truncated=True)

    def decode(i):
        config = lenient if i % 2 else strict
        try:
            decode_image(cut, config)
            return i % 2 == 1
        except Exception:
            return i % 2 == 0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(decode, range(400)))


def test_each_decoded_result_keeps_its_own_elements_window_and_timestamp(tmp_path):
    paths = []
    for i, name in enumerate(PHOTO_NAMES[:6]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(photo(name)[:40, :40], "PNG") if i != 3 else b"broken")
        paths.append(str(path))

    def build(p):
        stamped = (p | beam.Create([(i, path) for i, path in enumerate(paths)])
                   | beam.Map(lambda e: window.TimestampedValue(ImageRef(str(e[0]), e[1]), e[0] * 100))
                   | beam.WindowInto(window.FixedWindows(100)))
        outputs = stamped | beam.ParDo(DecodeImagesFn(PreprocessConfig(image_size=16), FAST)).with_outputs(
            FAILED, main="decoded")
        return ((outputs.decoded | "TagDecoded" >> beam.ParDo(_WindowOf()),
                 outputs[FAILED] | "TagFailed" >> beam.ParDo(_WindowOf())) | beam.Flatten())

    found = sorted(run_and_collect(build))
    assert found == [(str(i), i * 100, i * 100 + 100) for i in range(6)]


class _WindowOf(beam.DoFn):
    """(id, timestamp, window end) of each element."""

    def process(self, element, w=beam.DoFn.WindowParam, ts=beam.DoFn.TimestampParam):
        yield element.id, int(ts), int(w.end)


# --- odd pixels -------------------------------------------------------------------------------------------------

def test_integer_greyscale_maps_monotonically_whatever_the_images_range():
    low = Image.fromarray(np.full((4, 4), 200, np.int32), "I")
    high = Image.fromarray(np.full((4, 4), 256, np.int32), "I")
    assert _high_depth_to_uint8(low)[0, 0] <= _high_depth_to_uint8(high)[0, 0]
    sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert _high_depth_to_uint8(sixteen).tolist() == [[0, 1, 128, 255]]


def test_a_large_16_bit_image_decodes_in_bounded_memory(tmp_path):
    """In a fresh process: 40 megapixels of 16-bit greyscale (80 MB of samples) must not need 24 bytes a pixel."""
    import subprocess
    import sys

    path = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (5000, 8000), dtype=np.uint16)).save(path)
    script = (
        "import resource\n"
        "from transforms.decode import PreprocessConfig, decode_image\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert decode_image(data, PreprocessConfig(image_size=224)).shape == (224, 224, 3)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(result.stdout.split()[-1]) < 40 * 6  # MB: under 6 bytes a pixel, against 24 before


def test_an_image_that_keeps_exhausting_memory_ends_as_a_failure_row():
    from transforms import decode

    with mock.patch.object(decode, "decode_image", side_effect=MemoryError()):
        result = decode.decode_read_bytes(ImageRef("big", "/big.png"), b"x", PreprocessConfig(image_size=32))
    assert result == Failure("big", "/big.png", "decode", "Ran out of memory decoding this image 3 times.")


def test_an_image_whose_memory_frees_up_on_a_later_attempt_is_decoded():
    from transforms import decode

    pixels = np.zeros((32, 32, 3), np.uint8)
    with mock.patch.object(decode, "decode_image", side_effect=[MemoryError(), MemoryError(), pixels]):
        result = decode.decode_read_bytes(ImageRef("big", "/big.png"), b"x", PreprocessConfig(image_size=32))
    assert result.id == "big" and result.pixels is pixels


def test_environment_errors_of_the_model_fail_the_bundle_but_data_errors_do_not(mobilenet_handle):
    import tensorflow as tf

    from transforms.embed import DecodedImagesModelHandler, EmbedConfig, HubEmbedder, ModelEnvironmentError
    from transforms.records import DecodedImage

    handler = DecodedImagesModelHandler(EmbedConfig(handle=mobilenet_handle, image_size=224, dim=1664))
    model = HubEmbedder(EmbedConfig(handle=mobilenet_handle, image_size=224, dim=1664))
    batch = [DecodedImage(str(i), "", np.zeros((224, 224, 3), np.uint8)) for i in range(2)]
    with mock.patch.object(model, "_embed", side_effect=tf.errors.ResourceExhaustedError(None, None, "OOM")):
        with pytest.raises(ModelEnvironmentError, match="ResourceExhaustedError: OOM"):
            handler.run_inference(batch, model)
    with mock.patch.object(model, "_embed", side_effect=MemoryError()):
        results = handler.run_inference(batch, model)
    assert [r.error for r in results] == ["Ran out of memory embedding this image 3 times."] * 2


# --- the invariant over what production feeds it --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_every_row_of_a_messy_production_manifest_ends_in_exactly_one_output(tmp_path, gcs, web, mobilenet_handle,
                                                                              fmt):
    good = encode(photo("coffee")[:100, :120], "JPEG")
    gcs.objects[("bkt", "photos/ok.jpg")] = good
    gcs.objects[("bkt", "photos/secret.jpg")] = good
    gcs.forbidden.add(("bkt", "photos/secret.jpg"))
    local = tmp_path / "local.png"
    local.write_bytes(encode(photo("astronaut")[:90, :90], "PNG"))
    sep = "," if fmt == "csv" else "\t"
    rows = [
        ("gs-ok", "gs://bkt/photos/ok.jpg"), ("gs-missing", "gs://bkt/photos/nope.jpg"),
        ("gs-forbidden", "gs://bkt/photos/secret.jpg"), ("http-429", web.url + "/busy.jpg"),
        ("http-trickle", web.url + "/trickle.jpg"), ("http-unicode", web.url + "/été/ü.jpg"),
        ("http-404", web.url + "/missing.jpg"), ("http-503", web.url + "/always503.jpg"),
        ("ftp", "ftp://example.com/a.jpg"), ("local", str(local)), ("dup", str(local)), ("dup", str(local)),
    ]
    lines = [f"id{sep}uri"] + [f"{i}{sep}{u}" for i, u in rows]
    lines.insert(3, f'stray{sep}"{local}')  # an unclosed quote (CSV: a bad row; TSV: a literal quote)
    payload = ("\n".join(lines) + "\n").encode()
    payload += f"latin{sep}/x/caf".encode() + b"\xe9.jpg\n" + f"after{sep}{local}\n".encode()
    manifest = tmp_path / f"m.{fmt}"
    manifest.write_bytes(payload)
    out = str(tmp_path / "out")
    assert run_pipeline("--input", str(manifest), "--output", out, "--model_handle", mobilenet_handle,
                        "--http_timeout", "1", "--read_retries", "1") == 0

    embedded = read_embeddings(out).column("id").to_pylist()
    errors = read_errors(out).to_pylist()
    assert len(embedded) + len(errors) == len(rows) + 3  # every row, once
    assert len(set(embedded)) == len(embedded)
    assert sorted(embedded) == sorted(["gs-ok", "http-429", "http-unicode", "local", "dup", "after"])
    stages = sorted((r["id"], r["stage"]) for r in errors if not r["id"].startswith("<"))
    expected = [("dup", "manifest"), ("ftp", "manifest"),  # an unknown scheme is refused where rows are parsed
                ("gs-forbidden", "read"), ("gs-missing", "read"),
                ("http-404", "read"), ("http-503", "read"), ("http-trickle", "read")]
    if fmt == "tsv":
        expected.append(("stray", "read"))  # TSV has no quoting: the quote is part of a path that does not exist
    assert stages == sorted(expected)
    bad_rows = [r["error"] for r in errors if r["id"].startswith("<")]
    assert sum("is not UTF-8" in message for message in bad_rows) == 1
    assert sum("is not valid CSV" in message for message in bad_rows) == (fmt == "csv")
    assert len(bad_rows) == (2 if fmt == "csv" else 1)
    report = json.loads(open(os.path.join(out, "_run_report.json")).read())
    assert report["counts"]["inputs"] == len(rows) + 3
