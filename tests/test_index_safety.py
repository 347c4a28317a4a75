"""No bad night can empty or corrupt an index: on a local folder and on gs:// (fake-gcs-server), with faults.

After every scenario the index is checked the same way: the log reads, every committed run and update names
a folder that exists, and the snapshot holds each live id once with the vector the model gives its image.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import REPO, direct_vectors, new_index, read_embeddings, tiles, vectors_by_id, write_manifest
from pipeline.index.__main__ import main as index_main
from pipeline.index.lease import LeaseBusy, LeaseLost, UpdateLease
from pipeline.index.store import CommitRefused, IndexStore
from pipeline.models import MODELS
from pipeline.storage import Conflict

SIZE = MODELS["mobilenet_v2_130_224"].input_size


def update(root, *args):
    return index_main(["update", "--index", root, *args, "--direct_running_mode=in_memory", "--progress_interval=0"])


def update_command(root, manifest, *extra):
    """The update as its own process; against the emulator without Beam's 25 s search for credentials."""
    launcher = [os.path.join(REPO, "tests", "gcs_launch.py")] if root.startswith("gs://") else ["-m"]
    return [sys.executable, *launcher, "pipeline.index", "update", "--index", root, "--input", manifest,
            "--direct_running_mode=in_memory", "--progress_interval=0", *extra]


def night(tmp_path, name, pairs):
    return write_manifest(tmp_path / f"{name}.csv", pairs)


def check_index(root, tmp_path, expected=None, handle=None):
    """The invariants; with `expected` ({id: path}) the view holds those uris, and with `handle` also vectors
    equal to a reference built directly."""
    store = IndexStore(root)
    entries = store.log()  # reads, numbered 1..N without gaps
    for entry in store.committed_runs(entries):
        assert store.run_files(entry), f"log entry {entry.seq} names {entry.body['run']}, which holds no files"
    for entry in (e for e in entries if e.kind == "update"):
        assert store.live_files(entry), f"log entry {entry.seq} names update {entry.body['update']} without files"
    out = tmp_path / f"snapshot-{time.monotonic_ns()}"
    assert index_main(["snapshot", "--index", root, "--output", str(out)]) == 0
    table = read_embeddings(str(out))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the view twice"
    if expected is not None:
        assert dict(zip(ids, table.column("uri").to_pylist())) == expected
    if handle is not None:
        reference = direct_vectors(handle, sorted(set(expected.values())), SIZE)
        view = vectors_by_id(table)
        for id_, path in expected.items():
            np.testing.assert_allclose(view[id_], reference[path], atol=1e-3 * np.linalg.norm(reference[path]))
    return table


def listing(emulator_root, folder):
    """The emulator request pattern of a listing of ROOT/folder/."""
    prefix = emulator_root.split("/", 3)[3]
    return rf"GET /storage/v1/b/[^/]+/o\?.*prefix={prefix}/{folder}/"


# --- operator mistakes ------------------------------------------------------------------------------------------

def test_an_input_without_rows_and_a_glob_that_matches_nothing_are_refused_and_change_nothing(
        index_root, tmp_path, mobilenet_handle, capsys):
    paths = tiles(tmp_path / "imgs", 3)
    new_index(index_root, mobilenet_handle)
    assert update(index_root, "--input", night(tmp_path, "n1", [(f"i{n}", p) for n, p in enumerate(paths)])) == 0
    entries = IndexStore(index_root).log()
    header_only = tmp_path / "night2.csv"
    header_only.write_text("id,uri\n")
    capsys.readouterr()
    assert update(index_root, "--input", str(header_only)) == 2
    assert "holds no rows: an update from it would remove every id" in capsys.readouterr().err
    assert update(index_root, "--input", str(tmp_path / "night9*.csv")) == 2
    assert f"--input {tmp_path}/night9*.csv matches no files" in capsys.readouterr().err
    assert IndexStore(index_root).log() == entries
    check_index(index_root, tmp_path, {f"i{n}": p for n, p in enumerate(paths)}, mobilenet_handle)


