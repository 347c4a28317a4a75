"""python -m pipeline.search update: a search index kept current night after night, checked against a plain dict.

The index ROOT here is written the way pipeline.index commits nights (runs, then an update entry naming the live
ids), with synthetic clustered vectors, so that nights of thousands of changes cost milliseconds. The oracle is a
dict of id -> vector and numpy's exact search over it: it shares no code with the search index.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DIM, Nights, documented_commands
from pipeline.index.store import IndexStore
from pipeline.search.__main__ import main as search
from pipeline.search.store import file_names, open_search_index

HERE = os.path.dirname(os.path.abspath(__file__))


def _live_ids(folder: str) -> list:
    index = open_search_index(folder)
    items = index.items.take(np.setdiff1d(np.arange(index.vectors.rows), index.vectors.removed))
    return sorted(items.column("id").to_pylist())


def _hits(folder: str, ids: list, k: int, tmp_path) -> dict:
    out = str(tmp_path / "hits.json")
    code = search(["query", "--index", folder, "--id", *ids, "-k", str(k), "--output", out])
    assert code in (0, 1)
    found: dict = {}
    for hit in json.loads(open(out).read()) if os.path.exists(out) else []:
        found.setdefault(hit["query"], []).append(hit["id"])
    os.remove(out) if os.path.exists(out) else None
    return found


def _recall(found: dict, truth: dict) -> float:
    return float(np.mean([len(set(found[q]) & set(truth[q])) / len(truth[q]) for q in truth]))


nights_strategy = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 200), st.integers(0, 200)),
                           min_size=1, max_size=4)


@pytest.mark.parametrize("kind", ["exact", "ann", "compressed"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nights=nights_strategy)
def test_an_updated_index_answers_as_the_view_after_every_night(kind, nights, tmp_path_factory):
    """After each night's update: the index holds exactly the view's ids, a changed id returns its new vector, a
    removed id is gone (never a hit, and a query by it says so), and the answers are exact search's (exact) or
    within recall of it (ann, compressed)."""
    work = tmp_path_factory.mktemp("nights")
    root, folder = str(work / "root"), str(work / "search")
    index = Nights(root)
    index.night(new=3000)
    assert search(["build", "--index", root, "--output", folder, "--kind", kind]) == 0
    gone: set = set()
    for new, changed, removed in nights:
        before = set(index.view)
        index.night(new, changed, removed)
        gone = (gone | (before - set(index.view))) - set(index.view)
        assert search(["update", "--index", root, "--output", folder]) == 0
        assert _live_ids(folder) == sorted(index.view)
        opened = open_search_index(folder)
        asked = sorted(index.view)[::60]
        rows = opened.rows_of(asked)
        stored = opened.vectors.vectors(rows)
        expected = np.stack([index.view[i] / np.linalg.norm(index.view[i]) for i in asked])
        np.testing.assert_allclose(stored, expected, atol=1e-5)  # a changed id has its new vector
        found = _hits(folder, asked, 10, work)
        assert not {hit for hits in found.values() for hit in hits} & gone
        truth = dict(zip(asked, index.exact(expected, 10)))
        if kind == "exact":
            assert {q: set(h) for q, h in found.items()} == {q: set(t) for q, t in truth.items()}
        else:
            assert _recall(found, truth) >= 0.9
    if gone:
        one = sorted(gone)[0]
        out = str(work / "gone.json")
        assert search(["query", "--index", folder, "--id", one, "--output", out]) == 1


def test_a_query_by_a_removed_id_says_it_is_gone(tmp_path, capsys):
    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    index = Nights(root)
    index.night(new=500)
    assert search(["build", "--index", root, "--output", folder]) == 0
    leaving = sorted(index.view)[:3]
    for id_ in leaving:
        del index.view[id_]
    index.night()
    assert search(["update", "--index", root, "--output", folder]) == 0
    capsys.readouterr()
    assert search(["query", "--index", folder, "--id", leaving[0], "img999999"]) == 1
    err = capsys.readouterr().err
    assert f"id {leaving[0]!r} was in the index and is gone: it left the view of {root}" in err
    assert "id 'img999999' is not in the index" in err


def test_an_update_costs_what_changed_and_an_unchanged_view_writes_nothing_new(tmp_path, capsys):
    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    index = Nights(root)
    index.night(new=3000)
    assert search(["build", "--index", root, "--output", folder, "--kind", "compressed"]) == 0
    first = json.loads(open(os.path.join(folder, "search.json")).read())
    index.night(new=30, changed=20, removed=10)
    capsys.readouterr()
    assert search(["update", "--index", root, "--output", folder]) == 0
    assert "updated: 50 vectors added (20 of them changed ids), 10 ids removed; 3020 vectors now" in \
        capsys.readouterr().err
    after = json.loads(open(os.path.join(folder, "search.json")).read())
    # The build's segments are shared, not rewritten; the night's rows are a segment of their own.
    assert after["files"]["items"][0] == first["files"]["items"][0] and len(after["files"]["items"]) == 2
    assert after["files"]["exact_vectors"][0] == first["files"]["exact_vectors"][0]
    assert os.path.getsize(os.path.join(folder, after["files"]["exact_vectors"][1])) == 50 * DIM * 4
    assert after["rows"] == 3050 and after["count"] == 3020
    assert after["index"]["training"] == {**first["index"]["training"], "added_since": 50}
    assert sorted(os.listdir(folder)) == sorted([".search.json.lock", "search.json",
                                                 *(n for names in file_names(after).values() for n in names)])
    assert search(["update", "--index", root, "--output", folder]) == 0
    assert "is up to date" in capsys.readouterr().err
    assert json.loads(open(os.path.join(folder, "search.json")).read()) == after


def test_duplicates_of_an_updated_index_are_those_of_a_fresh_build(tmp_path):
    root = str(tmp_path / "root")
    index = Nights(root)
    index.night(new=3000)
    for kind in ("exact", "ann"):
        assert search(["build", "--index", root, "--output", str(tmp_path / kind), "--kind", kind]) == 0
    index.night(new=200, changed=100, removed=100)
    pairs = {}
    for kind in ("exact", "ann"):
        assert search(["update", "--index", root, "--output", str(tmp_path / kind)]) == 0
        assert search(["build", "--index", root, "--output", str(tmp_path / f"fresh-{kind}"), "--kind", kind]) == 0
        for name in (kind, f"fresh-{kind}"):
            out = str(tmp_path / f"{name}.parquet")
            assert search(["duplicates", "--index", str(tmp_path / name), "--output", out, "--threshold", "0.9"]) == 0
            groups = pq.read_table(out).to_pylist()
            pairs[name] = sorted((g["group"], g["id"]) for g in groups)
    assert len(pairs["exact"]) > 100
    assert pairs["exact"] == pairs["fresh-exact"] == pairs["ann"] == pairs["fresh-ann"]


def test_tombstones_past_a_share_rewrite_the_lists_with_the_training_kept(tmp_path, capsys):
    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    index = Nights(root)
    index.night(new=3000)
    assert search(["build", "--index", root, "--output", folder, "--kind", "ann"]) == 0
    first = json.loads(open(os.path.join(folder, "search.json")).read())
    built = open_search_index(folder)  # held: faiss's quantizer belongs to its index
    trained = built.vectors.index.quantizer.reconstruct_n(0, first["index"]["lists"])
    index.night(new=100, removed=800)  # 800 of 3100 rows tombstoned: over a fifth
    capsys.readouterr()
    assert search(["update", "--index", root, "--output", folder]) == 0
    assert "compacted (over 20% of the rows were removed)" in capsys.readouterr().err
    after = json.loads(open(os.path.join(folder, "search.json")).read())
    assert after["rows"] == after["count"] == 2300 and "removed" not in after["files"]
    assert after["index"]["training"] == {**first["index"]["training"], "added_since": 100}
    opened = open_search_index(folder)
    np.testing.assert_array_equal(opened.vectors.index.quantizer.reconstruct_n(0, first["index"]["lists"]), trained)
    assert _live_ids(folder) == sorted(index.view)


def test_growth_past_the_training_retrains_under_auto_and_is_refused_under_never(tmp_path, capsys):
    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    index = Nights(root)
    index.night(new=2000)
    assert search(["build", "--index", root, "--output", folder, "--kind", "ann"]) == 0
    index.night(new=1100)  # over half the collection trained on
    before = open(os.path.join(folder, "search.json")).read()
    capsys.readouterr()
    assert search(["update", "--index", root, "--output", folder, "--retrain", "never"]) == 2
    err = capsys.readouterr().err
    assert "needs retraining: 1,100 vectors were added since the quantizer was trained on a collection of 2,000" in err
    assert "--retrain auto" in err and open(os.path.join(folder, "search.json")).read() == before
    assert search(["update", "--index", root, "--output", folder]) == 0
    assert "retrained (1,100 vectors were added" in capsys.readouterr().err
    after = json.loads(open(os.path.join(folder, "search.json")).read())
    assert after["index"]["training"]["collection"] == 3100 and after["index"]["training"]["added_since"] == 0
    assert search(["update", "--index", root, "--output", folder, "--retrain", "always"]) == 0
    assert "retrained (--retrain always)" in capsys.readouterr().err


def test_an_index_of_another_root_or_built_from_files_is_refused(tmp_path, capsys):
    root, other, folder = str(tmp_path / "root"), str(tmp_path / "other"), str(tmp_path / "search")
    Nights(root).night(new=200)
    Nights(other).night(new=200)
    assert search(["build", "--index", root, "--output", folder]) == 0
    capsys.readouterr()
    assert search(["update", "--index", other, "--output", folder]) == 2
    assert "holds the view of another index" in capsys.readouterr().err
    run = IndexStore(root).run_files(IndexStore(root).log()[0])[0]
    assert search(["build", "--embeddings", run, "--output", str(tmp_path / "files")]) == 0
    assert search(["update", "--index", root, "--output", str(tmp_path / "files")]) == 2
    assert "only a search index built with search build --index ROOT can be updated" in capsys.readouterr().err
    assert search(["update", "--index", root, "--output", str(tmp_path / "none")]) == 2
    assert "no search.json" in capsys.readouterr().err


# The windows a kill during an update must hit (transforms/crashpoints.py).
UPDATE_WINDOWS = ("search.update.written", "search.published")


@pytest.mark.parametrize("window", UPDATE_WINDOWS)
def test_kill_9_during_an_update_leaves_a_whole_build_served_and_the_next_update_completes(window, tmp_path,
                                                                                           monkeypatch):
    from pipeline.search import store as search_store

    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    index = Nights(root)
    index.night(new=3000)
    assert search(["build", "--index", root, "--output", folder, "--kind", "compressed"]) == 0
    served = _live_ids(folder)
    index.night(new=100, changed=50, removed=50)
    reached = tmp_path / "reached"
    env = {**os.environ, "BEAM_EMBEDDINGS_CRASH_AT": window, "BEAM_EMBEDDINGS_CRASH_LOG": str(reached),
           "PYTHONPATH": os.path.dirname(HERE)}
    process = subprocess.run([sys.executable, "-m", "pipeline.search", "update", "--index", root, "--output", folder],
                             env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert reached.read_text().splitlines()[-1] == window
    # Killed before the flip: the old build answers, whole; after it: the new one does, whole.
    assert _live_ids(folder) == (served if window == "search.update.written" else sorted(index.view))
    monkeypatch.setattr(search_store, "ORPHAN_AGE", -60)  # as if the next update ran well after the kill
    index.night(new=10)
    assert search(["update", "--index", root, "--output", folder]) == 0
    assert _live_ids(folder) == sorted(index.view)
    manifest = json.loads(open(os.path.join(folder, "search.json")).read())
    assert sorted(os.listdir(folder)) == sorted([".search.json.lock", "search.json",
                                                 *(n for names in file_names(manifest).values() for n in names)])


def _readme_search_commands() -> list:
    return [command for command in documented_commands() if command.startswith("python -m pipeline.search ")]


@pytest.mark.parametrize("command", _readme_search_commands())
def test_every_documented_search_command_parses(command):
    import re
    import shlex

    from pipeline.options import refuse_unknown_args
    from pipeline.search.__main__ import _parser, _subcommand

    words = shlex.split(re.sub(r"\s\[[^\]]*\]", "", command))[3:]
    parser = _parser()
    args, beam_args = parser.parse_known_args(words)  # exits 2 (failing the test) on what neither it nor Beam knows
    refuse_unknown_args(_subcommand(parser, args.command), beam_args)
    assert not beam_args or args.command == "build"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_an_update_on_gs_or_a_local_folder_is_published_only_over_the_version_it_read(where, tmp_path, request,
                                                                                     monkeypatch):
    from pipeline.search.store import SearchIndexError, publish_manifest

    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    root = str(tmp_path / "root")
    folder = f"gs://{request.getfixturevalue('gcs').bucket}/{tmp_path.name}" if where == "gs" else \
        str(tmp_path / "search")  # the emulator's bucket is shared by the session's tests: a folder of its own
    index = Nights(root)
    index.night(new=3000)
    assert search(["build", "--index", root, "--output", folder, "--kind", "compressed"]) == 0
    for _ in range(2):
        index.night(new=60, changed=30, removed=30)
        assert search(["update", "--index", root, "--output", folder]) == 0
        assert _live_ids(folder) == sorted(index.view)
    stale = open_search_index(folder)  # a writer that read search.json before another one published
    index.night(new=5)
    assert search(["update", "--index", root, "--output", folder]) == 0
    with pytest.raises(SearchIndexError, match="Another build or update wrote"):
        publish_manifest(folder, {**stale.manifest, "written_at": stale.manifest["written_at"]}, stale.version)
    assert _live_ids(folder) == sorted(index.view)  # the refused writer changed nothing
