"""search build across workers: the passes over the vectors as Beam jobs (a shard per embeddings file), the
training and the merge in the launcher. The oracles: the single-process build of the same view (the same
quantizer, the same lists in the same order, the same answers), a plain dict of the view, and numpy's exact search.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DIM, Nights, search_ids_by_row, search_lists, synthetic_metadata
from pipeline.search.__main__ import main as search
from pipeline.search.store import file_names, open_search_index
from transforms.sink import embeddings_schema

TWO_PROCESSES = ["--runner", "DirectRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
IN_PROCESS = ["--runner", "DirectRunner", "--direct_num_workers", "1", "--direct_running_mode", "in_memory"]


def _three_nights(root: str) -> Nights:
    """A view spread over three runs' files, with changed and removed ids masked out of the earlier ones."""
    index = Nights(root)
    index.night(new=3000)
    index.night(new=500, changed=300, removed=200)
    index.night(new=400, changed=200, removed=300)
    return index


def _answers(folder: str, queries: np.ndarray, k: int = 10) -> list:
    """The ids each query finds, probing and re-ranking as the single-process build was tuned to."""
    opened = open_search_index(folder)
    _, rows = opened.vectors.search(queries, k)
    return [opened.items.take(r[r >= 0]).column("id").to_pylist() for r in rows]


def _only_the_manifests_files(folder: str) -> bool:
    manifest = json.loads(open(os.path.join(folder, "search.json")).read())
    named = {name for names in file_names(manifest).values() for name in names}
    return set(os.listdir(folder)) - {".search.json.lock"} == named | {"search.json"}


@pytest.mark.parametrize("kind", ["exact", "ann", "compressed"])
def test_a_build_across_two_worker_processes_is_the_single_process_build(kind, tmp_path):
    root, alone, across = str(tmp_path / "root"), str(tmp_path / "alone"), str(tmp_path / "across")
    index = _three_nights(root)
    assert search(["build", "--index", root, "--output", alone, "--kind", kind]) == 0
    assert search(["build", "--index", root, "--output", across, "--kind", kind, *TWO_PROCESSES]) == 0

    manifest = json.loads(open(os.path.join(across, "search.json")).read())
    assert manifest["built_by"] == {"runner": "DirectRunner", "shards": 3}
    assert manifest["count"] == len(index.view) and manifest["index_source"]["seq"] == len(index.store.log())
    assert search_ids_by_row(across) == search_ids_by_row(alone)
    assert sorted(search_ids_by_row(across)) == sorted(index.view)
    for built_alone, built_across in zip(search_lists(alone), search_lists(across), strict=True):
        np.testing.assert_array_equal(built_alone, built_across)
    assert _only_the_manifests_files(across), "the workers' shard lists, samples and trained index are removed"

    asked = sorted(index.view)[::40]
    queries = np.stack([index.view[i] for i in asked])
    tuned = json.loads(open(os.path.join(alone, "search.json")).read())["index"]
    if kind != "exact":  # tuning picks the quickest setting by the clock: both are compared at the same one
        manifest["index"].update({k: tuned[k] for k in ("nprobe", "rerank_depth") if k in tuned})
        open(os.path.join(across, "search.json"), "w").write(json.dumps(manifest))
    found = _answers(across, queries)
    assert found == _answers(alone, queries)
    truth = index.exact(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall == 1.0 if kind == "exact" else recall >= 0.9

    index.night(new=100, changed=50, removed=50)  # a distributed build is updated like any other
    assert search(["update", "--index", root, "--output", across]) == 0
    assert sorted(search_ids_by_row(across)[i] for i in np.setdiff1d(
        np.arange(open_search_index(across).vectors.rows), open_search_index(across).vectors.removed)) == \
        sorted(index.view)


def _write_files(folder, sizes: list, seed: int) -> dict:
    """Embeddings files of `sizes` rows (ids unique across them), written by pyarrow: id -> vector."""
    rng, written, start = np.random.default_rng(seed), {}, 0
    os.makedirs(folder)
    for number, size in enumerate(sizes):
        ids = [f"f{number}-{start + i}" for i in range(size)]
        vectors = rng.standard_normal((size, DIM)).astype(np.float32)
        table = pa.Table.from_arrays(
            [pa.array(ids, pa.string()), pa.array([f"gs://b/{i}.jpg" for i in ids], pa.string()),
             pa.array([None] * size, pa.string()),
             pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)],
            schema=embeddings_schema(DIM, synthetic_metadata(DIM)))
        pq.write_table(table, os.path.join(folder, f"embeddings-{number:05d}.parquet"), row_group_size=37)
        written.update(zip(ids, vectors))
        start += size
    return written


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5).filter(lambda s: sum(s) >= 1),
       kind=st.sampled_from(["exact", "ann"]))
