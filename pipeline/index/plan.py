"""Planning an update, as one Beam pipeline: which ids are live, which (id, uri) to embed, what changed.

Joins the input (read with the pipeline's own source, duplicate rule included) with the last update's live
set and the (id, uri) of every committed vector. An input is embedded when no committed vector has its
(id, uri): new ids, ids whose uri changed, inputs that failed before, and inputs whose run was interrupted.
Vectors are never read here, only their id and uri columns.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.index.store import IndexStore, LogEntry
from pipeline.interrupt import run_interruptibly, run_to_end
from pipeline.options import JobConfig
from pipeline.runtime import is_local_runner
from transforms.records import FAILED
from transforms.sink import WriteErrors
from transforms.source import ReadImageRefs

NAMESPACE = "index"
KINDS = ("new", "updated", "unchanged", "retried", "removed", "to_embed")
PAIRS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("uri", pa.string())])


@dataclasses.dataclass(frozen=True)
class PlanCounts:
    new: int = 0  # ids not live after the last update
    updated: int = 0  # live ids whose uri changed
    unchanged: int = 0  # live ids with the same uri and a vector
    retried: int = 0  # live ids with the same uri and no vector yet (failed or interrupted before)
    removed: int = 0  # live ids no longer in the input
    to_embed: int = 0  # inputs without a committed vector for their (id, uri)
    refused: int = 0  # manifest rows that are no input (bad rows, repeated ids)


def read_pairs(task: tuple) -> Iterator[tuple]:
    """(seq, Parquet path) -> (id, (seq, uri)) for every row; only the two small columns are read."""
    import pyarrow.parquet as pq

    seq, path = task
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["id", "uri"], batch_size=65536):
            for id_, uri in zip(batch.column("id").to_pylist(), batch.column("uri").to_pylist()):
                yield id_, (seq, uri)


class _Classify(beam.DoFn):
    """Per id: live or removed, what kind of change, and whether it must be embedded."""

    def __init__(self):
        self._counters = {kind: Metrics.counter(NAMESPACE, kind) for kind in KINDS}

    def process(self, id_and_groups):
        id_, groups = id_and_groups
        inputs = list(groups["input"])
        previous = [uri for _, uri in groups["previous_live"]]
        if not inputs:
            if previous:
                self._counters["removed"].inc()
            return
        uri = inputs[0]
        yield beam.pvalue.TaggedOutput("live", {"id": id_, "uri": uri})
        embedded = any(vector_uri == uri for _, vector_uri in groups["vectors"])
        if not previous:
            kind = "new"
        elif previous[0] != uri:
            kind = "updated"
        else:
            kind = "unchanged" if embedded else "retried"
        self._counters[kind].inc()
        if not embedded:
            self._counters["to_embed"].inc()
            yield {"id": id_, "uri": uri}


def _write_pairs(prefix: str) -> beam.PTransform:
    return beam.io.WriteToParquet(prefix, PAIRS_SCHEMA, file_name_suffix=".parquet")


def plan_update(
    store: IndexStore, update: str, config: JobConfig, beam_args: Sequence[str], entries: Sequence[LogEntry]
) -> PlanCounts:
    """Writes updates/UPDATE/{live,todo,errors}-*.parquet and returns the counts."""
    folder = store.update_dir(update)
    last = store.latest_update(entries)
    live_files = [(0, path) for path in store.live_files(last)] if last else []
    vector_files = [(run.seq, path) for run in store.committed_runs(entries) for path in store.run_files(run)]
    options = PipelineOptions(list(beam_args))
    p = beam.Pipeline(options=options)
    inputs = p | "ReadInputs" >> ReadImageRefs(config.input, (), config.tfrecord_features)
    keyed = {
        "input": inputs["refs"] | "KeyInputs" >> beam.Map(lambda ref: (ref.id, ref.uri)),
        "previous_live": p | "LiveFiles" >> beam.Create(live_files) | "ReadLive" >> beam.FlatMap(read_pairs),
        "vectors": (p | "VectorFiles" >> beam.Create(vector_files) | "Spread" >> beam.Reshuffle()
                    | "ReadVectorIds" >> beam.FlatMap(read_pairs)),
    }
    plan = (keyed | "GroupById" >> beam.CoGroupByKey()
            | "Classify" >> beam.ParDo(_Classify()).with_outputs("live", main="todo"))
    _ = plan.live | "WriteLive" >> _write_pairs(FileSystems.join(folder, "live"))
    _ = plan.todo | "WriteTodo" >> _write_pairs(FileSystems.join(folder, "todo"))
    refused = inputs[FAILED] | "CountRefused" >> beam.Map(_count_refused)
    _ = refused | "WriteRefused" >> WriteErrors(folder)
    result, _ = run_interruptibly(lambda: run_to_end(p), local_workers=is_local_runner(options))
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals = {kind: 0 for kind in (*KINDS, "refused")}
    for metric in found:
        totals[metric.key.metric.name] += metric.committed if metric.committed is not None else metric.attempted
    return PlanCounts(**totals)


def _count_refused(failure):
    Metrics.counter(NAMESPACE, "refused").inc()
    return failure


def write_chunks(store: IndexStore, update: str, run_size: int) -> list[str]:
    """Splits the update's todo list into Parquet manifests of at most `run_size` rows, streaming."""
    import pyarrow.parquet as pq

    folder = store.update_dir(update)
    todo = store.parquet_files(folder, "todo")
    chunks, pending, pending_rows = [], [], 0

    def flush():
        nonlocal pending, pending_rows
        path = FileSystems.join(folder, "chunks", f"{len(chunks) + 1:05d}.parquet")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pq.write_table(pa.concat_tables(pending).combine_chunks(), f)
        chunks.append(path)
        pending, pending_rows = [], 0

    for path in todo:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=min(run_size, 65536)):
                table = pa.Table.from_batches([batch])
                while table.num_rows:
                    take = min(run_size - pending_rows, table.num_rows)
                    pending.append(table.slice(0, take))
                    pending_rows += take
                    table = table.slice(take)
                    if pending_rows == run_size:
                        flush()
    if pending_rows:
        flush()
    return chunks
