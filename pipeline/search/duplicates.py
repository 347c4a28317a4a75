"""Near-duplicate groups: every pair at or above a cosine similarity, joined into connected groups.

Images with the same bytes (the embeddings' sha256 column) join a group whatever their vectors say.
A group's first member is its smallest id; each member's similarity is to that first member.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.search.store import SearchIndex

GROUPS_SCHEMA = pa.schema([
    pa.field("group", pa.int64(), nullable=False),  # 1, 2, ... in the order of the groups' first ids
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("similarity", pa.float32()),  # to the group's first member (1 for the first member itself)
    pa.field("same_bytes", pa.bool_()),  # same sha256 as an earlier member of the group (never the first)
    pa.field("sha256", pa.string()),
])


def _find(parent: np.ndarray, row: int) -> int:
    while parent[row] != row:
        parent[row] = parent[parent[row]]
        row = parent[row]
    return row


def _join(parent: np.ndarray, a: int, b: int) -> None:
    a, b = _find(parent, a), _find(parent, b)
    if a != b:
        parent[max(a, b)] = min(a, b)


def duplicate_groups(index: SearchIndex, threshold: float) -> pa.Table:
    """Every row with another row at >= threshold, or with the same bytes, as groups (GROUPS_SCHEMA)."""
    items = index.items
    parent = np.arange(items.num_rows)
    for rows, neighbours, _ in index.vectors.pairs_above(threshold):
        for a, b in zip(rows.tolist(), neighbours.tolist()):
            _join(parent, a, b)
    by_content: dict = {}
    for row, digest in enumerate(items.column("sha256").to_pylist()):
        if digest:
            _join(parent, by_content.setdefault(digest, row), row)
    roots = np.array([_find(parent, row) for row in range(items.num_rows)], np.int64)
    sizes = np.bincount(roots, minlength=items.num_rows)
    grouped = np.flatnonzero(sizes[roots] > 1)
    ids, uris, digests = (items.column(c).to_pylist() for c in ("id", "uri", "sha256"))
    members: dict = {}
    for row in grouped.tolist():
        members.setdefault(int(roots[row]), []).append(row)
    groups = sorted((sorted(rows, key=lambda r: ids[r]) for rows in members.values()), key=lambda g: ids[g[0]])
    out = {name: [] for name in GROUPS_SCHEMA.names}
    for number, rows in enumerate(groups, start=1):
        vectors = index.vectors.vectors(rows)
        similarities = vectors @ vectors[0]
        seen = set()
        for row, similarity in zip(rows, similarities.tolist()):
            out["group"].append(number)
            out["id"].append(ids[row])
            out["uri"].append(uris[row])
            out["similarity"].append(similarity)
            out["same_bytes"].append(digests[row] in seen)  # a copy of an earlier member: never the first
            out["sha256"].append(digests[row])
            if digests[row]:
                seen.add(digests[row])
    return pa.table(out, schema=GROUPS_SCHEMA)


def byte_identical_copies(groups: pa.Table) -> int:
    """Members whose bytes equal an earlier member's of their group."""
    return sum(groups.column("same_bytes").to_pylist())