def test_every_row_of_every_file_is_in_the_merged_index_once_with_its_vector(sizes, kind, tmp_path_factory):
    """Whatever the files' sizes (empty ones too), the merged index holds each id once, at its file order, with
    its own vector, and a query by each vector finds its id first."""
    work = tmp_path_factory.mktemp("files")
    written = _write_files(str(work / "emb"), sizes, seed=len(sizes))
    folder = str(work / "search")
    assert search(["build", "--embeddings", str(work / "emb" / "embeddings-*.parquet"), "--output", folder,
                   "--kind", kind, *IN_PROCESS]) == 0
    ids = search_ids_by_row(folder)
    assert ids == list(written)  # file by file, row by row: the order a single-process build adds them in
    opened = open_search_index(folder)
    unit = np.stack([v / np.linalg.norm(v) for v in written.values()])
    np.testing.assert_allclose(opened.vectors.vectors(np.arange(len(ids))), unit, atol=1e-5)
    if kind == "exact" or opened.vectors.kind == "exact":
        _, rows = opened.vectors.search(unit, 1)
        assert [ids[r] for r in rows[:, 0]] == ids


def test_an_id_in_two_files_is_refused_and_leaves_nothing_behind(tmp_path, capsys):
    written = _write_files(str(tmp_path / "emb"), [120, 80], seed=3)
    copy = pq.read_table(str(tmp_path / "emb" / "embeddings-00000.parquet")).slice(5, 1)
    pq.write_table(copy, str(tmp_path / "emb" / "embeddings-00002.parquet"))
    folder = str(tmp_path / "search")
    assert search(["build", "--embeddings", str(tmp_path / "emb" / "*.parquet"), "--output", folder,
                   *IN_PROCESS]) == 2
    assert f"id {list(written)[5]!r} appears more than once" in capsys.readouterr().err
    assert os.listdir(folder) == [], "no shard, sample or segment of the refused build is left"


def test_a_build_across_workers_writes_to_gs_and_is_queried_from_there(tmp_path, gcs):
    root = str(tmp_path / "root")
    index = _three_nights(root)
    folder = f"gs://{gcs.bucket}/distributed-{tmp_path.name}"
    # In process: the emulator's anonymous credentials are set for this process only (see conftest's gcs).
    assert search(["build", "--index", root, "--output", folder, "--kind", "compressed", *IN_PROCESS]) == 0
    assert sorted(search_ids_by_row(folder)) == sorted(index.view)
    queries = np.stack([index.view[i] for i in sorted(index.view)[::50]])
    found, truth = _answers(folder, queries), index.exact(queries, 10)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.9


def test_beam_options_are_refused_outside_build(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        search(["query", "--index", str(tmp_path), "--id", "a", "--runner", "DirectRunner"])
    assert exited.value.code == 2
    assert "Beam options (--runner) apply only to search build" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search(["build", "--index", str(tmp_path), "--output", str(tmp_path / "s"), "--runer", "DirectRunner"])
    assert "did you mean --runner?" in capsys.readouterr().err


def _running(pid: str) -> bool:
    """Alive and not a zombie (this container's init may be slow to reap the orphans of a killed launcher)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_during_the_fill_job_stops_the_workers_says_one_line_and_leaves_nothing(tmp_path):
    """The window: after the launcher announced the fill job (the sample job and training are done) and before
    the merge. Exit 130, one line, no worker process left, nothing of the build in --output."""
    import signal
    import subprocess
    import sys
    import time

    root, folder = str(tmp_path / "root"), str(tmp_path / "search")
    _three_nights(root)
    build = subprocess.Popen([sys.executable, "-m", "pipeline.search", "build", "--index", root, "--output", folder,
                              "--kind", "ann", *TWO_PROCESSES], stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or not lines[-1].startswith("Adding "):
        lines.append(build.stderr.readline())
        assert lines[-1], "".join(lines)
    time.sleep(1.5)  # the job's worker processes are starting or filling
    children = subprocess.run(["pgrep", "-P", str(build.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the fill job's workers were running when Ctrl-C came"
    build.send_signal(signal.SIGINT)
    rest = build.stderr.read().strip().splitlines()
    assert build.wait(timeout=60) == 130
    assert not any(line.startswith("Merging ") for line in rest), "interrupted before the merge"
    assert [line for line in rest if line.strip()][-1].startswith(f"Interrupted: {folder} is as it was")
    assert not any("Traceback" in line for line in rest), rest
    time.sleep(1)
    assert not [pid for pid in children if _running(pid)]
    assert os.listdir(folder) == []
