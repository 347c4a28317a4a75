"""What a new user meets first: every image of a folder, counts, typos, clear model errors, progress, a quiet summary."""

import io
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, SAMPLES, encode, photo, read_embeddings, read_errors, run_pipeline
from pipeline.models import MODELS
from pipeline.progress import ProgressDisplay, progress_line
from pipeline.runtime import with_direct_defaults


@pytest.fixture
def nested_photos(tmp_path):
    """Photos at every depth, with unicode names and mixed-case extensions, plus files that are not images."""
    root = tmp_path / "photos"
    names = ["top.jpg", "Été/chat.JPG", "2024/01/été-ü.png", "2024/01/deep/x.jpeg", "a b/c.webp"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(photo(["rocket", "chelsea", "coffee", "astronaut", "retina"][i])[:80, :90],
                                         "PNG" if name.endswith("png") else "WEBP" if name.endswith("webp") else "JPEG"))
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "thumbs.db").write_bytes(b"\0")
    return root, sorted(str(root / n) for n in names)


@pytest.mark.parametrize("suffix", ["", "/**", "/**/*"])
def test_a_folder_or_globstar_gives_every_image_at_every_depth(tmp_path, nested_photos, mobilenet_handle, capsys,
                                                               suffix):
    root, images = nested_photos
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{root}{suffix}", "--output", str(out), "--model_handle", mobilenet_handle) == 0
    found = sorted(read_embeddings(str(out)).column("id").to_pylist())
    printed = capsys.readouterr().out
    if suffix:  # a glob takes every file it matches: the two that are not images are reported, not skipped
        assert found == images and len(read_errors(str(out))) == 2
        assert "as a glob: 7 files matched." in printed
    else:
        assert found == images and len(read_errors(str(out))) == 0
        assert "as a folder: 5 image files under it; 2 other files left out by extension" in printed
    report = json.loads((out / "_run_report.json").read_text())
    assert report["input_found"]["count"] == (7 if suffix else 5)
    if not suffix:  # a reader of the whole folder is not tripped by the report (its name starts with _)
        import pandas as pd

        assert sorted(pd.read_parquet(out)["id"]) == images


