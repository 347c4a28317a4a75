"""Keeps a serving table equal to an index's current view: one row per live id with its latest vector.

The target records what it holds as a `PublishState`: which index, which model's vectors, and the log length
(`seq`) its rows reflect. A publish writes only the difference between the view then and the view now (the
first one writes everything), so a night's publish costs the night's changes, and a publish with nothing new
writes nothing. A target that commits in several steps (LanceDB) first adds the log length it is moving to to
`pending`; a publish that stopped half way leaves a mix of the views, and the next one writes the difference
from every one of them, so that any sequence of crashes and nights, followed by a publish, ends equal to the
view. Only a publish that completes clears `pending`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterator, Optional

from pipeline.index.store import IndexStore, now_iso
from pipeline.index.view import ViewChanges, changes_since, view_metadata
from pipeline.preflight import metadata_differences
from pipeline.publish.state import PublishRefused, PublishState, Target
from pipeline.search.collection import Batch, Collection

DEFAULT_TABLE = "image_embeddings"
# LanceDB: below this, a query scanning every vector is quick, and IVF-PQ would train on too few.
DEFAULT_ANN_MIN_ROWS = 100_000


@dataclasses.dataclass(frozen=True)
class Published:
    target: str
    state: PublishState
    upserted: int
    removed: int
    unchanged: bool  # the target already held this view: nothing was written
    ann_index: Optional[str]


def index_key(identity: dict) -> str:
    """An index's identity, which a copy of the index (in another bucket) keeps: the index_id of its index.json
    (a digest of index.json for indexes made before it had one)."""
    return identity.get("index_id") or hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _entered_rows(changes: ViewChanges, metadata: dict) -> Iterator[Batch]:
    used = [(path, mask) for (_, path), mask in zip(changes.files, changes.entered) if mask.any()]
    return Collection(described="", files=tuple(p for p, _ in used), metadata=metadata,
                      count=changes.entered_count, keep=tuple(m for _, m in used)).batches()


def publish(store: IndexStore, target: Target, full: bool = False) -> Published:
    """Makes `target` hold the current view of the index at `store` (see the module docstring)."""
    identity = store.identity()
    if identity is None:
        raise PublishRefused(f"{store.root} is not an index (no index.json); check --index.")
    entries = store.log()
    if store.latest_update(entries) is None:
        raise PublishRefused(f"The index {store.root} has no finished update yet, so it has no view to publish; "
                             f"run python -m pipeline.index update first.")
    metadata = view_metadata(store, entries)
    key = index_key(identity)
    before = target.state()
    if before is not None:
        differences = metadata_differences(before.metadata, metadata)
        if differences:
            raise PublishRefused(f"{target.described} holds vectors of another model or preprocessing "
                                 f"({'; '.join(differences)}); publish to another --table.")
        if before.index != key:
            raise PublishRefused(f"{target.described} holds the view of another index of the same model (published "
                                 f"at {before.published_at}); publish {store.root} to another --table.")
        if not full and not before.pending:
            found = target.rows()
            if found != before.rows:
                raise PublishRefused(
                    f"{target.described} holds {found:,} rows, but the last publish left {before.rows:,}: it was "
                    f"changed by something else. Nothing was changed; run again with --full to rewrite it from the "
                    f"index (readers keep the old rows until it commits).")
            if before.seq == len(entries):
                return Published(target.described, before, 0, 0, True, target.ensure_ann_index(False))
    earlier = [] if full or before is None else sorted({before.seq, *before.pending})
    changes = changes_since(store, entries, earlier)
    if before is not None and not full and not before.pending and not changes.entered_count \
            and not len(changes.removed):
        # Nights that changed nothing in the view: the target is not written at all (no new version, no new state).
        return Published(target.described, before, 0, 0, True, target.ensure_ann_index(False))
    after = PublishState(key, metadata, len(entries), changes.count, now_iso())
    target.write(_entered_rows(changes, metadata), changes.removed, int(metadata["dim"]), before, after,
                 replace=full or before is None)
    return Published(target.described, after, changes.entered_count, len(changes.removed), False,
                     target.ensure_ann_index(True))


def target_for(url: str, table: str = DEFAULT_TABLE, ann_min_rows: int = DEFAULT_ANN_MIN_ROWS) -> Target:
    """postgresql://... (or postgres://) is a PostgreSQL database; lancedb://PATH, gs://... or a local folder is a
    LanceDB database."""
    if "://" in url and not url.startswith(("postgresql://", "postgres://", "lancedb://", "gs://", "s3://", "az://")):
        raise PublishRefused(f"--to {url}: publish writes to postgresql://USER@HOST/DATABASE or to a LanceDB "
                             f"folder (lancedb://PATH, gs://BUCKET/PATH or a local folder).")
    try:
        if url.startswith(("postgresql://", "postgres://")):
            from pipeline.publish.postgres import PostgresTable

            return PostgresTable(url, table)
        from pipeline.publish.lancedb_table import LanceTable

        return LanceTable(url[len("lancedb://"):] if url.startswith("lancedb://") else url, table, ann_min_rows)
    except ImportError as exc:
        raise PublishRefused(f"Publishing needs {exc.name}: pip install '.[publish]' (psycopg and lancedb) in this "
                             f"environment.") from None
