"""Publishing keeps a PostgreSQL (pgvector) table and a LanceDB table equal to the index's current view: across
nights, repeats, kill -9 at any point, hand edits and operator mistakes. Real servers: a private PostgreSQL with
pgvector (pgserver) for the session, LanceDB folders in tmp_path."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import lancedb
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (
    REPO,
    commit_run,
    commit_update,
    new_index,
    read_embeddings,
    synthetic_metadata,
    tiles,
    write_manifest,
)
from pipeline.index.__main__ import main as index_main
from pipeline.index.store import IndexStore
from pipeline.index.view import current_selection
from pipeline.publish.lancedb_table import STATE_KEY
from transforms import crashpoints

TARGETS = ("postgres", "lancedb")


def publish(*args) -> int:
    return index_main(["publish", *args])


def publish_process(root, to, table, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.index", "publish", "--index", str(root), "--to", to,
                             "--table", table, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def new_table() -> str:
    return "t_" + uuid.uuid4().hex[:8]


@pytest.fixture
def lance_dir(tmp_path) -> str:
    return str(tmp_path / "lancedb")


def target_url(kind, postgres, lance_dir) -> str:
    return postgres if kind == "postgres" else lance_dir


# --- reading what a target holds ------------------------------------------------------------------------------

def pg_rows(url, table) -> dict:
    with psycopg.connect(url) as conn:
        return {i: (u, s, np.array(v, np.float32)) for i, u, s, v in
                conn.execute(f"SELECT id, uri, sha256, embedding::real[] FROM {table}").fetchall()}


def pg_state(url, table) -> dict:
    with psycopg.connect(url) as conn:
        if not conn.execute("SELECT to_regclass('beam_image_embeddings_published')").fetchone()[0]:
            return None
        row = conn.execute("SELECT state FROM beam_image_embeddings_published WHERE table_name = %s", [table]).fetchone()
    return row[0] if row else None


def lance_table(folder, table):
    return lancedb.connect(folder).open_table(table)


def lance_rows(folder, table) -> dict:
    data = lance_table(folder, table).to_arrow()
    ids = data.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id twice"
    vectors = data.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return {i: (u, s, v) for i, u, s, v in zip(ids, data.column("uri").to_pylist(), data.column("sha256").to_pylist(),
                                                vectors)}


def lance_state(folder, table) -> dict:
    metadata = lance_table(folder, table).schema.field("embedding").metadata
    return json.loads(metadata[STATE_KEY.encode()])


def held(kind, url, table) -> dict:
    return pg_rows(url, table) if kind == "postgres" else lance_rows(url, table)


def view(root) -> dict:
    """The index's current view as {id: (uri, sha256, vector)}, read directly from its files."""
    store = IndexStore(str(root))
    files, masks, _ = current_selection(store, store.log())
    rows = {}
    for (_, path), mask in zip(files, masks):
        table = pq.read_table(path).filter(pa.array(mask))
        if not table.num_rows:
            continue
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        rows.update({i: (u, s, v) for i, u, s, v in zip(table.column("id").to_pylist(), table.column("uri").to_pylist(),
                                                         table.column("sha256").to_pylist(), vectors)})
    return rows


