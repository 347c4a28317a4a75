"""An index kept current night after night: grows, updates, shrinks, survives a crash, refuses another model."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from helpers import (
    REPO,
    assert_matches_direct_calls,
    direct_vectors,
    documented_text,
    new_index,
    read_embeddings,
    tiles,
    vectors_by_id,
    write_manifest,
)
from pipeline.index.__main__ import main as index_main
from pipeline.index.lease import UpdateLease, _machine
from pipeline.index.store import IndexStore
from pipeline.models import MODELS


def update(*args):
    return index_main(["update", *args, "--direct_running_mode=in_memory", "--progress_interval=0"])


def snapshot(root, out):
    assert index_main(["snapshot", "--index", str(root), "--output", str(out)]) == 0
    return read_embeddings(str(out))


def run_ids(root, entries):
    """Ids embedded by the given run log entries."""
    ids = []
    for entry in entries:
        for path in glob.glob(f"{root}/runs/{entry.body['run']}/embeddings-*.parquet"):
            ids += pq.read_table(path, columns=["id"]).column("id").to_pylist()
    return ids


def status(root, capsys):
    capsys.readouterr()
    assert index_main(["status", "--index", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_three_nights_embed_only_what_is_new_and_the_view_holds_each_id_once(tmp_path, mobilenet_handle, capsys):
    images, root = tmp_path / "imgs", tmp_path / "index"
    paths = tiles(images, 35)
    store = IndexStore(str(root))
    new_index(root, mobilenet_handle)
    for night, count in enumerate((20, 30, 35), start=1):
        manifest = write_manifest(tmp_path / f"night{night}.csv", [(f"img{i:03d}", p) for i, p in enumerate(paths[:count])])
        before = store.log() if os.path.isdir(root / "log") else []
        assert update("--input", manifest, "--index", str(root), "--model_handle", mobilenet_handle,
                      "--run_size", "8") == 0
        new_runs = store.committed_runs(store.log()[len(before):])
        assert len(run_ids(root, new_runs)) == {1: 20, 2: 10, 3: 5}[night]
        assert all(e.body["embedded"] <= 8 for e in new_runs)
    assert "Index" in capsys.readouterr().out
    table = snapshot(root, tmp_path / "snap")
    assert sorted(table.column("id").to_pylist()) == [f"img{i:03d}" for i in range(35)]
    state = status(root, capsys)
    assert (state["live_ids"], state["embedded"], state["failed"], state["superseded_vectors"]) == (35, 35, 0, 0)
    assert state["runs"] == 3 + 2 + 1 and state["updates"] == 3


def test_changed_uris_are_embedded_again_and_removed_ids_leave_the_view(tmp_path, mobilenet_handle, capsys):
    images, root = tmp_path / "imgs", tmp_path / "index"
    paths = tiles(images, 12)
    others = tiles(tmp_path / "other", 3, start=40)
    pairs = [(f"img{i:02d}", p) for i, p in enumerate(paths)]
    new_index(root, mobilenet_handle)
    assert update("--input", write_manifest(tmp_path / "a.csv", pairs), "--index", str(root),
                  "--model_handle", mobilenet_handle) == 0
    changed = {f"img{i:02d}": others[i] for i in range(3)}
    removed = {f"img{i:02d}" for i in range(3, 7)}
    night2 = [(i, changed.get(i, u)) for i, u in pairs if i not in removed]
    store = IndexStore(str(root))
    before = store.log()
    capsys.readouterr()
    assert update("--input", write_manifest(tmp_path / "b.csv", night2), "--index", str(root),
                  "--model_handle", mobilenet_handle) == 0
    out = capsys.readouterr().out
    assert "from 8 input rows: 0 new, 3 updated, 5 unchanged, 0 retried, 0 refused; 4 removed." in out
    assert "3 embedded in 1 run, 5 already embedded, 0 failed." in out  # adds up to the input's rows
    assert sorted(run_ids(root, store.committed_runs(store.log()[len(before):]))) == sorted(changed)
    table = snapshot(root, tmp_path / "snap")
    view = vectors_by_id(table)
    assert sorted(view) == sorted(i for i, _ in night2)
    assert dict(zip(table.column("id").to_pylist(), table.column("uri").to_pylist())) == dict(night2)
    direct = direct_vectors(mobilenet_handle, list(changed.values()), MODELS["mobilenet_v2_130_224"].input_size)
    assert_matches_direct_calls({changed[i]: view[i] for i in changed}, direct)
    state = status(root, capsys)
    assert (state["live_ids"], state["removed_ids"], state["superseded_vectors"]) == (8, 4, 3 + 4)


def test_the_snapshot_has_the_schema_and_metadata_of_a_run(tmp_path, mobilenet_handle):
    root = tmp_path / "index"
    paths = tiles(tmp_path / "imgs", 3)
    new_index(root, mobilenet_handle)
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", mobilenet_handle) == 0
    run_file = glob.glob(f"{root}/runs/*/embeddings-*.parquet")[0]
    snapshot(root, tmp_path / "snap")
    snap_file = glob.glob(f"{tmp_path}/snap/embeddings-*.parquet")[0]
    assert pq.read_schema(snap_file) == pq.read_schema(run_file)
    assert pq.read_schema(snap_file).metadata[b"embedding.fingerprint"].startswith(b"sha256:")
    assert sorted(read_embeddings(str(tmp_path / "snap")).column("id").to_pylist()) == sorted(paths)


def test_index_json_and_status_name_the_engine_the_runs_used(tmp_path, mobilenet_handle, capsys):
    """The oracle is what the sink wrote into the runs' own Parquet files."""
    root = tmp_path / "index"
    paths = tiles(tmp_path / "imgs", 3)
    new_index(root, mobilenet_handle)
    recorded = json.loads((root / "index.json").read_text())["engine"]
    assert update("--input", write_manifest(tmp_path / "m.csv", [(f"i{n}", p) for n, p in enumerate(paths)]),
                  "--index", str(root), "--run_size", "2") == 0
    used = {pq.read_schema(path).metadata[b"embedding.engine"].decode()
            for path in glob.glob(f"{root}/runs/*/embeddings-*.parquet")}
    assert len(used) == 1 and used == {recorded}
    assert recorded.startswith("litert")  # the registry's choice for MobileNet under --engine auto
    assert status(root, capsys)["engines"] == [recorded]
    assert index_main(["status", "--index", str(root)]) == 0
    assert f"  engine: {recorded} (the runs)" in capsys.readouterr().out


