"""What a serving table and publish share: the record a target keeps of what it holds, the target's contract,
and the two ways a publish ends badly. The targets (postgres.py, lancedb_table.py) and sync.py import this
module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional, Protocol

import pyarrow as pa

from pipeline.search.collection import Batch


class PublishRefused(ValueError):
    """The target cannot take this index's view as asked; nothing was changed (exit code 2)."""


class PublishFailed(RuntimeError):
    """The target could not be read or written (unreachable, another publish in between); run again (exit 1)."""


@dataclasses.dataclass(frozen=True)
class PublishState:
    index: str  # the index the rows come from (index_key)
    metadata: dict  # the embedding.* metadata of the vectors: model, fingerprint, preprocessing, dim
    seq: int  # the rows are the view after this many log entries
    rows: int
    published_at: str
    # Log lengths that publishes began moving the rows to since the last complete one: each may have stopped half
    # way, so the rows may hold a mix of the view after `seq` and the views after each of these.
    pending: tuple = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "PublishState":
        try:
            fields = json.loads(text)
            pending = fields.get("pending")  # one number (or null) in records of earlier versions
            fields["pending"] = tuple(sorted(pending if isinstance(pending, list) else [] if pending is None
                                             else [pending]))
            return cls(**fields)
        except (TypeError, ValueError, AttributeError):
            raise PublishFailed(f"{where} holds a publish record this version cannot read: {text[:200]!r}.") from None

    def begun(self, seq: int) -> "PublishState":
        """This state with a publish towards `seq` begun (and every earlier unfinished one kept)."""
        return dataclasses.replace(self, pending=tuple(sorted({*self.pending, seq})))


class Target(Protocol):
    described: str

    def state(self) -> Optional[PublishState]:
        """What the last publish recorded; None for a table that does not exist yet. A table that exists and was
        not written by publish is refused."""

    def rows(self) -> int: ...

    def write(self, batches: Iterator[Batch], removed: pa.Array, dim: int, before: Optional[PublishState],
              after: PublishState, replace: bool) -> None:
        """Upserts `batches`, deletes `removed` and records `after`; with `replace`, also deletes every other id."""

    def ensure_ann_index(self, rows_written: bool) -> Optional[str]:
        """Creates (or brings up to date) the nearest-neighbour index; says what it did, if anything."""

    def close(self) -> None: ...
