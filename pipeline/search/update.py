"""search update: bring a search index built from an index ROOT to the ROOT's current view, in proportion to what
changed since the view it holds (the log length it records).

Ids that left the view, and the old rows of ids whose vector changed, are tombstoned (removed-GEN.npy; searches
skip them through a faiss selector, on every kind, fast-scan codes included); the vectors of ids that entered or
changed are added with the trained quantizer and codebooks kept, and their items and exact vectors written as new
segments. The sample queries' exact neighbours are kept current too, so the update measures recall@10 against
exact search after every night, and re-tunes the probes on it.

When the tombstones pass COMPACT_SHARE of the rows, the lists are rewritten from the view with the training kept
(a compaction). When the vectors added since training pass RETRAIN_SHARE of those trained on, or the held-out
recall falls RECALL_DROP below what it was after training, the quantizer no longer fits the data: --retrain auto
rebuilds, never refuses (exit 2, the old build still served), always rebuilds every time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np

from pipeline.preflight import metadata_differences
from pipeline.search.collection import CollectionError, from_index, index_source, selected
from pipeline.search.items import ItemsWriter, fingerprints
from pipeline.search.store import (
    Generation,
    SearchIndex,
    SearchIndexError,
    build_search_index,
    file_names,
    now,
    open_search_index,
    publish_manifest,
    save_index_files,
)
from pipeline.search.vector_index import StoredVectors, normalised, retune
from transforms.crashpoints import reach

RETRAINS = ("auto", "never", "always")
COMPACT_SHARE = 0.2  # tombstoned rows above this share of all rows: the lists are rewritten
RETRAIN_SHARE = 0.5  # vectors added since training above this share of the collection trained on: retrain
RECALL_DROP = 0.02  # held-out recall@10 this far below its value after training, after re-tuning, retrains (400
#                     queries measure recall to about 0.005: a smaller drop is mostly noise)


class RetrainRefused(SearchIndexError):
    """The index needs retraining and --retrain never forbids it."""


@dataclasses.dataclass(frozen=True)
class Updated:
    action: str  # "up to date", "updated", "compacted", "retrained"
    added: int  # rows added: ids that entered the view or changed
    removed: int  # ids that left the view
    changed: int  # of `added`, ids the index held with another vector
    count: int  # ids the search index answers with now
    manifest: dict
    reason: str = ""  # why it compacted or retrained


def update_search_index(root: str, index_root: str, retrain: str, log: Callable[[str], None],
                        max_memory: Optional[int] = None) -> Updated:
    from pipeline.index.store import IndexStore
    from pipeline.index.view import changes_since

    searched = open_search_index(root, with_truth=True)
    manifest = searched.manifest
    source = manifest.get("index_source")
    if not source:
        raise SearchIndexError(f"{root} was built from {manifest['source']}, not from an index ROOT with this "
                               f"version: only a search index built with search build --index ROOT can be updated. "
                               f"Build it once that way.")
    store = IndexStore(index_root.rstrip("/"))
    identity = store.identity()
    if identity is None:
        raise CollectionError(f"--index {index_root} is not an index (no index.json).")
    if identity["index_id"] != source["index_id"]:
        raise SearchIndexError(f"{root} holds the view of another index ({source['root']}, index_id "
                               f"{source['index_id'][:8]}...), not of {index_root}; build a search index of it "
                               f"elsewhere, or update {root} from {source['root']}.")
    entries = store.log()
    budget = max_memory or manifest.get("max_memory")
    if retrain == "always":
        return _rebuild(searched, store, entries, log, budget, "--retrain always")
    if len(entries) == source["seq"]:
        return Updated("up to date", 0, 0, 0, manifest["count"], manifest)
    changes = changes_since(store, entries, [source["seq"]])
    entered = selected(manifest["source"], changes.files, changes.entered, changes.entered_count,
                       index_source(store, entries))
    if entered.count and metadata_differences(manifest["model"], entered.metadata):
        raise SearchIndexError(f"The vectors that entered {index_root} differ from those of {root} "
                               f"({'; '.join(metadata_differences(manifest['model'], entered.metadata))}); rebuild "
                               f"with search build --index {index_root} --overwrite.")
    vectors = searched.vectors
    entered_ids = list(entered.ids())
    leaving = set(changes.removed.to_pylist())
    old_rows, old_ids = searched.items.rows_with("id", fingerprints(entered_ids + sorted(leaving)))
    wanted = leaving.union(entered_ids)
    old_rows = np.array([row for row, id_ in zip(old_rows.tolist(), old_ids) if id_ in wanted], np.int64)
    changed = len(set(old_ids) & set(entered_ids))
    rows = vectors.rows + entered.count
    dead = len(vectors.removed) + len(old_rows)
    training = vectors.params.get("training")
    if training:
        added = training["added_since"] + entered.count
        if added > RETRAIN_SHARE * training["collection"]:
            reason = (f"{added:,} vectors were added since the quantizer was trained on a collection of "
                      f"{training['collection']:,} (over {RETRAIN_SHARE:.0%})")
            return _retrain(searched, store, entries, log, budget, retrain, reason)
    if dead > COMPACT_SHARE * rows:
        log(f"Rows removed by updates would be {dead / rows:.0%} of the index (over {COMPACT_SHARE:.0%}): "
            f"rewriting its lists from the view, the training kept ...")
        return _compact(searched, store, entries, log, entered.count, len(leaving), changed)

    if not entered.count and not len(old_rows):  # the log moved, the view did not: only the position is new
        after = {**manifest, "written_at": now(), "index_source": index_source(store, entries)}
        publish_manifest(searched.root, after, searched.version)
        return Updated("up to date", 0, 0, 0, vectors.count, after)
    vectors.remove(old_rows)
    for truth in (vectors.truth or {}).values():
        truth.remove(old_rows)
    files = file_names(manifest)
    with_sha256 = 0
    with Generation(root) as generation:
        if entered.count:
            with_sha256 = _append(vectors, entered, generation, files)
        if vectors.truth:
            retune(vectors, log, keep_if_reached=True)
            drop = training.get("held_out_recall_at_10", 0) - vectors.params.get("held_out_recall_at_10", 1)
            if drop > RECALL_DROP:
                generation.discard()
                reason = (f"held-out recall@10 fell to {vectors.params['held_out_recall_at_10']:.3f} from "
                          f"{training['held_out_recall_at_10']:.3f} after training")
                return _retrain(searched, store, entries, log, budget, retrain, reason)
            training["added_since"] = training["added_since"] + entered.count
        save_index_files(generation, vectors, files)
        generation.upload()
    reach("search.update.written")
    after = {**manifest, "format": 2, "written_at": now(), "updated_at": now(), "count": vectors.count,
             "rows": vectors.rows, "files": files, "index_source": index_source(store, entries),
             "with_sha256": manifest.get("with_sha256", 0) + with_sha256,
             "index": {**manifest["index"], **vectors.params}, "updates": manifest.get("updates", 0) + 1}
    publish_manifest(searched.root, after, searched.version)
    return Updated("updated", entered.count, len(leaving), changed, vectors.count, after)


def _append(vectors, entered, generation: Generation, files: dict) -> int:
    """Adds the entered rows' vectors to the index and its sample queries' truth, and their items and exact
    vectors as this generation's segments; returns how many of them have a sha256."""
    items = ItemsWriter(generation.path("items", "parquet"), first_row=vectors.rows)
    stored = open(generation.path("exact", "f32"), "wb") if vectors.kind == "compressed" else None
    try:
        for batch in entered.batches():
            unit = normalised(batch.vectors)
            base = vectors.rows
            vectors.index.add(unit)
            items.add(batch.ids, batch.uris, batch.sha256)
            for truth in (vectors.truth or {}).values():
                truth.add(unit, base)
            if stored:
                unit.tofile(stored)
    finally:
        items.close()
        if stored:
            stored.close()
    files["items"] = files["items"] + [generation.files[0]]
    if stored:
        files["exact_vectors"] = files["exact_vectors"] + [os.path.basename(stored.name)]
        vectors.stored = StoredVectors(vectors.stored.paths + [stored.name], vectors.rows, vectors.index.d)
    return items.with_sha256


