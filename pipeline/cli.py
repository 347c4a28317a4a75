"""image-embeddings: one console command for every job; `python -m pipeline.<command>` stays the same command.

    image-embeddings run ...       embed images into Parquet               (python -m pipeline.run)
    image-embeddings index ...     an index kept current night after night  (python -m pipeline.index)
    image-embeddings publish ...   the index's view into PostgreSQL/LanceDB (python -m pipeline.index publish)
    image-embeddings search ...    build, update and query a search index   (python -m pipeline.search)
    image-embeddings flink ...     a local Flink cluster to send jobs to    (python -m pipeline.flink)
    image-embeddings standin ...   a random-weight stand-in SavedModel      (python -m pipeline.standin_models)

`image-embeddings COMMAND --help` shows a command's options. Exit status: the command's own (0 done, 1 failed
and can be retried, 2 refused before any work: do not retry unchanged, 3 more inputs failed than
--max_error_rate, 130 interrupted).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Optional, Sequence

from pipeline.interrupt import exit_with, started, while_starting

COMMANDS = {  # command: (module with main(argv), arguments it starts with)
    "run": ("pipeline.run", ()),
    "index": ("pipeline.index.__main__", ()),
    "publish": ("pipeline.index.__main__", ("publish",)),
    "search": ("pipeline.search.__main__", ()),
    "flink": ("pipeline.flink.__main__", ()),
    "standin": ("pipeline.standin_models", ()),
}


def _command(argv: list):
    """The chosen command's main, ready to call (its module imported), or an exit status when there is none."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"image-embeddings: error: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)}; "
              f"image-embeddings --help)", file=sys.stderr)
        return 2
    module, first = COMMANDS[argv[0]]
    command = importlib.import_module(module).main
    return lambda: command([*first, *argv[1:]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    command = _command(list(sys.argv[1:] if argv is None else argv))
    if isinstance(command, int):
        return command
    code = command()
    return 0 if code is None else code


def console() -> None:
    """The console script, ending as `python -m pipeline.<command>` does: Ctrl-C while the command still imports
    Beam and TensorFlow says one line; then the command's own handling; an exit that cannot abort."""
    while_starting()
    try:
        command = _command(sys.argv[1:])
        if not isinstance(command, int):
            started()
            command = command()
        code = 0 if command is None else command
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code if isinstance(exc.code, int) else 2
    exit_with(code)


if __name__ == "__main__":
    console()