def test_a_typo_in_an_option_is_an_error_that_suggests_the_right_one(tmp_path, capsys):
    for typo, right in (("--overwirte", "--overwrite"), ("--direct_num_workrs", "--direct_num_workers")):
        with pytest.raises(SystemExit) as exit_info:
            run_pipeline("--input", SAMPLES, "--output", str(tmp_path / "o"), typo)
        assert exit_info.value.code == 2
        assert f"unrecognized option {typo}: neither this project nor Beam knows it; did you mean {right}?" \
            in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a required flag mistyped: the typo, not "--input is required"
        run_pipeline("--inptu", SAMPLES, "--output", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized option --inptu" in err and "did you mean --input?" in err
    assert len(err.splitlines()) == 2  # the error and where to find every option, no screen of usage
    assert not os.path.exists(tmp_path / "o")


def test_beam_options_still_pass(tmp_path, mobilenet_handle):
    assert run_pipeline("--input", f"{SAMPLES}/rocket.jpg", "--output", str(tmp_path / "o"), "--model_handle",
                        mobilenet_handle, "--runner", "DirectRunner", "--direct_running_mode", "in_memory",
                        "--experiments", "a", "--experiments=b", "--job_name", "x") == 0


def test_a_handle_with_another_input_size_says_what_to_pass(tmp_path, capsys, mobilenet_handle):
    code = run_pipeline("--input", SAMPLES, "--output", str(tmp_path / "o"), "--model", "inception_resnet_v2",
                        "--model_handle", mobilenet_handle)
    err = capsys.readouterr().err
    assert code == 2 and not os.path.exists(tmp_path / "o")
    mobilenet, inception = MODELS["mobilenet_v2_130_224"], MODELS["inception_resnet_v2"]
    side, other = mobilenet.input_size, inception.input_size
    assert f"The model at {mobilenet_handle} accepts {side}x{side} images, not {other}x{other}: it takes " \
           f"{side}x{side} images to {mobilenet.dim}-dim vectors, as {mobilenet.name} does: pass --model " \
           f"{mobilenet.name}." in err
    assert "Traceback" not in err and len(err) < 400


def test_a_folder_that_holds_the_savedmodel_names_the_handle_to_pass(tmp_path, capsys, mobilenet_handle):
    cache = os.path.dirname(mobilenet_handle)
    single = tmp_path / "cache"
    single.mkdir()
    os.symlink(mobilenet_handle, single / os.path.basename(mobilenet_handle))
    code = run_pipeline("--input", SAMPLES, "--output", str(tmp_path / "o"), "--model_handle", str(single))
    assert code == 2 and f"pass --model_handle {single / os.path.basename(mobilenet_handle)}" in capsys.readouterr().err
    assert os.path.isdir(cache)


def test_an_unreachable_hub_names_the_offline_ways_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty-cache"))
    code = run_pipeline("--input", SAMPLES, "--output", str(tmp_path / "o"),
                        "--model_handle", "https://hub.invalid/google/imagenet/mobilenet_v2_130_224/feature_vector/4")
    err = capsys.readouterr().err
    assert code == 2 and "python -m pipeline.standin_models --model MODEL --output .cache/standins" in err
    assert "Models without a route to the hub" in err
    assert not os.path.exists(tmp_path / "o")


def test_the_standin_builder_prints_the_handle_to_pass(mobilenet_handle):
    result = subprocess.run([sys.executable, "-m", "pipeline.standin_models", "--model", "mobilenet_v2_130_224",
                             "--output", os.path.dirname(mobilenet_handle)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == mobilenet_handle
    assert f"--model_handle {mobilenet_handle}" in result.stderr
    assert "absl" not in result.stderr and "cuInit" not in result.stderr


def test_progress_lines_start_within_the_first_interval_and_say_time_left(tmp_path):
    stream = io.StringIO()
    display = ProgressDisplay(total=100, interval_s=0.2, stream=stream)
    with display:
        (open(os.path.join(display.directory, "host-1"), "w")).write("0")
        import time
        time.sleep(0.35)
        for done in (10, 30):
            with open(os.path.join(display.directory, "host-1"), "w") as f:
                f.write(str(done))
            time.sleep(0.7)
        with open(os.path.join(display.directory, "host-2"), "w") as f:
            f.write("70")
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "progress: 0 / 100 inputs done (0%); starting (workers load the model)"
    assert lines[-1].startswith("progress: 100 / 100 inputs done (100%), ")
    assert any("about" in line and "left" in line for line in lines)
    assert len(set(lines)) == len(lines)  # the final line once, not again at the end
    assert display.steady_rate and lines[-1].endswith(f"{display.steady_rate:.1f} images/s")


def test_progress_line_wording():
    assert progress_line(25, 100, 5.0) == "progress: 25 / 100 inputs done (25%), 5.0 images/s, about 15 s left"
    assert progress_line(1, 10_000, 2.0).endswith("about 1 h 23 min left")


def test_progress_is_a_bar_redrawn_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    display = ProgressDisplay(total=10, interval_s=10, stream=stream)
    with display:
        with open(os.path.join(display.directory, "host-1"), "w") as f:
            f.write("10")
        import time
        time.sleep(0.8)
    drawn = stream.getvalue()
    assert "10/10" in drawn and ("\r" in drawn or "\x1b[" in drawn)
    assert "progress:" not in drawn


def test_by_default_the_direct_runner_gets_a_worker_process_per_core():
    cores = os.cpu_count()
    picked = with_direct_defaults([])
    if cores >= 2:
        assert picked == ["--direct_running_mode=multi_processing", f"--direct_num_workers={cores}"]
    assert with_direct_defaults(["--direct_num_workers=1"]) == ["--direct_num_workers=1"]
    assert with_direct_defaults(["--runner", "DataflowRunner"]) == ["--runner", "DataflowRunner"]


def test_a_plain_run_is_quiet_fast_by_default_and_says_so(tmp_path):
    """The command as a user types it: no TensorFlow or Beam chatter, and the worker setting it picked."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", SAMPLES, "--output", str(out),
                             "--model_handle", _standin_path()], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("cuInit", "absl", "Resource module", "semi_persistent", "Discarding", "oneDNN", "WARNING root"):
        assert noise not in result.stderr, result.stderr
    n = len(os.listdir(SAMPLES))
    assert f"Reading --input {SAMPLES} as a folder: {n} image files under it." in result.stdout
    cores = os.cpu_count()
    if cores >= 2:
        assert f"DirectRunner, {cores} worker processes x 1 litert thread (picked for this machine" in result.stdout
    assert len(result.stdout.splitlines()) <= 6


def test_verbose_shows_what_quiet_hides(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", f"{SAMPLES}/rocket.jpg", "--output",
                             str(tmp_path / "o"), "--model_handle", _standin_path(), "--verbose",
                             "--direct_running_mode=in_memory"], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 0 and "INFO" in result.stderr


def _standin_path():
    from conftest import _standin

    return _standin("mobilenet_v2_130_224")


def test_words_are_singular_when_they_should_be(tmp_path, mobilenet_handle, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(photo("rocket")[:60, :60], "JPEG"))
    (folder / "b.jpg").write_bytes(encode(photo("rocket"), "JPEG")[:2000])
    assert run_pipeline("--input", str(folder), "--output", str(tmp_path / "o"), "--model_handle",
                        mobilenet_handle) == 0
    out = capsys.readouterr().out
    assert "Embedded 1 image (" in out and "1 input was not embedded (decode 1)" in out
    [error] = read_errors(str(tmp_path / "o")).to_pylist()
    assert "Pass --allow_truncated_images to embed it with the missing part grey." in error["error"]
