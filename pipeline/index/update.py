"""One update of an index: take the lease, plan, check, fence off older writers, clean up, embed, commit.

Every commit is the conditional create of the next log entry (store.py). Once its plan passed the safety
valves, an update commits a `begin` entry, so an older holder of the lease that wakes up later cannot commit
anything after it. Leftovers are removed only after that, by the lease's holder, and only folders of other
updates that no commit names. A refused update leaves the index exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Callable, Optional, Sequence

from pipeline.index.lease import UpdateLease
from pipeline.index.plan import PlanCounts, failed_for_good, plan_update, write_chunks
from pipeline.index.store import IndexRefused, IndexStore, LogEntry
from pipeline.index.view import ViewChanges, changes_since
from pipeline.options import JobConfig
from pipeline.storage import timestamped_name
from transforms import crashpoints
from transforms.records import plural

DEFAULT_MAX_REMOVED = "0.5"


class UnsafeUpdate(IndexRefused):
    """The update would do something an operator rarely means (remove most of the index); nothing was changed."""


@dataclasses.dataclass(frozen=True)
class RemovalLimit:
    """--max_removed: a share of the live ids ('0.5', '50%') or a count ('1000')."""

    text: str
    fraction: Optional[float] = None
    count: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "RemovalLimit":
        import argparse

        value = text.strip()
        try:
            if value.endswith("%"):
                fraction = float(value[:-1]) / 100
            elif "." in value:
                fraction = float(value)
            else:
                count = int(value)
                if count < 0:
                    raise ValueError
                return cls(text, count=count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a share (0.5, 50%) or a count of ids (1000), got {text}") \
                from None
        if not 0 <= fraction <= 1:
            raise argparse.ArgumentTypeError(f"a share must be between 0 and 1 (0% and 100%), got {text}")
        return cls(text, fraction=fraction)

    def allows(self, removed: int, live: int) -> bool:
        if self.count is not None:
            return removed <= self.count
        return removed <= self.fraction * live


@dataclasses.dataclass(frozen=True)
class UpdateOutcome:
    name: str
    counts: PlanCounts
    runs: int
    embedded: int
    failed: int
    failed_for_good: int  # of `failed`, inputs whose bytes did not decode: not read again until they change


def check_removals(counts: PlanCounts, limit: RemovalLimit) -> None:
    previous = counts.updated + counts.unchanged + counts.retried + counts.removed
    if counts.removed and not limit.allows(counts.removed, previous):
        share = counts.removed / previous
        raise UnsafeUpdate(
            f"This update would remove {counts.removed} of the {previous} live ids ({share:.0%}), more than "
            f"--max_removed {limit.text} allows; nothing was changed. If the input is complete and this is meant, "
            f"run again with --max_removed {counts.removed} (or {min(1.0, share + 0.005):.2f}). Otherwise check "
            f"--input: a manifest cut short or the wrong night's files look exactly like this."
        )
    if not (counts.new + counts.updated + counts.unchanged + counts.retried):
        raise UnsafeUpdate(f"No row of the input is usable ({plural(counts.refused, 'row')} refused as bad or "
                           f"repeated): nothing was changed. Fix --input and run again.")


def check_view_loss(changes: ViewChanges, limit: RemovalLimit, runs: int) -> None:
    """The valve on the view itself: refuses to commit an update that would take more than `limit` of the ids
    with a vector out of the view, whether they left the input or now fail (a night whose uris all moved to a
    bucket the workers cannot read removes nothing from the input and would empty the view)."""
    lost, before = len(changes.removed), changes.earlier_counts[0]
    if not lost or limit.allows(lost, before):
        return
    share = lost / before
    raise UnsafeUpdate(
        f"This update would take {lost} of the {before} ids of the current view out of it ({share:.0%}): "
        f"{lost - changes.removed_live} left the input and {changes.removed_live} now fail (a new uri, or a "
        f"retried one, did not embed). That is more than --max_removed {limit.text} allows, so it was not "
        f"committed: the current view stays as it was, and the {plural(runs, 'run')} it finished are kept for the "
        f"next update. If this is meant, run again with --max_removed {lost} (or {min(1.0, share + 0.005):.2f}); "
        f"otherwise look at this update's errors (a bucket the workers cannot read, or mangled paths, look like "
        f"this) and fix --input."
    )


def update_index(
    store: IndexStore,
    config: JobConfig,
    beam_args: Sequence[str],
    run_size: int,
    max_removed: RemovalLimit,
    run: Callable[[JobConfig, Sequence[str]], dict],
    say: Callable[[str], None] = print,
) -> UpdateOutcome:
    """Makes the index match `config.input`; `run(config, beam_args)` embeds one chunk (pipeline.run's run)."""
    name = timestamped_name()
    with UpdateLease(store.objects, store.path("locks"), name) as lease:
        entries = store.log()
        if lease.taken_over:
            say(f"Took over the lease of update {lease.taken_over['update']}, which stopped renewing it.")
        counts = plan_update(store, name, config, beam_args, entries)  # writes only updates/NAME
        try:
            check_removals(counts, max_removed)
        except UnsafeUpdate:
            store.remove(f"updates/{name}")
            raise
        lease.verify()
        seq = store.append(len(entries) + 1, {"kind": "begin", "update": name, "host": socket.gethostname(),
                                              "pid": os.getpid()}).seq  # the fence: nobody older commits now
        crashpoints.reach("update.begun")
        for leftover in store.leftovers(entries, keep_update=name):
            say(f"Removing {leftover}: left by an update that did not finish.")
            store.remove(leftover)
        chunks = write_chunks(store, name, run_size)
        say(f"Planned: {counts.new} new, {counts.updated} updated, {counts.unchanged} unchanged, {counts.removed} "
            f"removed, {counts.retried} retried; {plural(counts.to_embed, 'input')} to embed in "
            f"{plural(len(chunks), 'run')} of at most {run_size:,}.")
        embedded, failed, for_good = 0, counts.refused + counts.unchanged_failures, counts.unchanged_failures
        for number, chunk in enumerate(chunks, start=1):
            run_name = f"{name}-{number:05d}"
            run_config = dataclasses.replace(config, input=chunk, output_dir=store.run_dir(run_name),
                                             overwrite=False, skip_existing=())
            say(f"Run {number}/{len(chunks)}: embedding {store.run_dir(run_name)} ...")
            lease.verify()
            try:
                report = run(run_config, beam_args)
            except KeyboardInterrupt:
                if not lease.lost:  # ours to clean: the lease is still held
                    store.remove(f"runs/{run_name}")
                raise
            crashpoints.reach("update.run_written")
            lease.verify()
            run_counts = report["counts"]
            seq = store.append(seq + 1, {"kind": "run", "run": run_name, "update": name,
                                         "embedded": run_counts["embedded"], "errors": run_counts["errors"],
                                         "engine": report["engine"]}).seq
            crashpoints.reach("update.run_committed")
            embedded += run_counts["embedded"]
            failed += run_counts["errors"]
            for_good += failed_for_good(store.parquet_files(store.run_dir(run_name), "errors"))
            say(f"Run {number}/{len(chunks)} finished: {run_counts['embedded']} embedded, {run_counts['errors']} "
                f"failed.")
        body = {"kind": "update", "update": name, "input": config.input,
                "counts": {**dataclasses.asdict(counts), "embedded": embedded, "failed": failed,
                           "failed_for_good": for_good}}
        committed = [*store.log(), LogEntry(seq + 1, body)]  # the log as it would be after this commit
        check_view_loss(changes_since(store, committed, [len(entries)]), max_removed, len(chunks))
        lease.verify()
        crashpoints.reach("update.before_commit")
        store.append(seq + 1, body)
    return UpdateOutcome(name, counts, len(chunks), embedded, failed, for_good)
