"""What every inference engine shares (TensorFlow in embed.py, LiteRT in litert_engine.py): the errors a model
call raises, the check of its output, and keeping native libraries' start-up chatter off stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

# Set (by `--verbose`) to keep TensorFlow's start-up messages; inherited by local worker processes.
VERBOSE_ENV = "BEAM_EMBEDDINGS_VERBOSE"


_mute_lock = threading.Lock()
_mute = {"depth": 0, "saved": None}


@contextlib.contextmanager
def native_stderr_muted():
    """Silences what native libraries write straight to file descriptor 2, unless VERBOSE_ENV is set.

    TensorFlow prints CUDA probing errors and oneDNN notices on CPU machines at import, and LiteRT an
    INFO line per interpreter, before any log level applies; they say nothing about the run. Python
    exceptions still carry their messages. Threads may nest: the first one in mutes, the last one out
    restores.
    """
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    with _mute_lock:
        if _mute["depth"] == 0:
            sys.stderr.flush()
            _mute["saved"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _mute["depth"] += 1
    try:
        yield
    finally:
        with _mute_lock:
            _mute["depth"] -= 1
            if _mute["depth"] == 0:
                os.dup2(_mute["saved"], 2)
                os.close(_mute["saved"])


class ModelOutputError(RuntimeError):
    """The model's output does not match its declared dim: a configuration error, not a data error."""


class ModelEnvironmentError(RuntimeError):
    """The machine failed the model call (out of device memory, an internal runtime fault), not the images.

    Re-raised so that the runner retries the bundle, possibly elsewhere, instead of reporting every
    image of the batch as bad.
    """


def check_output(vectors: np.ndarray, images: int, dim: int, what: str) -> None:
    """Raises ModelOutputError unless `vectors` is [images, dim]."""
    if vectors.ndim != 2 or vectors.shape != (images, dim):
        error = ModelOutputError(f"{what} returned shape {list(vectors.shape)} for {images} image"
                                 f"{'' if images == 1 else 's'}; expected [{images}, {dim}] (declared dim {dim}).")
        error.returned = tuple(vectors.shape)
        raise error