def test_the_current_view_reads_directly_in_duckdb(tmp_path, mobilenet_handle):
    """The README's query: committed runs only, the last update's live ids, each id's latest vector."""
    import duckdb

    root = tmp_path / "index"
    paths = tiles(tmp_path / "imgs", 6)
    others = tiles(tmp_path / "other", 1, start=50)
    new_index(root, mobilenet_handle)
    assert update("--input", write_manifest(tmp_path / "a.csv", [(f"i{n}", p) for n, p in enumerate(paths)]),
                  "--index", str(root), "--model_handle", mobilenet_handle) == 0
    night2 = [(f"i{n}", others[0] if n == 0 else p) for n, p in enumerate(paths) if n != 5]
    assert update("--input", write_manifest(tmp_path / "b.csv", night2), "--index", str(root),
                  "--model_handle", mobilenet_handle) == 0
    leftover = root / "runs" / "unfinished"  # final files of a run without its log entry
    shutil.copytree(glob.glob(f"{root}/runs/*")[0], leftover)
    query = documented_text().split("```sql\n", 1)[1].split("```", 1)[0].replace("ROOT", str(root))
    rows = duckdb.sql(query).fetchall()
    assert sorted((r[0], r[1]) for r in rows) == sorted(night2)
    expected = vectors_by_id(snapshot(root, tmp_path / "snap"))
    for id_, _, embedding in rows:
        np.testing.assert_array_equal(np.asarray(embedding, np.float32), expected[id_])


