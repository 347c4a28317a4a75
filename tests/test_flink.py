"""On a real Flink cluster: a JobManager and two TaskManagers as their own JVMs, Beam's Flink job server, and the
Python stages in an SDK worker pool (`--environment_type EXTERNAL`). The same commands as the README's."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from helpers import (
    REPO,
    encode,
    new_index,
    photo,
    read_embeddings,
    read_errors,
    run_pipeline,
    tiles,
    vectors_by_id,
    write_manifest,
)
from pipeline.index.__main__ import main as index_main


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """A manifest of 10 images, 3 files that are no image, and 1 that does not exist: (manifest, good ids, bad ids)."""
    folder = tmp_path_factory.mktemp("mixed")
    good = [(f"img-{n}", path) for n, path in enumerate(tiles(folder / "images", 10))]
    truncated = encode(photo("astronaut")[:200, :200], "JPEG")
    hostile = {"truncated.jpg": truncated[:len(truncated) // 2], "empty.jpg": b"", "notes.jpg": b"not an image\n"}
    for name, data in hostile.items():
        (folder / name).write_bytes(data)
    bad = [(name.split(".")[0], str(folder / name)) for name in hostile] + [("missing", str(folder / "missing.png"))]
    return write_manifest(folder / "manifest.csv", good + bad), [i for i, _ in good], [i for i, _ in bad]


def _every_input_once(out, good_ids, bad_ids):
    embedded = read_embeddings(str(out)).column("id").to_pylist()
    failed = read_errors(str(out)).column("id").to_pylist()
    assert sorted(embedded) == sorted(good_ids) and sorted(failed) == sorted(bad_ids)


def test_a_run_on_flink_accounts_for_every_input_once_with_direct_runner_vectors(
        tmp_path, flink, mixed_corpus, mobilenet_handle, capfd):
    manifest, good_ids, bad_ids = mixed_corpus
    cache = tmp_path / "compiled"  # a folder every TaskManager reads: on this machine, any local folder
    args = ("--input", manifest, "--model_handle", mobilenet_handle, "--compiled_cache", str(cache))

    assert run_pipeline(*args, "--output", str(tmp_path / "flink"), "--progress_interval=1", *flink.beam_args()) == 0
    err = capfd.readouterr().err
    assert f"WARNING: on FlinkRunner every worker reads these local paths itself: --input {manifest}" in err
    # Beam's six "Waiting for grpc channel" lines are one sentence; the worker pool is here, so progress is counted.
    assert "Waiting for grpc channel" not in err and err.count("Starting FlinkRunner's job server") <= 1
    assert "progress: 14 / 14 inputs done (100%)" in err
    assert run_pipeline(*args, "--output", str(tmp_path / "direct")) == 0

    _every_input_once(tmp_path / "flink", good_ids, bad_ids)
    on_flink = vectors_by_id(read_embeddings(str(tmp_path / "flink")))
    on_direct = vectors_by_id(read_embeddings(str(tmp_path / "direct")))
    assert max(np.abs(on_flink[i] - on_direct[i]).max() for i in good_ids) < 1e-5
    report = json.loads((tmp_path / "flink" / "_run_report.json").read_text())
    assert report["runner"] == "FlinkRunner"
    assert report["counts"] == {"inputs": 14, "embedded": 10, "skipped_existing": 0, "errors": 4,
                                "errors_by_stage": {"decode": 3, "read": 1}}
    marker = json.loads((tmp_path / "flink" / "_pipeline_done.json").read_text())
    assert marker["counts"] == {"embedded": 10, "errors": 4, "skipped_existing": 0}
    assert list(cache.glob("*.tflite")), "the launcher compiled the model into the shared cache"


def test_a_compiled_cache_on_the_launchers_home_is_refused_before_the_job_starts(
        tmp_path, flink, mixed_corpus, mobilenet_handle, capsys):
    manifest, _, _ = mixed_corpus
    jobs_before = flink.overview()
    code = run_pipeline("--input", manifest, "--output", str(tmp_path / "out"), "--model_handle", mobilenet_handle,
                        *flink.beam_args())
    assert code == 2
    assert ("error: On FlinkRunner the workers load the compiled model from --compiled_cache, which defaults to "
            f"{os.path.expanduser('~')}/.cache/beam-image-embeddings/compiled on this machine, where no worker reads "
            "it. Pass --temp_location or --compiled_cache") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    after = flink.overview()
    assert [after[k] for k in ("jobs-finished", "jobs-failed", "jobs-cancelled", "jobs-running")] == \
        [jobs_before[k] for k in ("jobs-finished", "jobs-failed", "jobs-cancelled", "jobs-running")]


def test_three_nights_of_index_updates_through_flink_equal_the_direct_runner_index(tmp_path, flink, mobilenet_handle,
                                                                                    capsys):
    images = tiles(tmp_path / "images", 12)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    nights = [
        [(f"id-{n}", images[n]) for n in range(6)],
        [(f"id-{n}", images[n]) for n in (1, 3, 4, 5)] + [("id-2", images[9]), ("id-6", images[6]),
                                                          ("id-7", images[7])],
        [(f"id-{n}", images[n]) for n in (1, 3, 4, 6, 7)] + [("id-5", images[10]), ("id-8", images[8]),
                                                             ("id-9", str(broken))],
    ]
    cache = tmp_path / "compiled"
    roots = {"flink": str(tmp_path / "index-flink"), "direct": str(tmp_path / "index-direct")}
    runner_args = {"flink": flink.beam_args(), "direct": ["--direct_running_mode=in_memory"]}
    for root in roots.values():
        new_index(root, mobilenet_handle)
    for number, pairs in enumerate(nights, 1):
        manifest = write_manifest(tmp_path / f"night-{number}.csv", pairs)
        for kind, root in roots.items():
            assert index_main(["update", "--index", root, "--input", manifest, "--compiled_cache", str(cache),
                               "--progress_interval=0", *runner_args[kind]]) == 0, (kind, number)
            runs = {"flink": "1 run of at most 1,000,000.", "direct": "1 run of at most 10,000."}[kind]
            assert runs in capsys.readouterr().out  # a night is one job on a remote runner

    views = {}
    for kind, root in roots.items():
        assert index_main(["snapshot", "--index", root, "--output", str(tmp_path / f"view-{kind}")]) == 0
        views[kind] = read_embeddings(str(tmp_path / f"view-{kind}"))
    rows = {kind: sorted(zip(v.column("id").to_pylist(), v.column("uri").to_pylist())) for kind, v in views.items()}
    assert rows["flink"] == rows["direct"] == sorted((i, u) for i, u in nights[-1] if i != "id-9")
    flink_vectors, direct_vectors = vectors_by_id(views["flink"]), vectors_by_id(views["direct"])
    assert max(np.abs(flink_vectors[i] - direct_vectors[i]).max() for i in direct_vectors) < 1e-5


def _running_job(flink, timeout_s=120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{flink.master}/jobs", timeout=5) as answer:
            running = [job["id"] for job in json.load(answer)["jobs"] if job["status"] == "RUNNING"]
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError("no job started on the cluster")


def _failures_seen(flink, job_id) -> list[str]:
    """The exceptions Flink recorded for the job (each one a failure it restarted from, or ended in)."""
    with urllib.request.urlopen(f"http://{flink.master}/jobs/{job_id}/exceptions", timeout=5) as answer:
        return [entry["exceptionName"] for entry in json.load(answer)["exceptionHistory"]["entries"]]


def _wait_for_end(flink, job_id, timeout_s=300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{flink.master}/jobs/{job_id}", timeout=5) as answer:
            state = json.load(answer)["state"]
        if state in ("FINISHED", "FAILED", "CANCELED"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still running after {timeout_s} s")


def test_a_job_outlives_its_launcher_and_still_counts_as_a_finished_run(
        tmp_path, flink, mixed_corpus, mobilenet_handle):
    manifest, good_ids, bad_ids = mixed_corpus
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "--input", manifest, "--output", str(out), "--model_handle",
         mobilenet_handle, "--compiled_cache", str(tmp_path / "compiled"), *flink.beam_args()],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job = _running_job(flink)
    os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the launcher's terminal: the launcher and its job server
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130
    assert err.splitlines()[-1] == (
        "Interrupted: this launcher stopped, but the job may still be running on FlinkRunner: cancel it there to "
        f"stop it. If it finishes, {out} is a finished run (its _pipeline_done.json); if not, run the same command "
        "with --overwrite.")
    assert _wait_for_end(flink, job) == "FINISHED"
    assert not (out / "_run_report.json").exists()
    assert json.loads((out / "_pipeline_done.json").read_text())["counts"]["embedded"] == len(good_ids)
    _every_input_once(out, good_ids, bad_ids)
    assert run_pipeline("--input", manifest, "--output", str(tmp_path / "next"), "--model_handle", mobilenet_handle,
                        "--skip_existing", str(out)) == 0
    counts = json.loads((tmp_path / "next" / "_run_report.json").read_text())["counts"]
    assert (counts["embedded"], counts["skipped_existing"]) == (0, len(good_ids))


def test_a_taskmanager_killed_mid_job_loses_and_doubles_nothing(tmp_path, flink, mobilenet_handle):
    images = tiles(tmp_path / "images", 400)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.run", "--input", str(tmp_path / "images"), "--output", str(out),
               "--model_handle", mobilenet_handle, "--compiled_cache", str(tmp_path / "compiled"),
               "--batch_size=2", *flink.beam_args()]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = _running_job(flink)
        time.sleep(4)  # the Python stages are embedding
        assert launcher.poll() is None and flink.running_jobs() == 1, "the job ended before the kill"
        flink.kill_taskmanager(flink.busy_taskmanager())
        _, err = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        flink.start_taskmanager()  # the next test finds two TaskManagers again
    if launcher.returncode == 0:
        assert _failures_seen(flink, job), "the job recovered from the lost TaskManager by restarting"
    else:  # failed clearly; the same command (with --overwrite) completes it
        assert "error: The job failed on FlinkRunner: " in err
        rerun = subprocess.run([*command, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
    ids = read_embeddings(str(out)).column("id").to_pylist()
    assert sorted(ids) == sorted(images) and len(ids) == len(set(ids))
    assert not list(out.glob("beam-temp-*"))


def test_the_local_cluster_recipe_prints_its_options_and_stops_every_process_it_started(tmp_path):
    from conftest import FLINK_CACHE

    command = [sys.executable, "-m", "pipeline.flink", "up", "--cache", FLINK_CACHE, "--folder", str(tmp_path),
               "--taskmanagers", "1"]
    up = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [up.stdout.readline() for _ in range(4)]
    assert lines[1].startswith("Send jobs to it with these Beam options"), lines
    assert lines[3].startswith(f"They are also in {tmp_path / 'beam-options'}: add $(cat "), lines
    options = lines[2].split()
    assert options[0] == "--runner=FlinkRunner" and "--environment_type=EXTERNAL" in options
    assert (tmp_path / "beam-options").read_text().split() == options  # for $(cat FOLDER/beam-options)
    master = next(o.split("=", 1)[1] for o in options if o.startswith("--flink_master="))
    with urllib.request.urlopen(f"http://{master}/overview", timeout=5) as answer:
        assert json.load(answer)["taskmanagers"] == 1
    started = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
    assert len(started) == 3  # JobManager, TaskManager, SDK worker pool
    up.send_signal(signal.SIGTERM)  # as a scheduler (or Ctrl-C) stops it
    assert up.communicate(timeout=60)[0].strip() == "Flink stopped." and up.returncode == 0
    assert not [pid for pid in started if os.path.exists(f"/proc/{pid}")]
    assert tmp_path.exists()  # a --folder given is the user's: kept (a folder of its own is removed)


def test_a_search_index_built_on_flink_is_the_single_process_build(tmp_path, flink):
    """search build with Flink's options: the sampling and adding passes run on the TaskManagers' Python workers;
    the quantizer and every inverted list equal those of the single-process build of the same view."""
    from helpers import Nights, search_ids_by_row, search_lists
    from pipeline.search.__main__ import main as search

    root, alone, across = str(tmp_path / "root"), str(tmp_path / "alone"), str(tmp_path / "flink")
    index = Nights(root)
    index.night(new=2000)
    index.night(new=300, changed=200, removed=100)
    assert search(["build", "--index", root, "--output", alone, "--kind", "compressed"]) == 0
    assert search(["build", "--index", root, "--output", across, "--kind", "compressed", *flink.beam_args()]) == 0
    assert json.loads((tmp_path / "flink" / "search.json").read_text())["built_by"] == \
        {"runner": "FlinkRunner", "shards": 2}
    assert search_ids_by_row(across) == search_ids_by_row(alone)
    assert sorted(search_ids_by_row(across)) == sorted(index.view)
    for built_alone, built_across in zip(search_lists(alone), search_lists(across), strict=True):
        np.testing.assert_array_equal(built_alone, built_across)