def test_a_mass_removal_is_refused_with_the_count_and_how_to_allow_it(index_root, tmp_path, mobilenet_handle,
                                                                      capsys):
    paths = tiles(tmp_path / "imgs", 6)
    pairs = [(f"i{n}", p) for n, p in enumerate(paths)]
    new_index(index_root, mobilenet_handle)
    assert update(index_root, "--input", night(tmp_path, "n1", pairs)) == 0
    entries = IndexStore(index_root).log()
    cut_short = night(tmp_path, "n2", pairs[:2])
    capsys.readouterr()
    assert update(index_root, "--input", cut_short) == 2
    err = capsys.readouterr().err
    assert "would remove 4 of the 6 live ids (67%), more than --max_removed 0.5 allows; nothing was changed" in err
    assert "--max_removed 4" in err
    assert IndexStore(index_root).log() == entries and IndexStore(index_root).leftovers(entries) == []
    assert update(index_root, "--input", cut_short, "--max_removed", "3") == 2
    assert update(index_root, "--input", cut_short, "--max_removed", "4") == 0
    check_index(index_root, tmp_path, dict(pairs[:2]), mobilenet_handle)


def test_a_night_whose_uris_all_fail_cannot_empty_the_view(tmp_path, mobilenet_handle, capsys):
    """The valve is on the view: ids that stay in the input but now fail count like ids that left it."""
    root = str(tmp_path / "index")
    paths = tiles(tmp_path / "imgs", 4)
    pairs = [(f"i{n}", p) for n, p in enumerate(paths)]
    new_index(root, mobilenet_handle)
    assert update(root, "--input", night(tmp_path, "n1", pairs)) == 0
    moved = [(i, f"{tmp_path}/unreadable-bucket/{n}.png") for n, (i, _) in enumerate(pairs)]
    capsys.readouterr()
    assert update(root, "--input", night(tmp_path, "n2", moved)) == 2
    err = capsys.readouterr().err
    assert "would take 4 of the 4 ids of the current view out of it (100%): 0 left the input and 4 now fail" in err
    assert "--max_removed 4" in err and "the 1 run it finished are kept" in err
    store = IndexStore(root)
    assert [e.kind for e in store.log()] == ["begin", "run", "update", "begin", "run"]  # no update committed
    check_index(root, tmp_path, dict(pairs), mobilenet_handle)  # the view is night 1's
    assert index_main(["status", "--index", root]) == 0
    assert "live ids: 4 (4 embedded, 0 failed)" in capsys.readouterr().out
    # Half of them back, half still failing: 2 of 4 is within the default share.
    half = pairs[:2] + moved[2:]
    assert update(root, "--input", night(tmp_path, "n3", half)) == 0
    check_index(root, tmp_path, dict(pairs[:2]), mobilenet_handle)
    assert index_main(["status", "--index", root]) == 0
    status = capsys.readouterr().out
    assert "live ids: 4 (2 embedded, 2 failed)" in status and "unfinished updates" not in status


def test_a_typo_in_index_or_a_run_output_is_not_an_index_and_nothing_is_created(index_root, tmp_path,
                                                                                mobilenet_handle, capsys):
    from apache_beam.io.filesystems import FileSystems

    tiles(tmp_path / "imgs", 2)
    new_index(index_root, mobilenet_handle)
    typo = index_root + "x"
    assert update(typo, "--input", str(tmp_path / "imgs")) == 2
    assert f"{typo} is not an index (no index.json). Create it once with: python -m pipeline.index create" in \
        capsys.readouterr().err
    assert IndexStore(typo).is_empty()
    run_output = index_root.replace("/index", "/run-output")
    with FileSystems.create(f"{run_output}/embeddings-00000-of-00001.parquet") as f:
        f.write(b"PAR1")
    assert update(run_output, "--input", str(tmp_path / "imgs")) == 2
    assert index_main(["create", "--index", run_output, "--model_handle", mobilenet_handle]) == 2
    assert "holds files and is not an index" in capsys.readouterr().err
    assert IndexStore(run_output).objects.files(run_output) == ["embeddings-00000-of-00001.parquet"]
    assert IndexStore(run_output).objects.children(run_output) == []
    assert index_main(["create", "--index", index_root, "--model_handle", mobilenet_handle]) == 2
    assert "is already an index of mobilenet_v2_130_224" in capsys.readouterr().err