def test_a_crash_costs_at_most_the_interrupted_run(tmp_path, mobilenet_handle, capsys):
    root = tmp_path / "index"
    paths = tiles(tmp_path / "imgs", 24)
    manifest = write_manifest(tmp_path / "m.csv", [(f"img{i:03d}", p) for i, p in enumerate(paths)])
    new_index(root, mobilenet_handle)
    command = [sys.executable, "-m", "pipeline.index", "update", "--input", manifest, "--index", str(root),
               "--model_handle", mobilenet_handle, "--run_size", "6", "--direct_running_mode=in_memory"]
    first = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    store = IndexStore(str(root))
    deadline = time.monotonic() + 120
    while not store.committed_runs(store.log() if os.path.isdir(root / "log") else []):
        assert first.poll() is None and time.monotonic() < deadline, "the update ended before it could be killed"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished_before = store.committed_runs(store.log())
    assert 1 <= len(finished_before) < 4 and store.latest_update(store.log()) is None
    embedded_before = set(run_ids(root, finished_before))
    state = status(root, capsys)  # the crashed update's vectors are pending, not removed or superseded ones
    assert (state["removed_ids"], state["superseded_vectors"], state["pending_vectors"]) == (0, 0, len(embedded_before))
    assert len(state["unfinished_updates"]) == 1 and state["leftovers"]  # the interrupted run's folder

    assert update("--input", manifest, "--index", str(root), "--model_handle", mobilenet_handle,
                  "--run_size", "6") == 0
    finished_after = store.committed_runs(store.log())[len(finished_before):]
    assert not embedded_before & set(run_ids(root, finished_after))  # nothing a finished run held is redone
    table = snapshot(root, tmp_path / "snap")
    assert sorted(table.column("id").to_pylist()) == [f"img{i:03d}" for i in range(24)]  # each exactly once
    assert store.leftovers(store.log()) == []  # the interrupted run's folder was removed


def test_a_run_with_final_files_but_no_log_entry_is_unfinished(tmp_path, mobilenet_handle, capsys):
    root = tmp_path / "index"
    tiles(tmp_path / "imgs", 2)
    new_index(root, mobilenet_handle)
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", mobilenet_handle) == 0
    [run] = glob.glob(f"{root}/runs/*")
    shutil.copytree(run, root / "runs" / "killed-during-its-renames")
    state = status(root, capsys)
    assert state["leftovers"] == ["runs/killed-during-its-renames"] and state["superseded_vectors"] == 0
    assert snapshot(root, tmp_path / "snap").num_rows == 2
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", mobilenet_handle) == 0
    assert not os.path.exists(root / "runs" / "killed-during-its-renames")


def test_a_copy_of_the_model_continues_the_index_and_another_model_is_refused(tmp_path, mobilenet_handle, capsys):
    root = tmp_path / "index"
    tiles(tmp_path / "imgs", 3)
    new_index(root, mobilenet_handle)
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", mobilenet_handle) == 0
    copy = tmp_path / "mirror" / "mobilenet"
    shutil.copytree(mobilenet_handle, copy)
    tiles(tmp_path / "imgs", 1, start=9)
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", str(copy)) == 0
    assert "1 new" in capsys.readouterr().out
    entries = IndexStore(str(root)).log()
    code = update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", str(copy),
                  "--resize_mode", "center_crop")
    err = capsys.readouterr().err
    assert code == 2 and "holds vectors of another model or preprocessing (preprocessing:" in err
    assert IndexStore(str(root)).log() == entries and not glob.glob(f"{root}/locks/*")


def test_a_second_concurrent_update_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, mobilenet_handle,
                                                                                 capsys):
    root = tmp_path / "index"
    tiles(tmp_path / "imgs", 2)
    new_index(root, mobilenet_handle)
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root), "--model_handle", mobilenet_handle) == 0
    store = IndexStore(str(root))
    with UpdateLease(store.objects, store.path("locks"), "someone-else"):
        code = update("--input", str(tmp_path / "imgs"), "--index", str(root))
    assert code == 2 and "Another update (someone-else" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / "locks" / "update.json").write_text(json.dumps({"update": "crashed", "pid": dead.pid, **_machine()}))
    assert update("--input", str(tmp_path / "imgs"), "--index", str(root)) == 0
    assert "Took over the lease of update crashed" in capsys.readouterr().out