def assert_equal_rows(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for key, (uri, sha, vector) in expected.items():
        assert found[key][:2] == (uri, sha), key
        np.testing.assert_array_equal(found[key][2], vector)


# --- a synthetic index: nights written directly in the index's layout (no model run) -------------------------

class Nights:
    """An index whose nights are committed directly: night(n) makes the view `ids` with fresh vectors for `changed`."""

    def __init__(self, root, dim=16, seed=0, metadata=None):
        self.store = IndexStore(str(root))
        self.store.create_identity(metadata or synthetic_metadata(dim))
        self.dim, self.random, self.seq, self.number = dim, np.random.default_rng(seed), 0, 0
        self.uris: dict = {}

    def night(self, ids, changed=()) -> None:
        self.number += 1
        name = f"night{self.number}"
        fresh = [i for i in ids if i not in self.uris or i in set(changed)]
        self.uris.update({i: f"gs://photos/{i}-v{self.number}.jpg" for i in fresh})
        self.store.append(self.seq + 1, {"kind": "begin", "update": name})
        self.seq += 1
        if fresh:
            commit_run(self.store, self.seq + 1, f"{name}-00001", name, [(i, self.uris[i]) for i in fresh],
                       self.random.standard_normal((len(fresh), self.dim)))
            self.seq += 1
        commit_update(self.store, self.seq + 1, name, [(i, self.uris[i]) for i in ids])
        self.seq += 1


def ids(start, stop, prefix="img"):
    return [f"{prefix}{i:06d}" for i in range(start, stop)]


# --- the specification ----------------------------------------------------------------------------------------

def test_three_nights_published_after_each_leave_both_targets_equal_to_the_snapshot(tmp_path, mobilenet_handle,
                                                                                   postgres, lance_dir, capsys):
    images, root, table = tmp_path / "imgs", tmp_path / "index", new_table()
    paths = tiles(images, 14)
    broken = images / "broken.png"
    broken.write_bytes(b"not an image")
    nights = [
        [(f"img{i:02d}", paths[i]) for i in range(10)],
        [(f"img{i:02d}", paths[i + 10] if i < 2 else paths[i]) for i in range(10) if i not in (5, 6)]
        + [(f"img{i:02d}", paths[i]) for i in (12, 13)],
        [(f"img{i:02d}", paths[i + 10] if i < 2 else paths[i]) for i in range(10) if i not in (5, 6, 7)]
        + [(f"img{i:02d}", paths[i]) for i in (12, 13)] + [("img07", str(broken))],
    ]
    new_index(root, mobilenet_handle)
    for night, pairs in enumerate(nights, start=1):
        assert index_main(["update", "--index", str(root), "--input", write_manifest(tmp_path / f"n{night}.csv", pairs),
                           "--direct_running_mode=in_memory", "--progress_interval=0"]) == 0
        assert index_main(["snapshot", "--index", str(root), "--output", str(tmp_path / f"snap{night}")]) == 0
        snap = read_embeddings(str(tmp_path / f"snap{night}"))
        vectors = snap.column("embedding").combine_chunks().flatten().to_numpy().reshape(snap.num_rows, -1)
        expected = {i: (u, s, v) for i, u, s, v in zip(snap.column("id").to_pylist(), snap.column("uri").to_pylist(),
                                                         snap.column("sha256").to_pylist(), vectors)}
        for kind in TARGETS:
            url = target_url(kind, postgres, lance_dir)
            capsys.readouterr()
            assert publish("--index", str(root), "--to", url, "--table", table) == 0
            out = capsys.readouterr().out
            assert f"Published {root}" in out and f"{len(expected)} rows" in out
            assert_equal_rows(held(kind, url, table), expected)
            state = pg_state(url, table) if kind == "postgres" else lance_state(url, table)
            assert state["metadata"]["weights"].startswith("STAND-IN")  # LanceDB's field metadata says so too
            assert (state["seq"], state["rows"], state["pending"]) == (len(IndexStore(str(root)).log()),
                                                                       len(expected), [])
            version = lance_table(url, table).version if kind == "lancedb" else pg_state(url, table)
            assert publish("--index", str(root), "--to", url, "--table", table) == 0
            assert "nothing to write" in capsys.readouterr().out
            assert version == (lance_table(url, table).version if kind == "lancedb" else pg_state(url, table))
        assert len(expected) == {1: 10, 2: 10, 3: 9}[night]  # night 3: img07 left the view (its new uri failed)
    with psycopg.connect(postgres) as conn:
        assert conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'",
                            [table]).fetchone()
        comment = conn.execute("SELECT obj_description(%s::regclass)", [table]).fetchone()[0]
    assert "mobilenet_v2_130_224" in comment and "sha256:" in comment
    assert comment.startswith("STAND-IN VECTORS of random weights, NOT meaningful: ")  # the tests' model is one


def test_only_what_changed_is_written_and_removed_ids_are_deleted(tmp_path, postgres, lance_dir, capsys):
    nights = Nights(tmp_path / "index")
    nights.night(ids(0, 100))
    table = new_table()
    for kind in TARGETS:
        assert publish("--index", str(nights.store.root), "--to", target_url(kind, postgres, lance_dir),
                       "--table", table) == 0
    nights.night(ids(10, 105), changed=ids(20, 23))
    capsys.readouterr()
    for kind in TARGETS:
        url = target_url(kind, postgres, lance_dir)
        assert publish("--index", str(nights.store.root), "--to", url, "--table", table) == 0
        assert "8 written, 10 removed; 95 rows" in capsys.readouterr().out
        assert_equal_rows(held(kind, url, table), view(nights.store.root))


