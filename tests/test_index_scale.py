"""At corpus scale the launcher joins ids bucket by bucket through local files: the answers must not change."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import commit_run, commit_update, synthetic_metadata
from pipeline.index import spill
from pipeline.index.store import IndexStore
from pipeline.index.view import current_selection, index_status

DIM = 4


def _run(store: IndexStore, seq: int, name: str, update: str, pairs: list) -> None:
    commit_run(store, seq, name, update, pairs, np.zeros((len(pairs), DIM)), row_group_size=7)


def _update(store: IndexStore, seq: int, name: str, live: list) -> None:
    commit_update(store, seq, name, live, row_group_size=7)


@pytest.fixture
def three_nights(tmp_path) -> IndexStore:
    """Night 1 embeds a0-a49; night 2 changes a0-a9, removes a40-a49, adds b0-b9 and c0-c4 (which fail);
    night 3 began, embedded d0-d2 and did not finish."""
    store = IndexStore(str(tmp_path / "index"))
    store.create_identity(synthetic_metadata(DIM))
    first = [(f"a{i}", f"gs://b/a{i}-v0.jpg") for i in range(50)]
    _run(store, 1, "n1-00001", "n1", first)
    _update(store, 2, "n1", first)
    second = [(f"a{i}", f"gs://b/a{i}-v1.jpg") for i in range(10)] + [(f"b{i}", f"gs://b/b{i}.jpg") for i in range(10)]
    _run(store, 3, "n2-00001", "n2", second)
    _update(store, 4, "n2", second + first[10:40] + [(f"c{i}", f"gs://b/c{i}.jpg") for i in range(5)])
    store.append(5, {"kind": "begin", "update": "n3"})
    _run(store, 6, "n3-00001", "n3", [(f"d{i}", f"gs://b/d{i}.jpg") for i in range(3)])
    return store


@pytest.mark.parametrize("rows_per_bucket", [1_000_000, 7])
def test_status_counts_the_same_whether_ids_fit_one_bucket_or_many(three_nights, monkeypatch, rows_per_bucket):
    monkeypatch.setattr(spill, "ROWS_PER_BUCKET", rows_per_bucket)
    status = index_status(three_nights)
    assert (status.live_ids, status.embedded, status.failed) == (55, 50, 5)
    assert (status.superseded_vectors, status.removed_ids, status.pending_vectors) == (20, 10, 3)
    assert status.unfinished_updates == ("n3",)


@pytest.mark.parametrize("rows_per_bucket", [1_000_000, 7])
def test_the_current_view_is_each_live_ids_latest_row_in_any_number_of_buckets(three_nights, monkeypatch,
                                                                              rows_per_bucket):
    monkeypatch.setattr(spill, "ROWS_PER_BUCKET", rows_per_bucket)
    files, masks, count = current_selection(three_nights, three_nights.log())
    kept = {}
    for (seq, path), mask in zip(files, masks):
        table = pq.read_table(path, columns=["id", "uri"]).filter(pa.array(mask))
        kept.update({i: (seq, u) for i, u in zip(table.column("id").to_pylist(), table.column("uri").to_pylist())})
    assert count == len(kept) == 50
    assert kept["a3"] == (3, "gs://b/a3-v1.jpg") and kept["a20"] == (1, "gs://b/a20-v0.jpg")
    assert not {"a45", "c0", "d0"} & set(kept)  # removed, failed, and embedded by an unfinished update


def test_buckets_split_by_a_stable_hash_and_leave_no_files_behind(tmp_path):
    assert spill.bucket_of(["a", "b", "img0000000001"], 7).tolist() == [4, 4, 2]  # crc32: the same in every process
    with spill.Buckets(10, folder=str(tmp_path)) as buckets:
        assert buckets.count == 1
    with spill.Buckets(10 * spill.ROWS_PER_BUCKET + 1, folder=str(tmp_path)) as buckets:
        assert buckets.count == 11
        buckets.add("side", iter([pa.table({"id": ["x", "y"]})]), pa.schema([("id", pa.string())]))
        found = sorted(i for bucket in buckets for i in bucket["side"].column("id").to_pylist())
    assert found == ["x", "y"] and os.listdir(tmp_path) == []


def test_a_bucket_carries_only_its_own_rows_when_pickled_for_a_shuffle():
    import pickle

    table = pa.table({"id": [f"img{i:09d}" for i in range(20000)], "uri": [f"gs://b/{i}.jpg" for i in range(20000)]})
    parts = dict(spill.split(table, 50))
    assert sum(p.num_rows for p in parts.values()) == 20000
    assert sum(len(pickle.dumps(p)) for p in parts.values()) < 2 * len(pickle.dumps(table))
