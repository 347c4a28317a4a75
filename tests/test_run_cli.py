"""The command line: documented options, and clear errors before any work starts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, SAMPLES, read_embeddings, read_errors, run_pipeline, tiles
from pipeline.models import MODELS
from pipeline.options import build_parser


def test_help_documents_every_project_option():
    text = build_parser().format_help()
    for flag in ("--input", "--output", "--overwrite", "--model", "--model_handle", "--image_size", "--embedding_dim",
                 "--resize_mode", "--max_image_pixels", "--max_image_bytes", "--allow_truncated_images",
                 "--http_timeout", "--http_retries", "--batch_size", "--tf_intra_op_threads",
                 "--tf_inter_op_threads", "--large_model", "--decode_threads", "--bfloat16", "--skip_existing",
                 "--force_full_run", "--max_error_rate", "--progress_interval", "--tfrecord_image_feature",
                 "--tfrecord_id_feature", "--read_retries", "--verbose", "--engine", "--compiled_cache"):
        assert flag in text
    assert "Beam pipeline option" in text


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "pipeline.run", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "mobilenet_v2_130_224 (224x224, 1664-dim)" in " ".join(result.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet50"], "Unknown model 'resnet50'"),
    (["--model", "mobilenet_v2_130_224", "--image_size", "299"], "fixed 224x224"),
    (["--batch_size", "0"], "must be a positive integer"),
])
def test_bad_options_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("--input", f"{SAMPLES}/*", "--output", str(tmp_path), *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_handle_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    code = run_pipeline("--input", f"{SAMPLES}/*", "--output", str(tmp_path / "o"),
                        "--model_handle", str(tmp_path / "no-such-model"))
    assert code == 2
    assert f"Model handle {tmp_path / 'no-such-model'} does not exist (no such folder)." in capsys.readouterr().err


def test_an_unreachable_hub_is_a_clear_error_and_never_a_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty-cache"))
    code = run_pipeline("--input", f"{SAMPLES}/*", "--output", str(tmp_path / "o"),
                        "--model_handle", "https://hub.invalid/google/imagenet/mobilenet_v2_130_224/feature_vector/4")
    assert code == 2 and "Cannot reach the host of model handle https://hub.invalid/" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "embeddings-00000-of-00001.parquet")


def test_a_model_whose_output_dim_differs_from_the_declared_one_is_refused(tmp_path, capsys, mobilenet_handle):
    mobilenet = MODELS["mobilenet_v2_130_224"]
    code = run_pipeline("--input", f"{SAMPLES}/*", "--output", str(tmp_path / "o"), "--model", "custom",
                        "--model_handle", mobilenet_handle, "--image_size", str(mobilenet.input_size),
                        "--embedding_dim", "1000")
    assert code == 2 and (f"is not 1000-dim: it takes {mobilenet.input_size}x{mobilenet.input_size} images to "
                          f"{mobilenet.dim}-dim vectors, as "
                          f"{mobilenet.name} does: pass --model {mobilenet.name}.") in capsys.readouterr().err


def test_a_manifest_without_uri_column_is_refused_before_the_run(tmp_path, capsys, mobilenet_handle):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n1,/x.jpg\n")
    code = run_pipeline("--input", str(manifest), "--output", str(tmp_path / "o"), "--model_handle", mobilenet_handle)
    assert code == 2 and "has no 'uri' column (columns: id, path)" in capsys.readouterr().err


def test_an_earlier_run_in_the_output_is_refused_unless_overwrite(tmp_path, capsys, mobilenet_handle):
    out = str(tmp_path / "o")
    args = ("--input", f"{SAMPLES}/rocket.jpg*", "--output", out, "--model_handle", mobilenet_handle)
    assert run_pipeline(*args) == 0
    assert run_pipeline(*args) == 2
    assert "already holds the results of an earlier run" in capsys.readouterr().err
    assert run_pipeline(*args, "--overwrite") == 0
    assert read_embeddings(out).num_rows == 1


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path, capsys, mobilenet_handle):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = run_pipeline("--input", f"{SAMPLES}/*", "--output", str(blocker / "out"), "--model_handle", mobilenet_handle)
    assert code == 2 and f"Cannot write to --output {blocker / 'out'}" in capsys.readouterr().err


def test_txt_manifest_ids_duplicates_and_missing_files_through_the_pipeline(tmp_path, mobilenet_handle):
    rocket, chelsea = f"{SAMPLES}/rocket.jpg", f"{SAMPLES}/chelsea.png"
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"# corpus\n{rocket}\n\n{chelsea}\n{rocket}\n{tmp_path}/missing.jpg\n")
    out = str(tmp_path / "o")
    assert run_pipeline("--input", str(manifest), "--output", out, "--model_handle", mobilenet_handle) == 0
    assert sorted(read_embeddings(out).column("id").to_pylist()) == sorted([rocket, chelsea])
    errors = {(r["id"], r["stage"]): r["error"] for r in read_errors(out).to_pylist()}
    assert errors == {
        (rocket, "manifest"): f"Duplicate id: the row at byte {len(rocket) + len(chelsea) + 12} repeats the id of the "
                              f"row at byte 9, which is the one embedded.",
        (f"{tmp_path}/missing.jpg", "read"): f"{tmp_path}/missing.jpg does not exist.",
    }


def test_run_local_script_embeds_the_samples_and_falls_back_loudly_when_the_hub_is_unreachable(tmp_path):
    env = {**os.environ, "TFHUB_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run([os.path.join(REPO, "run_local.sh"), str(tmp_path / "out")], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.startswith("tfhub.dev cannot be reached: using a random-weight stand-in")  # at once, once
    assert result.stderr.count("cannot be reached") == 1
    assert (result.stderr + result.stdout).lower().count("not meaningful") == 1  # the closing warning, once
    assert "cuInit" not in result.stderr and "images/s overall, worker start-up included" in result.stdout
    assert "python -m pipeline.standin_models" in result.stderr and "Models without a route to the hub" in result.stderr
    n_samples = len(os.listdir(SAMPLES))
    assert f"Embedded {n_samples} images (mobilenet_v2_130_224, dim 1664)" in result.stdout
    assert "No errors." in result.stdout and "NOT meaningful" in result.stdout
    table = read_embeddings(str(tmp_path / "out"))
    assert table.num_rows == n_samples and table.schema.metadata[b"embedding.weights"].startswith(b"STAND-IN")

    # The commands it prints next run as written, from the checkout: reading the output, and embedding a folder.
    lines = result.stdout.splitlines()
    reading = lines[lines.index(next(l for l in lines if l.startswith("The vectors are in"))) + 1].strip()
    read = subprocess.run(["bash", "-c", reading], capture_output=True, text=True, cwd=REPO)
    assert read.returncode == 0 and f"[{n_samples} rows x 4 columns]" in read.stdout, read.stderr
    own = lines[lines.index("Embed your own folder with the same stand-in:") + 1].strip()
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES, photos / "nested")
    own = own.replace("/path/to/photos", str(photos)).replace("out/photos", str(tmp_path / "mine"))
    embedded = subprocess.run(["bash", "-c", own], capture_output=True, text=True, cwd=REPO, env=env)
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    assert read_embeddings(str(tmp_path / "mine")).num_rows == n_samples


def test_overwrite_deletes_nothing_when_a_later_check_refuses_the_run(tmp_path, capsys, mobilenet_handle):
    out = str(tmp_path / "o")
    args = ("--input", f"{SAMPLES}/rocket.jpg*", "--output", out)
    assert run_pipeline(*args, "--model_handle", mobilenet_handle) == 0
    before = sorted(os.listdir(out))
    assert run_pipeline(*args, "--model_handle", str(tmp_path / "no-such-model"), "--overwrite") == 2
    assert sorted(os.listdir(out)) == before


def test_skip_existing_may_not_be_the_output_itself(tmp_path, capsys, mobilenet_handle):
    out = str(tmp_path / "o")
    args = ("--input", f"{SAMPLES}/rocket.jpg*", "--output", out, "--model_handle", mobilenet_handle)
    assert run_pipeline(*args) == 0
    assert run_pipeline(*args, "--skip_existing", out + "/", "--overwrite") == 2
    assert "--skip_existing and --output are the same folder" in capsys.readouterr().err
    assert read_embeddings(out).num_rows == 1


def test_an_unfinished_run_is_not_accepted_as_an_earlier_output(tmp_path, capsys, mobilenet_handle):
    first = tmp_path / "first"
    assert run_pipeline("--input", f"{SAMPLES}/rocket.jpg*", "--output", str(first), "--model_handle",
                        mobilenet_handle) == 0
    for marker in ("_run_report.json", "_pipeline_done.json"):
        (first / marker).unlink()  # as if the job died between its sinks and its last step
    code = run_pipeline("--input", f"{SAMPLES}/*", "--output", str(tmp_path / "second"), "--model_handle",
                        mobilenet_handle, "--skip_existing", str(first))
    assert code == 2
    assert "is not a finished run (no _run_report.json or _pipeline_done.json)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "second")


def test_the_job_marks_its_output_finished_itself_so_a_lost_launcher_costs_no_rerun(tmp_path, mobilenet_handle):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_pipeline("--input", f"{SAMPLES}/*", "--output", str(first), "--model_handle", mobilenet_handle) == 0
    report = json.loads((first / "_run_report.json").read_text())["counts"]
    marker = json.loads((first / "_pipeline_done.json").read_text())
    assert marker["counts"] == {"embedded": report["embedded"], "errors": report["errors"], "skipped_existing": 0}
    assert marker["files"] == sorted(p.name for p in first.glob("*.parquet"))
    (first / "_run_report.json").unlink()  # the launcher's laptop slept before the job ended; the job did not

    assert run_pipeline("--input", f"{SAMPLES}/*", "--output", str(second), "--model_handle", mobilenet_handle,
                        "--skip_existing", str(first)) == 0
    counts = json.loads((second / "_run_report.json").read_text())["counts"]
    assert (counts["embedded"], counts["skipped_existing"]) == (0, report["embedded"])


def test_a_job_that_fails_on_a_remote_runner_ends_in_one_clear_error_and_exit_1(tmp_path, capsys, monkeypatch,
                                                                                mobilenet_handle):
    def failed_on_the_cluster(pipeline, *args, **kwargs):
        raise RuntimeError("Pipeline BeamApp-x failed in state FAILED: java.lang.Exception: Recovery is suppressed\n"
                           "\tat org.apache.flink...")

    monkeypatch.setattr("pipeline.run.run_to_end", failed_on_the_cluster)
    out = tmp_path / "out"
    code = run_pipeline("--input", f"{SAMPLES}/rocket.jpg", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--compiled_cache", str(tmp_path / "cache"), "--runner=PortableRunner",
                        "--job_endpoint=localhost:1")
    err = capsys.readouterr().err
    assert code == 1
    assert ("error: The job failed on PortableRunner: Pipeline BeamApp-x failed in state FAILED: java.lang.Exception: "
            "Recovery is suppressed at org.apache.flink...\nNo finished marker was written") in err
    assert "Traceback" not in err and not list(out.glob("_*.json"))


def test_ctrl_c_during_a_run_says_one_line_leaves_no_partial_files_and_exits_130(tmp_path, mobilenet_handle):
    tiles(tmp_path / "imgs", 60)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pipeline.run", "--input", str(tmp_path / "imgs"), "--output",
                                str(out), "--model_handle", mobilenet_handle, "--progress_interval=0",
                                "--batch_size=1"], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("beam-temp-*/*")):  # the sinks are writing
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.splitlines() == [f"Interrupted: the run into {out} stopped before it finished (no _run_report.json); "
                                f"its partial files were removed. Run the same command with --overwrite to start "
                                f"again."]
    assert not list(out.glob("beam-temp-*")) and not (out / "_run_report.json").exists()
