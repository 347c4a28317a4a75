"""The elements that flow between stages, and the failure record every stage can emit."""

from __future__ import annotations

import gc
from typing import Callable, NamedTuple, Optional, TypeVar, Union

import numpy as np

# Tag of the side output on which a stage emits the inputs it could not process.
FAILED = "failed"
# Attempts at one input that keeps running out of memory before it is reported instead of retried.
MEMORY_ATTEMPTS = 3
T = TypeVar("T")


class Stage:
    """Where an input failed; the `stage` column of errors-*.parquet."""

    MANIFEST = "manifest"  # unusable manifest row, or a duplicate id
    READ = "read"  # the bytes could not be fetched
    DECODE = "decode"  # the bytes are not a supported, sane image
    EMBED = "embed"  # the model failed on this image


class ImageRef(NamedTuple):
    """One input: an id (unique in the output) and the URI its bytes are read from.

    Inputs that carry their encoded bytes (TFRecord examples) have `data` set and are not read again.
    """

    id: str
    uri: str
    data: Optional[bytes] = None


class DecodedImage(NamedTuple):
    """Pixels ready for the model: uint8 [size, size, 3] RGB (compact; floats only inside the model)."""

    id: str
    uri: str
    pixels: np.ndarray
    sha256: Optional[str] = None  # hex digest of the encoded bytes: finds byte-identical inputs


class Failure(NamedTuple):
    """An input that was not embedded, with one readable sentence saying why."""

    id: str
    uri: str
    stage: str
    error: str
    # For a failure the bytes alone decide (they do not decode): the object's version then (settled_version);
    # an index does not read that (id, uri) again while its version stays the same.
    bytes_version: Optional[str] = None


def retry_out_of_memory(attempt: Callable[[], T], item, stage: str, doing: str) -> Union[T, "Failure"]:
    """`attempt()`, called again after a MemoryError (other inputs' memory may free up) up to MEMORY_ATTEMPTS
    times; then `item`'s Failure at `stage`, so that a deterministic blow-up costs one row, not the bundle.
    Every other exception is the caller's to classify."""
    for _ in range(MEMORY_ATTEMPTS):
        try:
            return attempt()
        except MemoryError:
            gc.collect()
    return Failure(item.id, item.uri, stage, f"Ran out of memory {doing} this image {MEMORY_ATTEMPTS} times.")


def describe_exception(exc: BaseException) -> str:
    """One readable line for an exception: its type and message, without a traceback."""
    message = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {message}"


def plural(count: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
