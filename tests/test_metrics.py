"""--metrics_file and --pushgateway on run, index update and publish: Prometheus text that
prometheus_client's own parser reads back, written whatever the outcome, and pushed to a Pushgateway on loopback.
The oracle is what each command printed and what the folders hold, not the metrics code."""

import http.server
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import encode, new_index, photo, read_embeddings, read_errors, run_pipeline, tiles, write_manifest
from pipeline.index.__main__ import main as index_main


def _samples(text: str) -> dict:
    """{(name, labels without command): value} of every sample, and the command label they share."""
    found, commands = {}, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            commands.add(labels.pop("command"))
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    assert len(commands) == 1
    return found


def _value(samples: dict, name: str, **labels) -> float:
    return samples[(f"image_embeddings_{name}", tuple(sorted(labels.items())))]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "images"
    tiles(folder, 3)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_a_run_writes_its_counts_and_a_refused_run_keeps_the_last_success(tmp_path, corpus, mobilenet_handle):
    path = tmp_path / "textfile" / "embeddings.prom"
    before = time.time()
    out = tmp_path / "out"
    assert run_pipeline("--input", str(corpus), "--output", str(out), "--model_handle", mobilenet_handle,
                        "--metrics_file", str(path)) == 0
    first = _samples(path.read_text())
    assert _value(first, "embedded") == read_embeddings(str(out)).num_rows == 3
    assert _value(first, "failed", stage="decode") == read_errors(str(out)).num_rows == 1
    assert _value(first, "failed", stage="read") == 0 and _value(first, "inputs") == 4
    assert _value(first, "exit_code") == 0 and _value(first, "images_per_second") > 0
    assert before <= _value(first, "last_success_timestamp_seconds") <= time.time()

    assert run_pipeline("--input", str(corpus), "--output", str(tmp_path / "again"), "--model_handle",
                        str(tmp_path / "no-model"), "--metrics_file", str(path)) == 2
    refused = _samples(path.read_text())
    assert _value(refused, "exit_code") == 2
    assert _value(refused, "last_success_timestamp_seconds") == _value(first, "last_success_timestamp_seconds")
    assert _value(refused, "last_run_timestamp_seconds") > _value(first, "last_run_timestamp_seconds")
    assert ("image_embeddings_embedded", ()) not in refused  # no counts from a run that did nothing
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.prom"]  # replaced in one rename, no leftovers


def test_an_index_update_and_a_publish_write_the_views_counts(tmp_path, corpus, mobilenet_handle, capsys):
    root, prom = tmp_path / "index", tmp_path / "update.prom"
    new_index(root, mobilenet_handle)
    pairs = [(f"img{i}", str(p)) for i, p in enumerate(sorted(corpus.iterdir()))]
    assert index_main(["update", "--index", str(root), "--input", write_manifest(tmp_path / "m.csv", pairs),
                       "--direct_running_mode=in_memory", "--progress_interval=0", "--metrics_file", str(prom)]) == 0
    night = _samples(prom.read_text())
    assert (_value(night, "inputs"), _value(night, "embedded"), _value(night, "failed")) == (4, 3, 1)
    assert (_value(night, "live_ids"), _value(night, "removed_ids"), _value(night, "exit_code")) == (4, 0, 0)

    published = tmp_path / "publish.prom"
    capsys.readouterr()
    assert index_main(["publish", "--index", str(root), "--to", str(tmp_path / "lancedb"),
                       "--metrics_file", str(published)]) == 0
    assert "holds vectors of a random-weight stand-in model" in capsys.readouterr().out  # named as such
    done = _samples(published.read_text())
    assert (_value(done, "published_rows"), _value(done, "written_rows"), _value(done, "deleted_rows")) == (3, 3, 0)

    assert index_main(["update", "--index", str(tmp_path / "no-index"), "--input", str(corpus),
                       "--metrics_file", str(prom)]) == 2
    assert _value(_samples(prom.read_text()), "exit_code") == 2


class _Pushgateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_metrics_are_pushed_to_a_pushgateway_and_a_gateway_that_is_down_changes_no_exit_status(
        tmp_path, mobilenet_handle, capfd):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Pushgateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = tmp_path / "one.png"
    image.write_bytes(encode(photo("coffee")[:128, :128], "PNG"))
    try:
        assert run_pipeline("--input", str(image), "--output", str(tmp_path / "out"), "--model_handle",
                            mobilenet_handle, "--pushgateway", f"http://127.0.0.1:{server.server_port}") == 0
    finally:
        server.shutdown()
        server.server_close()
    [(method, path, body)] = _Pushgateway.received
    assert (method, path) == ("PUT", "/metrics/job/image_embeddings_run")
    assert _value(_samples(body), "embedded") == 1

    assert run_pipeline("--input", str(image), "--output", str(tmp_path / "out2"), "--model_handle",
                        mobilenet_handle, "--pushgateway", f"http://127.0.0.1:{server.server_port}") == 0
    assert "WARNING: metrics not pushed to --pushgateway http://127.0.0.1:" in capfd.readouterr().err
