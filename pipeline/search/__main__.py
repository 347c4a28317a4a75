"""python -m pipeline.search build|query|duplicates: search what the pipeline embedded.

    build      (--embeddings 'OUT/embeddings-*.parquet' | --index ROOT) --output INDEX_DIR
               [--kind auto|exact|ann|compressed] [--max_memory SIZE] [Beam options: --runner ...]
    update     --index ROOT --output INDEX_DIR [--retrain auto|never|always] [--max_memory SIZE]
    query      --index INDEX_DIR (--image PATH_OR_URI ... | --id ID ...) [-k 10] [--output F.parquet|F.json]
               [--contact_sheet F.png]
    duplicates --index INDEX_DIR --output DUPS.parquet [--threshold T] [--contact_sheet F.png]

With Beam options (--runner DirectRunner --direct_num_workers 2, --runner FlinkRunner ..., --runner
DataflowRunner ...), build reads and adds the vectors in Beam jobs, a shard per embeddings file, and this process
trains and merges: the same index as without them.

Similarity is cosine similarity (the inner product of L2-normalised vectors). Exit status: 0 done,
1 done but some queries could not be answered (each is named), 2 refused before any work.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the seconds of imports below
    from pipeline.interrupt import while_starting

    while_starting()

import argparse
import sys
import time
from typing import Optional, Sequence

from pipeline.index.store import IndexCorrupt
from pipeline.interrupt import INTERRUPTED, exit_with, started
from pipeline.models import duplicate_threshold
from pipeline.options import refuse_repeated, refuse_unknown_args
from pipeline.runtime import configure_logging
from pipeline.search.collection import CollectionError, from_files, from_index
from pipeline.search.contact_sheet import draw_contact_sheet, group_rows, query_rows
from pipeline.search.store import SearchIndexError, build_search_index, open_search_index, write_parquet
from pipeline.search.update import RETRAINS
from pipeline.search.vector_index import KINDS, MemoryBudgetError, SearchDependencyError, human, parse_size
from transforms.records import plural

HIT_FORMATS = (".parquet", ".json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="Build a search index from embeddings.")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="Embeddings files: a run's or snapshot's 'OUT/embeddings-*.parquet'.")
    source.add_argument("--index", help="An index ROOT of python -m pipeline.index: its current view.")
    build.add_argument("--output", required=True, help="The search index folder to write (local or gs://).")
    build.add_argument("--kind", choices=KINDS, default="auto",
                       help="exact: compare with every vector; ann: inverted lists of full vectors, tuned for "
                            "recall@10 >= 0.97 on the collection's own vectors; compressed: inverted lists of "
                            "product-quantized codes, re-ranked with the exact vectors kept on disk; auto "
                            "(default): exact below 100,000 vectors, else ann, else (over --max_memory) compressed.")
    build.add_argument("--max_memory", type=parse_size, metavar="SIZE",
                       help="Memory the build and a loaded index may use (4GB, 500MB): auto picks the kind that "
                            "fits; a kind that cannot fit is refused before any work.")
    build.add_argument("--overwrite", action="store_true", help="Replace a search index already at --output.")

    update = commands.add_parser("update", help="Bring a search index built with --index ROOT to ROOT's current "
                                                 "view, in proportion to what changed.")
    update.add_argument("--index", required=True, help="The index ROOT the search index was built from.")
    update.add_argument("--output", required=True, help="The search index folder to update (local or gs://).")
    update.add_argument("--retrain", choices=RETRAINS, default="auto",
                        help="When the quantizer no longer fits (vectors added since training over half the "
                             "collection trained on, or held-out recall@10 down 0.02 after re-tuning): auto "
                             "(default) rebuilds; never refuses with exit 2, the old build still served; always "
                             "rebuilds every time.")
    update.add_argument("--max_memory", type=parse_size, metavar="SIZE",
                        help="Memory a rebuild may use (default: the budget the build recorded).")

    query = commands.add_parser("query", help="Nearest neighbours of images or indexed ids.")
    query.add_argument("--index", required=True, help="A search index folder (from search build).")
    asked = query.add_mutually_exclusive_group(required=True)
    asked.add_argument("--image", nargs="+", action="extend", metavar="PATH_OR_URI",
                       help="Images to embed with the index's model (repeat the flag or list several).")
    asked.add_argument("--id", nargs="+", action="extend", metavar="ID",
                       help="Ids already in the index (repeat the flag or list several).")
    query.add_argument("-k", type=int, default=10, help="Neighbours per query (default: %(default)s).")
    query.add_argument("--output", help="Write the hits to FILE.parquet or FILE.json (one row per hit).")
    query.add_argument("--contact_sheet", metavar="FILE.png", help="Draw each query and its hits as a row.")
    query.add_argument("--model_handle", help="A copy of the index's model (e.g. a local mirror); must be the "
                                              "same model, checked by fingerprint.")

    dups = commands.add_parser("duplicates", help="Groups of near-duplicate and identical images.")
    dups.add_argument("--index", required=True, help="A search index folder (from search build).")
    dups.add_argument("--output", required=True, help="DUPS.parquet: group, id, uri, similarity, same_bytes, sha256.")
    dups.add_argument("--threshold", type=float,
                      help="Cosine similarity at or above which two images are near-duplicates (default: the "
                           "model's, from the registry).")
    dups.add_argument("--contact_sheet", metavar="FILE.png", help="Draw each group as a row.")
    for command in (build, update, query, dups):
        command.add_argument("--verbose", action="store_true", help="Show every library's log messages.")
    return parser


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


STANDIN_SEARCH_WARNING = "this index holds vectors of a random-weight stand-in model: similarities are NOT meaningful."


def _standin_warning(index) -> Optional[str]:
    return STANDIN_SEARCH_WARNING if index.model.get("weights", "").startswith("STAND-IN") else None


def _open(root: str):
    """The search index at `root`, with a warning when its vectors come from a random-weight stand-in."""
    index = open_search_index(root)
    if _standin_warning(index):
        _say(f"WARNING: {STANDIN_SEARCH_WARNING}")
    return index


def build(args, beam_args: list) -> int:
    started = time.perf_counter()
    collection = from_index(args.index) if args.index else from_files(args.embeddings)
    _say(f"Indexing {plural(collection.count, 'vector')} of {collection.metadata.get('model')} "
         f"(dim {collection.dim}) from {collection.described} ...")
    if beam_args:
        from pipeline.search.distributed import build_across_workers

        manifest = build_across_workers(collection, args.output, args.kind, args.overwrite, _say, beam_args,
                                        args.max_memory)
    else:
        manifest = build_search_index(collection, args.output, args.kind, args.overwrite, _say, args.max_memory)
    index = manifest["index"]
    detail = "" if index["kind"] == "exact" else (f", {index['lists']} lists, {index['nprobe']} probed, "
                                                  f"recall@10 {index['tuned_recall_at_10']} on the tuning queries"
                                                  + (f", {index['held_out_recall_at_10']} held out"
                                                     if "held_out_recall_at_10" in index else ""))
    if index["kind"] == "compressed":
        detail += f", {index['code_bytes']} bytes a vector, {index['rerank_depth']}x re-ranked from disk"
    detail += f", {human(index['memory_bytes'])} in memory"
    _say(f"Search index of {plural(manifest['count'], 'vector')} written to {args.output}: {index['kind']} search"
         f"{detail}, {manifest['metric']} ({time.perf_counter() - started:.1f} s).")
    if str(collection.metadata.get("weights", "")).startswith("STAND-IN"):
        _say(f"WARNING: {STANDIN_SEARCH_WARNING}")
    return 0


def update(args) -> int:
    from pipeline.search.update import update_search_index

    started = time.perf_counter()
    done = update_search_index(args.output, args.index, args.retrain, _say, args.max_memory)
    index = done.manifest["index"]
    took = f"({time.perf_counter() - started:.1f} s)"
    if done.action == "up to date":
        _say(f"Search index {args.output} is up to date with {args.index}: {plural(done.count, 'vector')} {took}.")
        return 0
    recall = (f"; recall@10 {index['held_out_recall_at_10']} on {index['held_out_queries']} held-out vectors "
              f"against exact search, {index['nprobe']} of {index['lists']} lists probed"
              if "held_out_recall_at_10" in index else "")
    why = f" ({done.reason})" if done.reason else ""
    _say(f"Search index {args.output} {done.action}{why}: {plural(done.added, 'vector')} added "
         f"({done.changed} of them changed ids), {plural(done.removed, 'id')} removed; "
         f"{plural(done.count, 'vector')} now{recall} {took}.")
    return 0


def _print_hits(hits) -> None:
    query = None
    for hit in hits:
        if hit.query != query:
            query = hit.query
            print(f"query {query}")
        print(f"  {hit.rank:3d}  {hit.similarity:.4f}  {hit.id}  {hit.uri or ''}")


def query(args, parser) -> int:
    from pipeline.search.query import QueryRefused, query_by_ids, query_by_images, write_hits

    if args.k < 1:
        parser.error("-k must be at least 1.")
    if args.output and not args.output.endswith(HIT_FORMATS):
        parser.error(f"--output {args.output}: name a .parquet or .json file.")
    index = _open(args.index)
    try:
        if args.image:
            hits, failures = query_by_images(index, args.image, args.k, args.model_handle)
        else:
            hits, failures = query_by_ids(index, args.id, args.k)
    except QueryRefused as exc:
        _say(f"error: {exc}")
        return 2
    _print_hits(hits)
    for query_, reason in failures:
        _say(f"Not queried: {query_}: {reason}")
    if args.output:
        write_hits(hits, args.output)
        _say(f"{plural(len(hits), 'hit')} written to {args.output}.")
    if args.contact_sheet:
        rows = query_rows(list(dict.fromkeys(args.image or args.id)), hits, failures, bool(args.image))
        draw_contact_sheet(rows, args.contact_sheet, warning=_standin_warning(index))
        _say(f"Contact sheet of {plural(len(rows), 'row')} written to {args.contact_sheet}.")
    return 1 if failures else 0


def duplicates(args, parser) -> int:
    from pipeline.search.duplicates import byte_identical_copies, duplicate_groups

    if not args.output.endswith(".parquet"):
        parser.error(f"--output {args.output}: name a .parquet file.")
    index = _open(args.index)
    threshold = args.threshold if args.threshold is not None else duplicate_threshold(index.model.get("model"))
    if not -1.0 <= threshold <= 1.0:
        parser.error(f"--threshold {threshold}: cosine similarity lies between -1 and 1.")
    groups = duplicate_groups(index, threshold)
    write_parquet(groups, args.output)
    rows = group_rows(groups)
    identical = byte_identical_copies(groups)
    _say(f"{plural(len(rows), 'group')} of near-duplicates ({plural(groups.num_rows, 'image')}; {identical} of "
         f"them byte-identical copies) at cosine similarity >= {threshold} written to {args.output}.")
    if args.contact_sheet:
        draw_contact_sheet(rows, args.contact_sheet, warning=_standin_warning(index))
        _say(f"Contact sheet of {plural(len(rows), 'group')} written to {args.contact_sheet}.")
    return 0


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def main(argv: Sequence[str] = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_repeated(parser, argv)
    args, beam_args = parser.parse_known_args(argv)
    command = _subcommand(parser, args.command)
    if beam_args and args.command != "build":
        refuse_unknown_args(command, beam_args)
        command.error(f"Beam options ({beam_args[0]}) apply only to search build, which runs its passes over the "
                      f"vectors as Beam jobs when given them.")
    refuse_unknown_args(command, beam_args)
    configure_logging(args.verbose)
    try:
        if args.command == "build":
            return build(args, beam_args)
        if args.command == "update":
            return update(args)
        if args.command == "query":
            return query(args, parser)
        return duplicates(args, parser)
    except (CollectionError, SearchIndexError, SearchDependencyError, MemoryBudgetError, IndexCorrupt) as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        if args.command in ("build", "update"):
            _say(f"Interrupted: {args.output} is as it was (a build or update is served only once it is whole); "
                 f"its files were removed. Run the same command again.")
        else:
            _say("Interrupted.")
        return INTERRUPTED


if __name__ == "__main__":
    started()
    exit_with(main())