@pytest.mark.parametrize("kind", TARGETS)
def test_a_publish_killed_at_any_point_and_run_again_ends_equal_to_the_view(tmp_path, postgres, lance_dir, kind):
    nights = Nights(tmp_path / "index", dim=32)
    nights.night(ids(0, 10_000))
    url, table, root = target_url(kind, postgres, lance_dir), new_table(), nights.store.root
    if kind == "postgres":
        # Night 1 killed while COPYing (nothing committed), then while building the HNSW index (rows committed).
        for activity in (f'COPY "{table}"', "CREATE INDEX"):
            killed = kill_when(publish_process(root, url, table), lambda: pg_active(url, activity))
            assert killed, f"the publish finished before it was seen in {activity}"
            found = pg_state(url, table)
            assert found is None if activity.startswith("COPY") else found["rows"] == 10_000
    else:
        assert publish("--index", root, "--to", url, "--table", table) == 0
    nights.night(ids(1_000, 11_000), changed=ids(4_000, 10_000))  # 7,000 rows to write, 1,000 to delete
    # Night 2 killed while COPYing (PostgreSQL, one transaction); LanceDB: after its first commit (the pending
    # state), then after its second (the upserts, before the deletes).
    for step in (1, 2):
        progress = (lambda: pg_active(url, 'COPY "publish_rows"')) if kind == "postgres" else \
            lance_commits_after(url, table, step)
        assert kill_when(publish_process(root, url, table), progress), f"step {step}: finished before the kill"
        found = held(kind, url, table)  # every id once, whatever the step (lance_rows checks)
        assert set(found) <= set(ids(0, 11_000))
        if kind == "lancedb":
            assert lance_state(url, table)["pending"] == [nights.seq]
    # Night 3 comes before the next publish and drops ids that only night 2 (half published) had.
    nights.night(ids(1_000, 10_500))
    assert publish("--index", root, "--to", url, "--table", table) == 0
    assert_equal_rows(held(kind, url, table), view(root))
    if kind == "postgres":
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'",
                                [table]).fetchone()[0] == 1


def pg_active(url, prefix) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> "
                                 "pg_backend_pid()", [prefix + "%"]).fetchone())


def lance_commits_after(folder, table, count):
    """A progress check: `count` more versions of the table than when it was made."""
    versions = os.path.join(folder, f"{table}.lance", "_versions")
    start = len(os.listdir(versions))
    return lambda: len(os.listdir(versions)) >= start + count


def kill_when(process: subprocess.Popen, seen, timeout_s: float = 120) -> bool:
    """kill -9 `process` as soon as `seen()`; True when it was still running then."""
    deadline = time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if seen():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        return process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.stdout.close()


class Stop(BaseException):
    """Raised at an armed crash point: the publish stops there, as if killed."""


def stopped_publish(root, url, table, point):
    def stop():
        raise Stop(point)

    crashpoints.arm(point, stop)
    try:
        with pytest.raises(Stop):
            publish("--index", str(root), "--to", url, "--table", table)
    finally:
        crashpoints.disarm_all()


def test_lancedb_publishes_stopped_on_two_nights_in_a_row_leave_no_stale_row(tmp_path, lance_dir, capsys):
    """id0 at u1, then u2 (publish stopped before its final record), then back at u1 (publish stopped right after
    recording pending): the next publish must not keep u2's vector, which the row count alone cannot see."""
    root, table = tmp_path / "index", new_table()
    store = IndexStore(str(root))
    store.create_identity(synthetic_metadata(4))
    rng = np.random.default_rng(7)
    u1, u2, other = ("id0", "gs://p/u1.jpg"), ("id0", "gs://p/u2.jpg"), ("id1", "gs://p/b.jpg")
    seq = 0

    def commit(*steps):
        nonlocal seq
        for kind, pairs in steps:
            seq += 1
            if kind == "begin":
                store.append(seq, {"kind": "begin", "update": f"u{seq}"})
            elif kind == "run":
                commit_run(store, seq, f"r{seq}", f"u{seq}", pairs, rng.standard_normal((len(pairs), 4)))
            else:
                commit_update(store, seq, f"n{seq}", pairs)

    commit(("begin", None), ("run", [u1, other]), ("update", [u1, other]))
    assert publish("--index", str(root), "--to", lance_dir, "--table", table) == 0  # night 1: u1
    commit(("begin", None), ("run", [u2]), ("update", [u2, other]))  # night 2: id0 moves to u2
    stopped_publish(root, lance_dir, table, "publish.lancedb.deleted")  # u2 written, final record not
    commit(("begin", None), ("update", [u1, other]))  # night 3: id0 back at u1 (its night-1 vector, no new run)
    stopped_publish(root, lance_dir, table, "publish.lancedb.pending")  # pending recorded, nothing else
    assert lance_state(lance_dir, table)["pending"] == [6, 8]  # both unfinished publishes are remembered
    assert publish("--index", str(root), "--to", lance_dir, "--table", table) == 0
    assert_equal_rows(lance_rows(lance_dir, table), view(root))
    assert lance_rows(lance_dir, table)["id0"][0] == u1[1]
    # A night that changes nothing in the view writes nothing at all: no new version, no new record.
    version = lance_table(lance_dir, table).version
    commit(("begin", None), ("update", [u1, other]))
    capsys.readouterr()
    assert publish("--index", str(root), "--to", lance_dir, "--table", table) == 0
    assert "nothing to write" in capsys.readouterr().out
    assert lance_table(lance_dir, table).version == version