def test_create_records_the_model_so_updates_repeat_nothing_and_another_model_is_refused(tmp_path, mobilenet_handle,
                                                                                         capsys):
    root = str(tmp_path / "index")
    paths = tiles(tmp_path / "imgs", 2)
    new_index(root, mobilenet_handle, "--resize_mode", "center_crop")
    identity = IndexStore(root).identity()
    assert identity["handle"] == mobilenet_handle and "center_crop" in identity["preprocessing"]
    capsys.readouterr()
    assert update(root, "--input", str(tmp_path / "imgs")) == 0  # no --model_handle, no --resize_mode
    out = capsys.readouterr().out
    assert "2 new" in out and "WARNING: the index holds vectors of a random-weight stand-in model" in out
    assert "center_crop" in pq.read_schema(
        next(p for p in (tmp_path / "index" / "runs").glob("*/embeddings-*.parquet"))).metadata[
        b"embedding.preprocessing"].decode()
    assert update(root, "--input", str(tmp_path / "imgs"), "--model", "inception_resnet_v2") == 2
    assert "holds vectors of mobilenet_v2_130_224 (index.json), not inception_resnet_v2" in capsys.readouterr().err
    assert index_main(["status", "--index", root]) == 0
    assert "weights: STAND-IN: random-weight stand-in model" in capsys.readouterr().out
    assert sorted(check_index(root, tmp_path).column("uri").to_pylist()) == sorted(paths)


def test_a_snapshot_of_an_index_without_runs_is_empty_with_the_schema_and_metadata(index_root, tmp_path,
                                                                                  mobilenet_handle):
    new_index(index_root, mobilenet_handle)
    out = tmp_path / "snap"
    assert index_main(["snapshot", "--index", index_root, "--output", str(out)]) == 0
    table = read_embeddings(str(out))
    assert table.num_rows == 0 and table.schema.field("embedding").type.list_size == MODELS[
        "mobilenet_v2_130_224"].dim
    assert table.schema.metadata[b"embedding.fingerprint"] == IndexStore(index_root).identity()["fingerprint"].encode()


# --- the store fails or lies --------------------------------------------------------------------------------------