def _retrain(searched: SearchIndex, store, entries, log, budget, retrain: str, reason: str) -> Updated:
    if retrain == "never":
        raise RetrainRefused(f"{searched.root} needs retraining: {reason}. Nothing was changed (the old build is "
                             f"still served); run search update with --retrain auto (or always) when a full build "
                             f"fits the schedule.")
    log(f"Retraining: {reason} ...")
    return _rebuild(searched, store, entries, log, budget, reason)


def _rebuild(searched: SearchIndex, store, entries, log, budget, reason: str) -> Updated:
    from pipeline.index.view import changes_since

    collection = from_index(store.root)
    seq = searched.manifest["index_source"]["seq"]
    changes = changes_since(store, entries, [seq])
    manifest = build_search_index(collection, searched.root, searched.manifest["index"]["kind"], True, log, budget,
                                  replacing=searched.version, extra={"updates": searched.manifest.get("updates", 0)})
    return Updated("retrained", changes.entered_count, len(changes.removed), 0, manifest["count"], manifest, reason)


def _compact(searched: SearchIndex, store, entries, log, added: int, removed: int, changed: int) -> Updated:
    training = searched.vectors.params["training"] if searched.vectors.truth else None
    collection = from_index(store.root)
    kind = searched.manifest["index"]["kind"]
    if training:
        training["added_since"] += added
    manifest = build_search_index(collection, searched.root, kind, True, log,
                                  trained=searched.vectors if training else None, replacing=searched.version,
                                  extra={"updates": searched.manifest.get("updates", 0) + 1, "updated_at": now()})
    return Updated("compacted", added, removed, changed, manifest["count"], manifest,
                   f"over {COMPACT_SHARE:.0%} of the rows were removed")