def test_skip_existing_takes_several_earlier_runs_and_a_copy_of_the_model(tmp_path, mobilenet_handle):
    from helpers import run_pipeline

    folder = tmp_path / "imgs"
    paths = tiles(folder, 6)
    for night, names in (("n1", paths[:2]), ("n2", paths[2:4])):
        manifest = tmp_path / f"{night}.txt"
        manifest.write_text("\n".join(names) + "\n")
        assert run_pipeline("--input", str(manifest), "--output", str(tmp_path / "out" / night),
                            "--model_handle", mobilenet_handle) == 0
    copy = tmp_path / "copy"
    shutil.copytree(mobilenet_handle, copy)
    for skip in (["--skip_existing", str(tmp_path / "out" / "n1"), "--skip_existing", str(tmp_path / "out" / "n2")],
                 ["--skip_existing", str(tmp_path / "out" / "n*")]):
        out = tmp_path / "out3" / str(len(skip))
        assert run_pipeline("--input", str(folder), "--output", str(out), "--model_handle", str(copy), *skip) == 0
        assert sorted(read_embeddings(str(out)).column("id").to_pylist()) == paths[4:]


def test_bytes_that_do_not_decode_are_not_read_again_until_their_object_changes(tmp_path, mobilenet_handle, capsys,
                                                                                  monkeypatch):
    import transforms.decode
    import transforms.uri_reader

    monkeypatch.setattr(transforms.uri_reader, "SETTLED_S", 0)  # the files below are seconds old
    read = []
    real_read = transforms.decode.read_uri
    monkeypatch.setattr(transforms.decode, "read_uri", lambda uri, config: read.append(uri) or real_read(uri, config))
    root = tmp_path / "index"
    good = tiles(tmp_path / "imgs", 1)[0]
    broken, missing = tmp_path / "imgs" / "broken.jpg", str(tmp_path / "imgs" / "not-yet-uploaded.jpg")
    broken.write_bytes(b"<html>login</html>")
    manifest = write_manifest(tmp_path / "m.csv", [("good", good), ("broken", str(broken)), ("missing", missing)])
    new_index(root, mobilenet_handle)
    nightly = ["--input", manifest, "--index", str(root), "--model_handle", mobilenet_handle]

    assert update(*nightly) == 0
    assert "1 embedded in 1 run, 0 already embedded, 2 failed (1 for good" in capsys.readouterr().out
    read.clear()
    assert update(*nightly) == 0  # the same night again: the 404 is read again, the broken bytes are not
    assert "0 embedded in 1 run, 1 already embedded, 2 failed (1 for good: bytes that do not decode, not read again " \
           "until they change; 1 of them were not read tonight)." in capsys.readouterr().out
    assert read == [missing]
    state = status(root, capsys)
    assert (state["failed"], state["failed_for_good"]) == (2, 1)
    assert index_main(["status", "--index", str(root)]) == 0
    assert "failed: 1 to be read again by the next update (a read that failed, or bytes that changed), 1 for good" \
           in capsys.readouterr().out
    last = IndexStore(str(root)).latest_update(IndexStore(str(root)).log()).body["update"]
    [carried] = pq.read_table(glob.glob(f"{root}/updates/{last}/errors-*.parquet")).to_pylist()
    assert carried["id"] == "broken" and carried["stage"] == "decode"
    assert carried["error"].startswith("Unchanged since it failed, not read again: Not a supported image")

    shutil.copy(good, broken)  # fixed in place: a new version of the object
    read.clear()
    assert update(*nightly) == 0
    assert sorted(read) == sorted([str(broken), missing])
    assert sorted(vectors_by_id(snapshot(root, tmp_path / "snap"))) == ["broken", "good"]
    state = status(root, capsys)
    assert (state["failed"], state["failed_for_good"]) == (1, 0)


def test_a_failure_of_an_object_written_moments_ago_is_read_again(tmp_path):
    from transforms.uri_reader import settled_version

    fresh = tmp_path / "still-uploading.jpg"
    fresh.write_bytes(b"partial")
    assert settled_version(str(fresh)) is None  # it may still be changing: no version, so read again
    assert settled_version(str(tmp_path / "absent.jpg")) is None
    assert settled_version("https://example.com/a.jpg") is None