def _fail_listing(index_root, folder, request, monkeypatch, times=None):
    """A listing of ROOT/folder/ that the store refuses (403 on gs://, EACCES locally)."""
    if index_root.startswith("gs://"):
        return request.getfixturevalue("gcs").fail(listing(index_root, folder), 403, times)
    real = os.scandir

    def refused(path="."):
        if str(path).rstrip("/").endswith(f"/{folder}"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", refused)


def test_a_listing_that_fails_stops_the_update_before_it_deletes_anything(index_root, tmp_path, mobilenet_handle,
                                                                         capsys, request, monkeypatch):
    paths = tiles(tmp_path / "imgs", 6)
    new_index(index_root, mobilenet_handle)
    for number, count in enumerate((3, 6), start=1):
        pairs = [(f"i{n}", p) for n, p in enumerate(paths[:count])]
        assert update(index_root, "--input", night(tmp_path, f"n{number}", pairs), "--run_size", "2") == 0
    store = IndexStore(index_root)
    entries = store.log()
    runs = [e.body["run"] for e in store.committed_runs(entries)]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _fail_listing(index_root, "log", request, patch)
        assert update(index_root, "--input", night(tmp_path, "n3", pairs)) == 1
    assert "error: Listing" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        _fail_listing(index_root, "runs", request, patch)  # the leftover scan
        assert update(index_root, "--input", night(tmp_path, "n3", pairs)) == 1
    assert "error: Listing" in capsys.readouterr().err
    if index_root.startswith("gs://"):
        request.getfixturevalue("gcs").clear()
    assert [e.body["run"] for e in store.committed_runs(store.log())] == runs
    assert update(index_root, "--input", night(tmp_path, "n3", pairs)) == 0
    out = capsys.readouterr().out
    assert "0 new, 0 updated, 6 unchanged, 0 retried, 0 refused; 0 removed." in out
    assert "0 embedded in 0 runs, 6 already embedded, 0 failed." in out  # nothing embedded again
    assert store.leftovers(store.log()) == []
    check_index(index_root, tmp_path, dict(pairs), mobilenet_handle)


def test_two_writers_never_commit_the_same_log_entry(index_root, tmp_path, mobilenet_handle):
    new_index(index_root, mobilenet_handle)
    first, second = IndexStore(index_root), IndexStore(index_root)
    first.append(1, {"kind": "begin", "update": "a"})
    with pytest.raises(CommitRefused, match="committed log entry 1 .* first"):
        second.append(1, {"kind": "begin", "update": "b"})
    assert [e.body["update"] for e in first.log()] == ["a"]
    with pytest.raises(Conflict):
        first.objects.create(first.path("index.json"), b"{}")
    assert first.identity()["model"] == "mobilenet_v2_130_224"


def test_an_unreadable_lease_is_never_deleted(index_root, tmp_path, mobilenet_handle, capsys):
    tiles(tmp_path / "imgs", 2)
    new_index(index_root, mobilenet_handle)
    store = IndexStore(index_root)
    store.objects.create(store.path("locks", "update.json"), b"\x00garbage")
    assert update(index_root, "--input", str(tmp_path / "imgs")) == 2
    assert "cannot be read as one" in capsys.readouterr().err
    assert store.objects.read(store.path("locks", "update.json")).data == b"\x00garbage"
    assert store.log() == []


# --- two writers -------------------------------------------------------------------------------------------------

def test_an_expired_lease_is_taken_over_by_the_stores_clock_and_its_holder_stops(index_root, mobilenet_handle):
    new_index(index_root, mobilenet_handle)
    store = IndexStore(index_root)
    folder = store.path("locks")
    paused = UpdateLease(store.objects, folder, "paused", lease_s=1.0)
    paused.acquire()  # and never renews: a process stopped in a debugger, a laptop lid closed
    with pytest.raises(LeaseBusy, match="Another update \\(paused"):
        UpdateLease(store.objects, folder, "early", lease_s=1.0).acquire()
    time.sleep(1.5)
    successor = UpdateLease(store.objects, folder, "successor", lease_s=1.0)
    successor.acquire()
    assert successor.taken_over["update"] == "paused"
    with pytest.raises(LeaseLost, match="taken over"):
        paused.verify()
    store.append(1, {"kind": "begin", "update": "successor"})  # the fence
    with pytest.raises(CommitRefused):
        store.append(1, {"kind": "run", "run": "paused-00001", "update": "paused"})


@pytest.fixture(params=["sigint_default", "sigint_ignored"])
def sigint_disposition(request):
    """As a terminal starts the update, or as a script's `update &` / nohup does (SIGINT ignored)."""
    if request.param == "sigint_default":
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_holder_whose_lease_is_taken_stops_at_once(index_root, mobilenet_handle, sigint_disposition):
    new_index(index_root, mobilenet_handle)
    store = IndexStore(index_root)
    started = time.monotonic()
    with pytest.raises(LeaseLost, match="taken over"):
        with UpdateLease(store.objects, store.path("locks"), "slow", heartbeat_s=0.2) as lease:
            current = store.objects.read(lease.path)
            store.objects.replace(lease.path, b'{"update": "operator"}', current.generation)
            time.sleep(30)  # the heartbeat interrupts this
    assert time.monotonic() - started < 10
    assert json.loads(store.objects.read(store.path("locks", "update.json")).data)["update"] == "operator"


def test_a_contender_whose_clock_is_30_s_behind_cannot_take_a_live_lease(index_root, tmp_path, mobilenet_handle,
                                                                       request):
    assert shutil.which("faketime"), "faketime is needed (apt-get install faketime; .ci/run installs it)"
    paths = tiles(tmp_path / "imgs", 8)
    pairs = {f"i{n}": p for n, p in enumerate(paths)}
    manifest = night(tmp_path, "n1", list(pairs.items()))
    new_index(index_root, mobilenet_handle)
    if index_root.startswith("gs://"):
        request.getfixturevalue("gcs").slow(r"POST /upload/", 0.2)  # slow writes, for both
    store = IndexStore(index_root)
    first = subprocess.Popen(update_command(index_root, manifest, "--run_size", "2"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not [e for e in (store.log() if store.objects.files(store.path("log")) else []) if e.kind == "begin"]:
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.1)
    behind = subprocess.run(["faketime", "-f", "-30s", *update_command(index_root, manifest)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert behind.returncode == 2, behind.stderr
    assert "holds the lease of this index" in behind.stderr
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert store.leftovers(store.log()) == []
    check_index(index_root, tmp_path, pairs, mobilenet_handle)


# --- kill -9 anywhere ----------------------------------------------------------------------------------------------

# The windows a kill must hit (transforms/crashpoints.py), each in turn, then one at a random moment after the
# update's `begin` entry (None). The emulated gs:// store takes the windows that write to it.
UPDATE_WINDOWS = {"local": ("update.begun", "run.finishing", "update.run_written", "update.run_committed",
                            "update.before_commit", None),
                  "gs": ("run.finishing", "update.run_committed", "update.before_commit")}


def test_kill_9_in_every_window_of_an_update_never_loses_doubles_or_breaks_anything(index_root, tmp_path,
                                                                                   mobilenet_handle, capsys):
    """Nights that add, change and remove ids, each update killed in a named window (and once at a random
    moment); each kill is checked to have happened where it was aimed, and the next night's update, which
    starts from what the killed one left, completes."""
    rng = random.Random(18 if index_root.startswith("gs://") else 19)
    paths = tiles(tmp_path / "imgs", 40)
    live = {f"i{n:02d}": paths[n] for n in range(10)}
    new_index(index_root, mobilenet_handle)
    assert update(index_root, "--input", night(tmp_path, "n0", list(live.items()))) == 0
    nights, next_tile = 0, 10

    def next_night():
        nonlocal live, nights, next_tile
        nights += 1
        removed = rng.sample(sorted(live), 2)
        changed = rng.choice(sorted(set(live) - set(removed)))
        live = {i: p for i, p in live.items() if i not in removed}
        live[changed] = paths[next_tile]
        for offset in range(1, 5):
            live[f"i{next_tile + offset:02d}"] = paths[next_tile + offset]
        next_tile += 5
        return night(tmp_path, f"n{nights}", list(live.items()))

    store, hit = IndexStore(index_root), []
    for window in UPDATE_WINDOWS["gs" if index_root.startswith("gs://") else "local"]:
        manifest = next_night()
        reached = tmp_path / f"reached-{nights}.txt"
        env = {**os.environ, "BEAM_EMBEDDINGS_CRASH_LOG": str(reached)}
        if window:
            env["BEAM_EMBEDDINGS_CRASH_AT"] = window
        # Nights pile up on the last committed one while kills stop them: no valve here (tested above).
        process = subprocess.Popen(update_command(index_root, manifest, "--run_size", "2", "--max_removed", "1.0"),
                                   cwd=REPO, env=env,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if window is None:  # a random moment once the update has begun
            begun = len(store.log()) + 1
            while process.poll() is None and len(store.objects.files(store.path("log"))) < begun:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 3.0))
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait(timeout=300)
        stderr = process.stderr.read().decode()[-2000:]
        process.stderr.close()
        assert code == -signal.SIGKILL, f"{window}: the update was not killed (exit {code}): {stderr}"
        if window:
            assert reached.read_text().splitlines()[-1] == window, f"killed elsewhere than {window}"
        hit.append(window or "random")
        for entry in store.committed_runs(store.log()):
            assert store.run_files(entry), f"after the kill at {window}: {entry.body['run']} is gone"
    assert update(index_root, "--input", manifest, "--max_removed", "1.0") == 0
    assert store.leftovers(store.log()) == []
    check_index(index_root, tmp_path, live, mobilenet_handle)
    print(f"{len(hit)} kills, in {hit}; {nights} nights")


# --- Ctrl-C ------------------------------------------------------------------------------------------------------

def test_ctrl_c_during_an_update_says_one_line_keeps_what_was_committed_and_the_rerun_completes(
        tmp_path, mobilenet_handle):
    root = str(tmp_path / "index")
    paths = tiles(tmp_path / "imgs", 40)
    new_index(root, mobilenet_handle)
    store = IndexStore(root)
    command = [sys.executable, "-m", "pipeline.index", "update", "--index", root, "--input", str(tmp_path / "imgs"),
               "--run_size", "8", "--progress_interval=0"]  # runs in worker processes, as by default
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (store.objects.files(store.path("log")) and store.committed_runs(store.log())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.splitlines() == ["Interrupted: update stopped; what it had committed is kept and its unfinished run "
                                "removed. Run the same command again to continue."]
    committed = store.committed_runs(store.log())
    assert sorted(os.listdir(os.path.join(root, "runs"))) == sorted(r.body["run"] for r in committed)
    assert not store.objects.read(store.path("locks", "update.json"))
    assert update(root, "--input", str(tmp_path / "imgs")) == 0
    assert sorted(check_index(root, tmp_path).column("uri").to_pylist()) == sorted(paths)