def test_nearest_neighbours_in_sql_and_lancedb_are_the_hits_of_pipeline_search(tmp_path, postgres, lance_dir, capsys):
    from pipeline.search.__main__ import main as search_main

    nights = Nights(tmp_path / "index", dim=32, seed=3)
    nights.night(ids(0, 300))
    root, table = nights.store.root, new_table()
    for kind in TARGETS:
        assert publish("--index", root, "--to", target_url(kind, postgres, lance_dir), "--table", table) == 0
    assert search_main(["build", "--index", root, "--output", str(tmp_path / "search"), "--kind", "exact"]) == 0
    queries = ids(0, 300)[::37]
    assert search_main(["query", "--index", str(tmp_path / "search"), "--id", *queries, "-k", "10",
                        "--output", str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    with psycopg.connect(postgres) as conn:
        for query in queries:
            expected = [h["id"] for h in hits if h["query"] == query]
            nearest = f"SELECT id FROM {table} ORDER BY embedding <=> (SELECT embedding FROM {table} WHERE id = %s) " \
                      f"LIMIT 10"
            assert f"Index Scan using {table}_embedding_hnsw" in str(conn.execute("EXPLAIN " + nearest, [query])
                                                                     .fetchall())
            assert [r[0] for r in conn.execute(nearest, [query]).fetchall()] == expected
            lance = lance_table(lance_dir, table)
            own = lance.search().where(f"id = '{query}'").limit(1).to_arrow().column("embedding")[0].as_py()
            found = lance.search(own, vector_column_name="embedding").distance_type("cosine").limit(10).to_arrow()
            assert found.column("id").to_pylist() == expected


@pytest.mark.parametrize("kind", TARGETS)
def test_another_models_vectors_or_another_index_are_refused_and_the_table_is_left_alone(tmp_path, postgres,
                                                                                        lance_dir, kind, capsys):
    url, table = target_url(kind, postgres, lance_dir), new_table()
    first = Nights(tmp_path / "first")
    first.night(ids(0, 50))
    assert publish("--index", first.store.root, "--to", url, "--table", table) == 0
    other_model = Nights(tmp_path / "other-model", metadata={**synthetic_metadata(16), "fingerprint": "sha256:y"})
    other_model.night(ids(0, 60))
    same_model = Nights(tmp_path / "same-model", seed=1)
    same_model.night(ids(0, 60))
    capsys.readouterr()
    assert publish("--index", other_model.store.root, "--to", url, "--table", table) == 2
    assert "holds vectors of another model or preprocessing (fingerprint: 'sha256:x' then, 'sha256:y' now)" in \
        capsys.readouterr().err
    assert publish("--index", same_model.store.root, "--to", url, "--table", table) == 2
    assert "holds the view of another index of the same model" in capsys.readouterr().err
    assert_equal_rows(held(kind, url, table), view(first.store.root))


@pytest.mark.parametrize("kind", TARGETS)
def test_a_table_changed_by_hand_is_refused_until_rewritten_with_full(tmp_path, postgres, lance_dir, kind, capsys):
    url, table = target_url(kind, postgres, lance_dir), new_table()
    nights = Nights(tmp_path / "index")
    nights.night(ids(0, 50))
    assert publish("--index", nights.store.root, "--to", url, "--table", table) == 0
    if kind == "postgres":
        with psycopg.connect(url) as conn:
            conn.execute(f"DELETE FROM {table} WHERE id IN ('img000003', 'img000004')")
    else:
        lance_table(url, table).delete("id IN ('img000003', 'img000004')")
    nights.night(ids(0, 55), changed=ids(0, 5))
    capsys.readouterr()
    assert publish("--index", nights.store.root, "--to", url, "--table", table) == 2
    assert "holds 48 rows, but the last publish left 50: it was changed by something else. Nothing was changed; " \
           "run again with --full" in capsys.readouterr().err
    assert len(held(kind, url, table)) == 48
    assert publish("--index", nights.store.root, "--to", url, "--table", table, "--full") == 0
    assert "55 written, 0 removed; 55 rows" in capsys.readouterr().out
    assert_equal_rows(held(kind, url, table), view(nights.store.root))


def test_a_table_publish_did_not_write_is_refused(tmp_path, postgres, lance_dir, capsys):

    nights = Nights(tmp_path / "index")
    nights.night(ids(0, 5))
    table = new_table()
    with psycopg.connect(postgres) as conn:
        conn.execute(f"CREATE TABLE {table} (id int)")
    lancedb.connect(lance_dir).create_table(table, data=pa.table({"id": [1]}))
    for url in (postgres, lance_dir):
        assert publish("--index", nights.store.root, "--to", url, "--table", table) == 2
        assert f"table {table} exists and was not written by publish" in capsys.readouterr().err


def test_mistaken_commands_say_what_to_do(tmp_path, postgres, capsys):
    nights = Nights(tmp_path / "index")
    root = nights.store.root
    assert publish("--index", root, "--to", str(tmp_path / "lancedb")) == 2
    assert "has no finished update yet" in capsys.readouterr().err
    nights.night(ids(0, 5))
    assert publish("--index", root, "--to", "mysql://db/x") == 2
    assert "publish writes to postgresql://USER@HOST/DATABASE or to a LanceDB folder" in capsys.readouterr().err
    assert publish("--index", root, "--to", "postgresql://me:secret@127.0.0.1:1/db") == 1
    err = capsys.readouterr().err
    assert "Cannot connect to postgresql://me:***@127.0.0.1:1/db" in err and "secret" not in err
    assert publish("--index", root, "--to", postgres, "--table", "x; drop table y") == 2
    assert "--table 'x; drop table y': use a plain name or schema.name" in capsys.readouterr().err
    assert publish("--index", root, "--to", f"lancedb://{root}/") == 2
    assert "is the index itself" in capsys.readouterr().err
    assert publish("--index", str(tmp_path / "nothing"), "--to", str(tmp_path / "lancedb")) == 2
    assert "is not an index" in capsys.readouterr().err


def test_lancedb_indexes_its_vectors_from_ann_min_rows_on_and_finds_rows_added_later(tmp_path, lance_dir, capsys):
    nights = Nights(tmp_path / "index", dim=32)
    table = new_table()

    def night_and_publish(count):
        nights.night(ids(0, count))
        capsys.readouterr()
        assert publish("--index", nights.store.root, "--to", lance_dir, "--table", table, "--ann_min_rows", "500") == 0
        return capsys.readouterr().out

    assert "no ANN index below --ann_min_rows 500 rows (400 now): queries scan the table" in night_and_publish(400)
    assert not lance_table(lance_dir, table).list_indices()
    assert "ANN index (IVF-PQ, cosine) built in" in night_and_publish(700)
    assert "ANN index updated with the new rows in" in night_and_publish(750)
    lance = lance_table(lance_dir, table)
    stats = lance.index_stats(lance.list_indices()[0].name)
    assert (stats.num_indexed_rows, stats.num_unindexed_rows, stats.distance_type) == (750, 0, "cosine")
    newest = view(nights.store.root)["img000740"][2]
    found = lance.search(newest, vector_column_name="embedding").distance_type("cosine").limit(1).to_arrow()
    assert found.column("id").to_pylist() == ["img000740"]


def test_an_index_on_gs_publishes_through_the_object_store(tmp_path, gcs, lance_dir, capsys):
    from apache_beam.io.filesystems import FileSystems

    nights = Nights(tmp_path / "index")
    nights.night(ids(0, 40))
    nights.night(ids(5, 45), changed=ids(10, 12))
    root = f"gs://{gcs.bucket}/{uuid.uuid4().hex[:8]}/index"
    for folder, _, names in os.walk(nights.store.root):
        for name in names:
            local = os.path.join(folder, name)
            with open(local, "rb") as source, FileSystems.create(root + local[len(nights.store.root):]) as copy:
                copy.write(source.read())
    table = new_table()
    assert publish("--index", root, "--to", lance_dir, "--table", table) == 0
    assert "40 rows, the view after log entry 6" in capsys.readouterr().out
    assert_equal_rows(lance_rows(lance_dir, table), view(nights.store.root))
