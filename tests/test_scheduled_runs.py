"""Scheduled, incremental indexing: run report, error-rate exit code, skipping ids already embedded."""

import json
import os

import pytest

from helpers import PHOTO_NAMES, encode, photo, read_embeddings, read_errors, run_pipeline


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in PHOTO_NAMES[:3]:
        (folder / f"{name}.png").write_bytes(encode(photo(name)[:120, :160], "PNG"))
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_run_report_counts_everything_and_names_the_software(tmp_path, corpus, mobilenet_handle, capsys):
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--batch_size", "2") == 0
    report = json.loads((out / "_run_report.json").read_text())
    assert report["counts"] == {"inputs": 4, "embedded": 3, "skipped_existing": 0, "errors": 1,
                                "errors_by_stage": {"decode": 1}}
    assert (report["model"], report["dim"], report["image_size"], report["runner"]) == (
        "mobilenet_v2_130_224", 1664, 224, "DirectRunner")
    assert report["handle"] == mobilenet_handle and report["images_per_second"] > 0
    assert report["started_at"] < report["finished_at"]
    assert set(report["versions"]) >= {"apache-beam", "tensorflow", "tensorflow-hub", "tfx-bsl", "pyarrow", "python"}
    assert report["model_loads"] == 1
    metrics = report["metrics"]
    assert metrics["counters"]["decoded"] == 3 and metrics["counters"]["decode_errors"] == 1
    assert metrics["distributions"]["inference_request_batch_size"]["max"] <= 2
    assert "inference_batch_latency_micro_secs" in metrics["distributions"]
    assert "Run report:" in capsys.readouterr().out


def test_max_error_rate_fails_the_command_after_writing_all_outputs(tmp_path, corpus, mobilenet_handle, capsys):
    out = tmp_path / "out"
    code = run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--max_error_rate", "0.2")
    assert code == 3 and "1 of 4 inputs failed, more than --max_error_rate 0.2" in capsys.readouterr().err
    assert read_embeddings(str(out)).num_rows == 3 and read_errors(str(out)).num_rows == 1
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--max_error_rate", "0.25", "--overwrite") == 0


def test_skip_existing_embeds_only_new_ids(tmp_path, corpus, mobilenet_handle):
    first, second = tmp_path / "night-1", tmp_path / "night-2"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(first), "--model_handle", mobilenet_handle) == 0
    (corpus / "new.png").write_bytes(encode(photo("retina")[:100, :100], "PNG"))
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(second), "--model_handle", mobilenet_handle,
                        "--skip_existing", str(first)) == 0
    assert read_embeddings(str(second)).column("id").to_pylist() == [str(corpus / "new.png")]
    assert read_errors(str(second)).column("id").to_pylist() == [str(corpus / "broken.png")]  # retried each night
    counts = json.loads((second / "_run_report.json").read_text())["counts"]
    assert counts == {"inputs": 5, "embedded": 1, "skipped_existing": 3, "errors": 1, "errors_by_stage": {"decode": 1}}


def test_skip_existing_refuses_a_previous_run_with_other_preprocessing(tmp_path, corpus, mobilenet_handle, capsys):
    first, second = tmp_path / "night-1", tmp_path / "night-2"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(first), "--model_handle", mobilenet_handle) == 0
    args = ("--input", f"{corpus}/*", "--output", str(second), "--model_handle", mobilenet_handle,
            "--skip_existing", str(first), "--resize_mode", "center_crop")
    assert run_pipeline(*args) == 2
    assert "was made with another model or preprocessing (preprocessing:" in capsys.readouterr().err
    assert not os.path.exists(second / "_run_report.json")
    assert run_pipeline(*args, "--force_full_run") == 0
    assert read_embeddings(str(second)).num_rows == 3


def test_skip_existing_needs_a_previous_output(tmp_path, corpus, mobilenet_handle, capsys):
    code = run_pipeline("--input", f"{corpus}/*", "--output", str(tmp_path / "o"), "--model_handle", mobilenet_handle,
                        "--skip_existing", str(tmp_path / "nothing-here"))
    assert code == 2 and "holds no embeddings-*.parquet files" in capsys.readouterr().err


def test_progress_lines_in_logs_count_every_input_against_the_total(tmp_path, corpus, mobilenet_handle, capfd):
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(tmp_path / "out"), "--model_handle",
                        mobilenet_handle, "--progress_interval", "0.2") == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("progress: ")]
    assert lines and lines[-1].startswith("progress: 4 / 4 inputs done (100%)")  # the failure counts as done


def test_progress_lines_can_be_turned_off(tmp_path, corpus, mobilenet_handle, capfd):
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(tmp_path / "out"), "--model_handle",
                        mobilenet_handle, "--progress_interval", "0") == 0
    assert "progress: " not in capfd.readouterr().err
