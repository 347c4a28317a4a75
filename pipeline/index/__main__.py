"""python -m pipeline.index update|status|snapshot: an index of one model that a scheduler keeps current.

    update   --input MANIFEST_FOLDER_OR_GLOB --index ROOT [--run_size N] [pipeline.run and Beam options]
    status   --index ROOT
    snapshot --index ROOT --output DIR [--overwrite] [Beam options]

`update` makes the index match the input, in complete runs of at most --run_size inputs; run it again
after a crash and it resumes (finished runs are kept). See pipeline/index/store.py for the layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.index.plan import plan_update, write_chunks
from pipeline.index.store import IndexRefused, IndexStore, new_name, now_iso
from pipeline.index.view import WriteSnapshot, index_status
from pipeline.models import MODELS
from pipeline.options import positive_int, build_parser, config_from_args, refuse_unknown_args
from pipeline.outputs import RUN_REPORT, earlier_results, prepare_output_dir, summarize_outputs
from pipeline.preflight import metadata_differences, output_metadata
from pipeline.report import software_versions
from pipeline.run import PREFLIGHT_ERRORS, choose_engine, run
from pipeline.runtime import configure_logging
from transforms.records import plural
from transforms.source import input_kind

DEFAULT_RUN_SIZE = 10_000  # minutes of work per run on a laptop: a crash costs at most that


def _update_parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m pipeline.index update", "Make the index at --index match --input: embed what is "
                          "new or changed, drop what left, retry what failed. Resumes after a crash.", single_run=False)
    parser.add_argument("--index", required=True, help="The index folder (local, gs://, ...); created on first use.")
    parser.add_argument("--run_size", type=positive_int, default=DEFAULT_RUN_SIZE,
                        help="At most this many inputs per run; a crash costs at most one run. Default: %(default)s.")
    return parser


def update(argv: Sequence[str]) -> int:
    parser = _update_parser()
    args, beam_args = parser.parse_known_args(argv)
    refuse_unknown_args(parser, beam_args)
    config = config_from_args(parser, args)
    configure_logging(config.verbose)
    store = IndexStore(args.index.rstrip("/"))
    if input_kind(config.input) == "tfrecord":
        parser.error("an index is built from folders, globs and manifests; embed TFRecord files with pipeline.run.")
    embed = choose_engine(config, PipelineOptions(beam_args), MODELS.get(config.model.name))
    config = dataclasses.replace(config, embed=embed)
    metadata = output_metadata(config)
    identity = store.identity()
    if identity is not None:
        differences = metadata_differences(identity, metadata)
        if differences:
            raise IndexRefused(
                f"The index {store.root} holds vectors of another model or preprocessing ({'; '.join(differences)}). "
                f"Use another --index for this model, or the model and options the index was made with."
            )
    with store.update_lock():
        if identity is None:
            store.create_identity(metadata)
        entries = store.log()
        for leftover in store.leftovers(entries):
            print(f"Removing {leftover}: left by an update that did not finish.")
            store.remove(leftover)
        name = new_name()
        counts = plan_update(store, name, config, beam_args, entries)
        chunks = write_chunks(store, name, args.run_size)
        print(f"Planned: {counts.new} new, {counts.updated} updated, {counts.unchanged} unchanged, {counts.removed} "
              f"removed, {counts.retried} retried; {plural(counts.to_embed, 'input')} to embed in "
              f"{plural(len(chunks), 'run')} of at most {args.run_size}.", flush=True)
        embedded, failed = 0, counts.refused
        for number, chunk in enumerate(chunks, start=1):
            run_name = f"{name}-{number:05d}"
            run_config = dataclasses.replace(config, input=chunk, output_dir=store.run_dir(run_name), overwrite=False,
                                             skip_existing=())
            print(f"Run {number}/{len(chunks)}: embedding {store.run_dir(run_name)} ...", flush=True)
            report = run(run_config, beam_args, announce=False)
            run_counts = report["counts"]
            store.append({"kind": "run", "run": run_name, "update": name, "embedded": run_counts["embedded"],
                          "errors": run_counts["errors"]})
            embedded += run_counts["embedded"]
            failed += run_counts["errors"]
            print(f"Run {number}/{len(chunks)} finished: {run_counts['embedded']} embedded, {run_counts['errors']} "
                  f"failed.", flush=True)
        store.append({"kind": "update", "update": name, "input": config.input,
                      "counts": {**dataclasses.asdict(counts), "embedded": embedded, "failed": failed}})
    print(f"Index {store.root} updated: {counts.new} new, {counts.updated} updated, {counts.removed} removed, "
          f"{counts.unchanged} unchanged, {failed} failed ({embedded} embedded in {plural(len(chunks), 'run')}).")
    if failed:
        print(f"Failures: {store.root}/runs/{name}-*/errors-*.parquet and {store.root}/updates/{name}/errors-*.parquet; "
              f"the next update tries them again.")
    inputs = counts.new + counts.updated + counts.unchanged + counts.retried + counts.refused
    if config.max_error_rate is not None and inputs and failed / inputs > config.max_error_rate:
        print(f"error: {failed} of {inputs} inputs failed, more than --max_error_rate {config.max_error_rate}.",
              file=sys.stderr)
        return 3
    return 0


def status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.index status", description="Print an index's state.")
    parser.add_argument("--index", required=True)
    parser.add_argument("--json", action="store_true", help="Print the state as one JSON object.")
    args = parser.parse_args(argv)
    store = IndexStore(args.index.rstrip("/"))
    identity = store.identity()
    if identity is None:
        raise IndexRefused(f"{store.root} is not an index (no index.json); create one with python -m pipeline.index "
                           f"update --input ... --index {store.root}.")
    state = index_status(store)
    if args.json:
        print(json.dumps({"index": store.root, "model": identity, **dataclasses.asdict(state)}, indent=2))
        return 0
    print(f"Index {store.root}")
    print(f"  model: {identity['model']} ({identity['image_size']}x{identity['image_size']}, dim {identity['dim']}), "
          f"{identity['fingerprint']}, {identity['precision']}")
    print(f"  runs: {state.runs} from {plural(state.updates, 'update')}; last update: {state.last_update or 'none'}")
    print(f"  live ids: {state.live_ids} ({state.embedded} embedded, {state.failed} failed)")
    print(f"  superseded vectors: {state.superseded_vectors}; removed ids: {state.removed_ids}")
    print(f"  unfinished leftovers: {', '.join(state.leftovers) or 'none'}"
          + (" (removed by the next update)" if state.leftovers else ""))
    return 0


def snapshot(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.index snapshot", allow_abbrev=False,
                                     description="Write the current view (the latest vector of every live id, "
                                     "once) as one dataset, with a run's schema and metadata.")
    parser.add_argument("--index", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier snapshot in --output.")
    args, beam_args = parser.parse_known_args(argv)
    refuse_unknown_args(parser, beam_args)
    configure_logging(False)
    store = IndexStore(args.index.rstrip("/"))
    entries = store.log()
    if store.latest_update(entries) is None:
        raise IndexRefused(f"{store.root} has no finished update yet: nothing to snapshot.")
    output = args.output.rstrip("/")
    replaced = earlier_results(output, args.overwrite)
    prepare_output_dir(output, replaced)
    started = now_iso()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = p | "Snapshot" >> WriteSnapshot(store, entries, output)
    summary = summarize_outputs(output)
    report = {"kind": "snapshot", "index": store.root, "log_entries": len(entries), "started_at": started,
              "finished_at": now_iso(), "counts": {"embedded": summary.embedded}, "versions": software_versions()}
    with FileSystems.create(FileSystems.join(output, RUN_REPORT)) as f:
        f.write(json.dumps(report, indent=2).encode())
    print(f"Snapshot of {store.root}: {plural(summary.embedded, 'vector')} in {output}/embeddings-*.parquet")
    return 0


COMMANDS = {"update": update, "status": status, "snapshot": snapshot}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (*PREFLIGHT_ERRORS, IndexRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
