"""python -m pipeline.index create|update|status|snapshot|publish: an index of one model, kept current nightly.

    create   --index ROOT [--model M] [--model_handle H] [preprocessing options]     once
    update   --index ROOT --input MANIFEST_FOLDER_OR_GLOB [--run_size N] [--max_removed 0.5] [Beam options]
    status   --index ROOT [--json]
    snapshot --index ROOT --output DIR [--overwrite] [Beam options]
    publish  --index ROOT --to postgresql://...|lancedb://PATH|FOLDER [--table NAME] [--full]

`update` makes the index match the input with the model and preprocessing `create` recorded, in complete
runs of at most --run_size inputs; run it again after a crash and it resumes (finished runs are kept).
Exit codes: 0 done, 1 failed (store error, lease lost; run again), 2 refused before any change, 3 more
failures than --max_error_rate, 130 interrupted. See pipeline/index/store.py for the layout.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the seconds of imports below
    from pipeline.interrupt import while_starting

    while_starting()

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.index.lease import LeaseBusy, LeaseLost, live_holder
from pipeline.index.store import CommitRefused, IndexCorrupt, IndexRefused, IndexStore, now_iso
from pipeline.index.update import DEFAULT_MAX_REMOVED, RemovalLimit, update_index
from pipeline.index.view import WriteSnapshot, index_status
from pipeline.interrupt import INTERRUPTED, exit_with, started
from pipeline.metrics import CommandMetrics, add_metrics_options
from pipeline.models import CUSTOM_MODEL, MODELS
from pipeline.options import (
    build_parser,
    config_from_args,
    parse_known,
    positive_int,
    refuse_repeated,
    refuse_unknown_args,
)
from pipeline.outputs import RUN_REPORT, earlier_results, prepare_output_dir, summarize_outputs
from pipeline.preflight import metadata_differences, output_metadata
from pipeline.publish.state import PublishFailed, PublishRefused
from pipeline.publish.sync import DEFAULT_ANN_MIN_ROWS, DEFAULT_TABLE, target_for
from pipeline.publish.sync import publish as publish_view
from pipeline.report import software_versions
from pipeline.run import PREFLIGHT_ERRORS, JobFailed, check_workers_reach, choose_engine, run
from pipeline.runtime import configure_logging, is_local_runner
from pipeline.standin_models import STANDIN_WARNING
from pipeline.storage import StoreError, UnsupportedStore, write_bytes
from transforms.records import plural
from transforms.source import input_kind, plan_input

DEFAULT_RUN_SIZE = 10_000  # minutes of work per run on a laptop: a crash costs at most that
# Remote runners retry failed bundles themselves and pay minutes of start-up per job: a night is one job.
REMOTE_RUN_SIZE = 1_000_000
INDEX_HELP = "The index folder: local (or mounted) or gs://."


def _store(root: str) -> IndexStore:
    return IndexStore(root.rstrip("/") or "/")


def _not_an_index(store: IndexStore) -> IndexRefused:
    return IndexRefused(
        f"{store.root} is not an index (no index.json). Create it once with: python -m pipeline.index create "
        f"--index {store.root} --model MODEL [--model_handle HANDLE]; or check --index for a typo."
    )


# --- create ---------------------------------------------------------------------------------------------------

def create(argv: Sequence[str]) -> int:
    parser = build_parser("python -m pipeline.index create", "Create an empty index that records the model and "
                          "preprocessing every later update uses.", single_run=False, with_input=False)
    parser.add_argument("--index", required=True, help=INDEX_HELP + " Must not exist yet, or be empty.")
    args, beam_args = parse_known(parser, argv)
    config = config_from_args(parser, args)
    configure_logging(config.verbose)
    store = _store(args.index)
    existing = store.identity()
    if existing is not None:
        raise IndexRefused(f"{store.root} is already an index of {existing['model']}; keep it current with "
                           f"python -m pipeline.index update --index {store.root} --input ...")
    if not store.is_empty():
        raise IndexRefused(f"{store.root} holds files and is not an index; create the index in a new or empty folder.")
    # Settled as an update settles it (model checked, LiteRT compiled and verified where chosen): index.json's
    # engine is the one the updates with these options run, and the first update reuses the compiled model.
    config = dataclasses.replace(config, embed=choose_engine(config, PipelineOptions(beam_args),
                                                             MODELS.get(config.model.name)))
    store.objects.check_conditional_writes(store.root)
    identity = store.create_identity(output_metadata(config))
    print(f"Created index {store.root}: {identity['model']} ({identity['image_size']}x{identity['image_size']}, dim "
          f"{identity['dim']}), {identity['fingerprint']}, {identity['precision']}, engine {identity['engine']}.")
    if identity["weights"].startswith("STAND-IN"):
        print(f"Note: {identity['weights']}.")
    print(f"Next, every night: python -m pipeline.index update --index {store.root} --input MANIFEST_FOLDER_OR_GLOB")
    return 0


# --- update ---------------------------------------------------------------------------------------------------

def _update_parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m pipeline.index update", "Make the index at --index match --input: embed what "
                          "is new or changed, drop what left, retry what failed, with the model and preprocessing "
                          "recorded by create. Resumes after a crash.", single_run=False)
    parser.add_argument("--index", required=True, help=INDEX_HELP + " Made by python -m pipeline.index create.")
    parser.add_argument("--run_size", type=positive_int,
                        help="At most this many inputs per run (one Beam job each); a crash costs at most one run. "
                        f"Default: {DEFAULT_RUN_SIZE:,} on DirectRunner, {REMOTE_RUN_SIZE:,} on remote runners "
                        "(they retry failed work themselves, and each job pays its start-up).")
    parser.add_argument("--max_removed", type=RemovalLimit.parse, default=RemovalLimit.parse(DEFAULT_MAX_REMOVED),
                        metavar="SHARE_OR_COUNT",
                        help="Refuse (exit 2) an update that would take more of the ids with a vector out of the "
                        "view than this, whether they left the input or now fail: a share ('0.5', '50%%') or a count "
                        f"('1000'). Checked before any work for ids that left the input (nothing is changed), and "
                        f"again before the commit (the view stays as it was; finished runs are kept). Default: "
                        f"{DEFAULT_MAX_REMOVED}.")
    add_metrics_options(parser)
    return parser


def recorded_defaults(identity: dict) -> dict:
    """The option values an index was created with: an update repeats none of them."""
    preprocess = json.loads(identity.get("preprocess") or "{}")
    defaults = {"model": identity["model"], "model_handle": identity.get("handle"),
                "image_size": int(identity["image_size"]),
                "bfloat16": str(identity.get("precision", "")).startswith("bfloat16")}
    if identity["model"] == CUSTOM_MODEL:
        defaults["embedding_dim"] = int(identity["dim"])
    for option, field in (("resize_mode", "resize_mode"), ("max_image_pixels", "max_pixels"),
                          ("allow_truncated_images", "allow_truncated")):
        if field in preprocess:
            defaults[option] = preprocess[field]
    return defaults


def update(argv: Sequence[str]) -> int:
    return _with_metrics("index_update", argv, _update)


def _update(argv: Sequence[str], metrics: CommandMetrics) -> int:
    parser = _update_parser()
    index = _index_arg(argv)
    if index is None:
        parse_known(parser, argv)  # names what is missing (or mistyped), exit 2
    store = _store(index)
    identity = store.identity()
    if identity is None:
        raise _not_an_index(store)
    parser.set_defaults(**recorded_defaults(identity))
    args, beam_args = parse_known(parser, argv)
    if args.model != identity["model"]:
        raise IndexRefused(f"The index {store.root} holds vectors of {identity['model']} (index.json), not "
                           f"{args.model}; use another --index (made with create) for {args.model}.")
    config = config_from_args(parser, args)
    configure_logging(config.verbose)
    if input_kind(config.input) == "tfrecord":
        parser.error("an index is built from folders, globs and manifests; embed TFRecord files with pipeline.run.")
    found = plan_input(config.input)
    print(found.describe(config.input), flush=True)
    if not found.inputs:
        raise IndexRefused(f"--input {config.input} holds no {found.unit}: an update from it would remove every id "
                           f"of the index. Nothing was changed; check --input (a manifest not written yet?).")
    check_workers_reach(dataclasses.replace(config, output_dir=store.root), beam_args)
    config = dataclasses.replace(config, embed=choose_engine(config, PipelineOptions(beam_args),
                                                             MODELS.get(config.model.name)))
    differences = metadata_differences(identity, output_metadata(config))
    if differences:
        raise IndexRefused(
            f"The index {store.root} holds vectors of another model or preprocessing ({'; '.join(differences)}). "
            f"Use another --index for this model, or the model and options the index was made with."
        )
    run_size = args.run_size or (DEFAULT_RUN_SIZE if is_local_runner(PipelineOptions(beam_args)) else REMOTE_RUN_SIZE)
    outcome = update_index(store, config, beam_args, run_size, args.max_removed,
                           run=lambda chunk_config, chunk_args: run(chunk_config, chunk_args, announce=False),
                           say=lambda text: print(text, flush=True))
    counts, failed = outcome.counts, outcome.failed
    usable = counts.new + counts.updated + counts.unchanged + counts.retried
    print(f"Index {store.root} updated from {plural(usable + counts.refused, 'input row')}: {counts.new} new, "
          f"{counts.updated} updated, {counts.unchanged} unchanged, {counts.retried} retried, {counts.refused} "
          f"refused; {counts.removed} removed.")
    already = usable - counts.to_embed - counts.unchanged_failures
    print(f"  {outcome.embedded} embedded in {plural(outcome.runs, 'run')}, {already} already embedded, {failed} "
          f"failed{_for_good(outcome.failed_for_good, counts.unchanged_failures)}.")
    if identity.get("weights", "").startswith("STAND-IN"):
        print(f"WARNING: the index holds vectors of a {STANDIN_WARNING}.")
    if failed:
        print(f"Failures: {store.root}/runs/{outcome.name}-*/errors-*.parquet and "
              f"{store.root}/updates/{outcome.name}/errors-*.parquet; the next update tries them again.")
    inputs = counts.new + counts.updated + counts.unchanged + counts.retried + counts.refused
    metrics.set("inputs", "Input rows of the last update.", inputs)
    metrics.set("embedded", "Images embedded by the last update.", outcome.embedded)
    metrics.set("failed", "Inputs of the last update without a vector (they are tried again next time).", failed)
    metrics.set("live_ids", "Ids in the index's view after the last update.", usable)
    metrics.set("removed_ids", "Ids the last update took out of the view (they left the input).", counts.removed)
    if config.max_error_rate is not None and inputs and failed / inputs > config.max_error_rate:
        print(f"error: {failed} of {inputs} inputs failed, more than --max_error_rate {config.max_error_rate}.",
              file=sys.stderr)
        return 3
    return 0


def _for_good(failed_for_good: int, unchanged: int) -> str:
    if not failed_for_good:
        return ""
    return (f" ({failed_for_good} for good: bytes that do not decode, not read again until they change; "
            f"{unchanged} of them were not read tonight)")


def _index_arg(argv: Sequence[str]) -> Optional[str]:
    """--index's value, read before the full parse (its index.json supplies the other options' defaults)."""
    return _option(argv, "--index")


def _option(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of `flag` in `argv` (`--flag V` or `--flag=V`), read before a parse."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# --- status and snapshot --------------------------------------------------------------------------------------

def _running_update(store: IndexStore) -> Optional[str]:
    holder = live_holder(store.objects, store.path("locks"))
    return holder["update"] if holder else None


def status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.index status", description="Print an index's state.")
    parser.add_argument("--index", required=True, help=INDEX_HELP)
    parser.add_argument("--json", action="store_true", help="Print the state as one JSON object.")
    refuse_repeated(parser, argv)
    args = parser.parse_args(argv)
    store = _store(args.index)
    identity = store.identity()
    if identity is None:
        raise _not_an_index(store)
    state = index_status(store, _running_update(store))
    if args.json:
        print(json.dumps({"index": store.root, "model": identity, **dataclasses.asdict(state)}, indent=2))
        return 0
    print(f"Index {store.root}")
    print(f"  model: {identity['model']} ({identity['image_size']}x{identity['image_size']}, dim {identity['dim']}), "
          f"{identity['fingerprint']}, {identity['precision']}")
    if identity.get("weights", "").startswith("STAND-IN"):
        print(f"  weights: {identity['weights']}")
    print(f"  runs: {state.runs} from {plural(state.updates, 'update')}; last update: {state.last_update or 'none'}")
    print(f"  engine: {', then '.join(state.engines) if state.engines else identity.get('engine', 'unknown')}"
          f"{' (the runs)' if state.engines else ' (chosen at create; no run yet)'}")
    print(f"  live ids: {state.live_ids} ({state.embedded} embedded, {state.failed} failed)")
    if state.failed:
        print(f"  failed: {state.failed - state.failed_for_good} to be read again by the next update (a read that "
              f"failed, or bytes that changed), {state.failed_for_good} for good (bytes that do not decode: read "
              f"again only once their object changes)")
    print(f"  superseded vectors: {state.superseded_vectors}; removed ids: {state.removed_ids}")
    if state.running_update:
        print(f"  running now: update {state.running_update}")
    if state.unfinished_updates:
        print(f"  unfinished updates: {', '.join(state.unfinished_updates)} ({state.pending_vectors} vectors of "
              f"their finished runs are kept; the next update continues from them)")
    print(f"  unfinished leftovers: {', '.join(state.leftovers) or 'none'}"
          + (" (removed by the next update)" if state.leftovers else ""))
    return 0


def snapshot(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.index snapshot", allow_abbrev=False,
                                     description="Write the current view (the latest vector of every live id, "
                                     "once) as one dataset, with a run's schema and metadata.")
    parser.add_argument("--index", required=True, help=INDEX_HELP)
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier snapshot in --output.")
    refuse_repeated(parser, argv)
    args, beam_args = parser.parse_known_args(argv)
    refuse_unknown_args(parser, beam_args)
    configure_logging(False)
    store = _store(args.index)
    if store.identity() is None:
        raise _not_an_index(store)
    entries = store.log()
    output = args.output.rstrip("/")
    replaced = earlier_results(output, args.overwrite)
    view = WriteSnapshot(store, entries, output)
    prepare_output_dir(output, replaced)
    started = now_iso()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = p | "Snapshot" >> view
    summary = summarize_outputs(output)
    report = {"kind": "snapshot", "index": store.root, "log_entries": len(entries), "started_at": started,
              "finished_at": now_iso(), "counts": {"embedded": summary.embedded}, "versions": software_versions()}
    write_bytes(FileSystems.join(output, RUN_REPORT), json.dumps(report, indent=2).encode())
    print(f"Snapshot of {store.root}: {plural(summary.embedded, 'vector')} in {output}/embeddings-*.parquet")
    return 0


def publish(argv: Sequence[str]) -> int:
    return _with_metrics("publish", argv, _publish)


def _publish(argv: Sequence[str], metrics: CommandMetrics) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.index publish", allow_abbrev=False,
                                     description="Make a database table equal to the index's current view: write "
                                     "what changed since the last publish, delete what left.")
    parser.add_argument("--index", required=True, help=INDEX_HELP)
    parser.add_argument("--to", required=True, metavar="URL",
                        help="postgresql://USER@HOST[:PORT]/DATABASE (pgvector; the password from PGPASSWORD or "
                        "~/.pgpass rather than the URL, which process lists show), or a LanceDB database: "
                        "lancedb://PATH, gs://BUCKET/PATH or a local folder.")
    parser.add_argument("--table", default=DEFAULT_TABLE, help="Table name (default: %(default)s); PostgreSQL "
                        "takes a lower-case name or schema.name.")
    parser.add_argument("--full", action="store_true", help="Rewrite the table from the whole view (after it was "
                        "changed by something else); readers keep the old rows until it commits.")
    parser.add_argument("--ann_min_rows", type=positive_int, default=DEFAULT_ANN_MIN_ROWS, metavar="N",
                        help="LanceDB: build the IVF-PQ index once the table holds N rows (default: %(default)s); "
                        "PostgreSQL gets its HNSW index at the first publish.")
    add_metrics_options(parser)
    refuse_repeated(parser, argv)
    args = parser.parse_args(argv)
    configure_logging(False)
    if args.to.removeprefix("lancedb://").rstrip("/") == args.index.rstrip("/"):
        raise IndexRefused(f"--to {args.to} is the index itself; publish to a LanceDB folder of its own.")
    target = target_for(args.to, args.table, args.ann_min_rows)
    try:
        done = publish_view(_store(args.index), target, full=args.full)
    finally:
        target.close()
    state = done.state
    if done.unchanged:
        print(f"{done.target} already holds the view of {args.index} after log entry {state.seq} "
              f"({plural(state.rows, 'row')}); nothing to write.")
    else:
        print(f"Published {args.index} to {done.target}: {done.upserted} written, {done.removed} removed; "
              f"{plural(state.rows, 'row')}, the view after log entry {state.seq}.")
    if done.ann_index:
        print(f"  {done.ann_index}.")
    if str(state.metadata.get("weights", "")).startswith("STAND-IN"):
        print(f"WARNING: {done.target} holds vectors of a {STANDIN_WARNING}.")
    metrics.set("published_rows", "Rows of the published table after the last publish.", state.rows)
    metrics.set("written_rows", "Rows the last publish wrote (new or changed vectors).", done.upserted)
    metrics.set("deleted_rows", "Rows the last publish deleted (ids that left the view).", done.removed)
    return 0


REFUSED = (*PREFLIGHT_ERRORS, IndexRefused, LeaseBusy, UnsupportedStore, PublishRefused)  # exit 2: do not retry
FAILED = (StoreError, IndexCorrupt, LeaseLost, CommitRefused, PublishFailed, JobFailed)  # exit 1: retry


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, REFUSED):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, SystemExit):  # argparse: a usage error
        return exc.code if isinstance(exc.code, int) else 2
    return 1


def _with_metrics(command: str, argv: Sequence[str], work) -> int:
    """work(argv, metrics), its metrics written whatever its outcome (an error becomes its exit status here)."""
    metrics = CommandMetrics(command, _option(argv, "--metrics_file"), _option(argv, "--pushgateway"))
    try:
        code = work(argv, metrics)
    except BaseException as exc:
        code = _exit_status(exc)
        metrics.finish(code)
        raise
    metrics.finish(code)
    return code


COMMANDS = {"create": create, "update": update, "status": status, "snapshot": snapshot, "publish": publish}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (*REFUSED, *FAILED) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit_status(exc)
    except KeyboardInterrupt:
        print(f"Interrupted: {argv[0]} stopped; what it had committed is kept and its unfinished run removed. Run "
              f"the same command again to continue.", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    started()
    exit_with(main())
