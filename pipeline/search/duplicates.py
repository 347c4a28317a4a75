"""Near-duplicate groups: every pair at or above a cosine similarity, joined into connected groups.

Images with the same bytes (the embeddings' sha256 column) join a group whatever their vectors say.
A group's first member is its smallest id; each member's similarity is to that first member.
"""

from __future__ import annotations

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


class _Groups:
    """Union-find over the rows that have a partner: memory grows with the pairs, not the index."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, row: int) -> int:
        parent = self.parent
        parent.setdefault(row, row)
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    def join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def members(self) -> list:
        """Each group's rows, groups of two or more only."""
        found: dict = {}
        for row in self.parent:
            found.setdefault(self.find(row), []).append(row)
        return [rows for rows in found.values() if len(rows) > 1]


def duplicate_groups(index: SearchIndex, threshold: float) -> pa.Table:
    """Every row with another row at >= threshold, or with the same bytes, as groups (GROUPS_SCHEMA)."""
    groups = _Groups()
    for rows, neighbours, _ in index.vectors.pairs_above(threshold):
        for a, b in zip(rows.tolist(), neighbours.tolist()):
            groups.join(a, b)
    first_with: dict = {}
    rows, digests = index.items.duplicated("sha256")  # rows whose bytes another row shares
    for row, digest in zip(rows.tolist(), digests):
        groups.join(first_with.setdefault(digest, row), row)
    members = groups.members()
    wanted = sorted(row for rows in members for row in rows)
    found = index.items.take(wanted)
    item = dict(zip(wanted, zip(*(found.column(c).to_pylist() for c in ("id", "uri", "sha256")))))
    ordered = sorted((sorted(rows, key=lambda r: item[r][0]) for rows in members), key=lambda g: item[g[0]][0])
    out = {name: [] for name in GROUPS_SCHEMA.names}
    for number, rows in enumerate(ordered, start=1):
        vectors = index.vectors.vectors(rows)
        similarities = vectors @ vectors[0]
        seen = set()
        for row, similarity in zip(rows, similarities.tolist()):
            id_, uri, digest = item[row]
            out["group"].append(number)
            out["id"].append(id_)
            out["uri"].append(uri)
            out["similarity"].append(similarity)
            out["same_bytes"].append(digest in seen)  # a copy of an earlier member: never the first
            out["sha256"].append(digest)
            if digest:
                seen.add(digest)
    return pa.table(out, schema=GROUPS_SCHEMA)


def byte_identical_copies(groups: pa.Table) -> int:
    """Members whose bytes equal an earlier member's of their group."""
    return sum(groups.column("same_bytes").to_pylist())
