"""What a manifest may make a worker read, and the smaller promises at the edges: every --help works, a repeated
flag is refused or taken whole, passwords never printed, a model's NaN costs its image, a failed remote job is
one line, Ctrl-C while starting is one line too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, encode, photo, read_embeddings, read_errors, run_pipeline, tiles
from servers import WebServer
from transforms.uri_reader import ReadConfig, ReadError, read_uri

COMMANDS = [["pipeline.run"], ["pipeline.search"], ["pipeline.search", "build"], ["pipeline.search", "query"],
            ["pipeline.search", "duplicates"], ["pipeline.flink"], ["pipeline.standin_models"], ["pipeline.models"],
            *[["pipeline.index", sub] for sub in ("create", "update", "status", "snapshot", "publish")]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_commands_help_exits_0(command):
    done = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize("module", ["pipeline.run", "pipeline.index", "pipeline.search"])
def test_ctrl_c_while_a_command_imports_says_one_line_and_exits_130(module):
    command = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # inside the imports of Beam (about 2 s), well after the handler is set
    command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 130 and not out
    assert err == "Interrupted while starting: nothing was read or written.\n"


@pytest.fixture(scope="module")
def web():
    server = WebServer(encode(photo("rocket")[:64, :64], "JPEG"))
    yield server
    server.close()


def test_cloud_metadata_servers_and_link_local_addresses_are_never_read(web):
    for uri in ("http://169.254.169.254/computeMetadata/v1/", "http://metadata.google.internal/x",
                "http://[fd00:ec2::254]/latest/meta-data/", "http://[fe80::1]/x.jpg",
                f"{web.url}/redirect/http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(ReadError, match="metadata server or a link-local address"):
            read_uri(uri, ReadConfig(retries=0))


def test_allow_uri_prefix_refuses_rows_and_redirects_outside_it(web, tmp_path):
    inside = tiles(tmp_path / "allowed", 1)[0]
    config = ReadConfig(retries=0, allowed_prefixes=(f"{tmp_path}/allowed/", f"{web.url}/ok/"))
    assert read_uri(inside, config)
    assert read_uri(f"{web.url}/ok/a.jpg", config)
    for uri, why in (("/etc/passwd", "outside every --allow_uri_prefix"),
                     (f"{tmp_path}/allowed/../secret.png", "'..' segment"),
                     (f"{web.url}/ok/%2e%2e/secret.jpg", "'..' segment"),
                     (f"{web.url}/elsewhere.jpg", "outside every --allow_uri_prefix"),
                     (f"{web.url}/ok/../redirect/http://example.com/x.jpg", "'..' segment")):
        with pytest.raises(ReadError, match=why):
            read_uri(uri, config)
    with pytest.raises(ReadError, match=r"it redirected to .* outside every --allow_uri_prefix"):
        read_uri(f"{web.url}/redirect/{web.url}/elsewhere.jpg",
                 ReadConfig(retries=0, allowed_prefixes=(f"{web.url}/redirect/",)))


def test_a_job_with_allow_uri_prefix_reports_rows_outside_it(tmp_path, mobilenet_handle):
    allowed = tiles(tmp_path / "allowed", 2)
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join([*allowed, "/etc/passwd", "/etc/hostname"]) + "\n")
    out = tmp_path / "out"
    assert run_pipeline("--input", str(manifest), "--output", str(out), "--model_handle", mobilenet_handle,
                        "--allow_uri_prefix", f"{tmp_path}/allowed/") == 0
    assert sorted(read_embeddings(str(out)).column("id").to_pylist()) == sorted(allowed)
    errors = read_errors(str(out)).to_pylist()
    assert sorted(e["id"] for e in errors) == ["/etc/hostname", "/etc/passwd"]
    assert all("outside every --allow_uri_prefix" in e["error"] and e["stage"] == "read" for e in errors)


def test_a_repeated_single_value_flag_is_refused_and_query_ids_are_all_taken(tmp_path, capsys):
    from pipeline.run import main as run_main

    with pytest.raises(SystemExit) as refused:
        run_main(["--input", "a", "--input", "b", "--output", str(tmp_path / "o")])
    assert refused.value.code == 2
    assert "--input was given more than once" in capsys.readouterr().err
    from pipeline.search.__main__ import _parser

    args = _parser().parse_args(["query", "--index", "i", "--id", "A", "--id", "B", "C"])
    assert args.id == ["A", "B", "C"]


def test_a_password_is_masked_in_every_form_libpq_takes():
    from pipeline.publish.postgres import _masked

    assert _masked("postgresql://me:pw@h/db") == "postgresql://me:***@h/db"
    assert _masked("postgresql://me@h/db?password=secret") == "postgresql://me@h/db?password=***"
    assert _masked("postgresql:///db?host=/tmp&PASSWORD=secret&sslmode=require") == \
        "postgresql:///db?host=/tmp&password=***&sslmode=require"
    assert "secret" not in _masked("postgresql://me:secret@[broken/db")


def test_a_vector_with_nan_is_that_images_failure(tmp_path):
    """A model that returns NaN for bright images: those images fail at stage embed, the others are written."""
    from transforms.embed import import_tensorflow

    tf = import_tensorflow()

    class NanForBright(tf.Module):
        variables = trainable_variables = regularization_losses = ()

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=False)[:, None]
            return tf.where(mean > 0.5, tf.fill(tf.shape(mean), float("nan")), mean) * tf.ones([1, 4])

    handle = str(tmp_path / "model")
    tf.saved_model.save(NanForBright(), handle)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "dark.png").write_bytes(encode(photo("rocket")[:64, :64] // 4, "PNG"))
    (folder / "bright.png").write_bytes(encode(255 - photo("rocket")[:64, :64] // 4, "PNG"))
    out = tmp_path / "out"
    assert run_pipeline("--input", str(folder), "--output", str(out), "--model", "custom", "--model_handle", handle,
                        "--image_size", "32", "--embedding_dim", "4") == 0
    assert [i.rsplit("/", 1)[1] for i in read_embeddings(str(out)).column("id").to_pylist()] == ["dark.png"]
    [error] = read_errors(str(out)).to_pylist()
    assert error["stage"] == "embed" and "non-finite" in error["error"] and error["id"].endswith("bright.png")


def test_a_failed_remote_job_under_index_update_is_one_line_and_exit_1(tmp_path, mobilenet_handle, monkeypatch,
                                                                       capsys):
    from helpers import new_index, write_manifest
    from pipeline.index.__main__ import main as index_main
    from pipeline.run import JobFailed

    def failed(*args, **kwargs):
        raise JobFailed("The job failed on DataflowRunner: worker lost.")

    root = tmp_path / "index"
    new_index(root, mobilenet_handle)
    monkeypatch.setattr("pipeline.index.__main__.run", failed)
    manifest = write_manifest(tmp_path / "m.csv", [("a", tiles(tmp_path / "i", 1)[0])])
    assert index_main(["update", "--index", str(root), "--input", manifest, "--direct_running_mode=in_memory",
                       "--progress_interval=0"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: The job failed on DataflowRunner: worker lost."


def test_an_index_is_not_created_on_a_filesystem_without_hard_links(tmp_path, mobilenet_handle, monkeypatch, capsys):
    import errno
    import os

    from pipeline.index.__main__ import main as index_main

    if os.path.isdir("/dev/shm"):  # tmpfs has both: accepted, and the probe leaves nothing behind
        shm = f"/dev/shm/index-probe-{os.getpid()}"
        try:
            assert index_main(["create", "--index", shm, "--model_handle", mobilenet_handle]) == 0
            assert sorted(os.listdir(shm)) == ["index.json"]
        finally:
            import shutil
            shutil.rmtree(shm, ignore_errors=True)

    def refused(source, target):  # what gcsfuse and s3fs answer a link(2)
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "link", refused)
    root = tmp_path / "mounted-bucket" / "index"
    assert index_main(["create", "--index", str(root), "--model_handle", mobilenet_handle]) == 2
    err = capsys.readouterr().err
    assert "refuses hard links or file locks" in err and "gcsfuse" in err and "gs:// directly" in err
    assert os.listdir(root) == []  # no index.json: nothing half-created, and no probe left
