"""A model's identity by content: the same SavedModel at another path, URL or bucket has the same fingerprint.

SHA-256 over the files that define the model (saved_model.pb / .pbtxt, variables/, assets/), each by its
path relative to the model folder, its size and its bytes. Marker files beside them (a stand-in's
standin.json, TF's derived fingerprint.pb) do not count. A hub URL is fingerprinted from the folder
tensorflow_hub downloaded it to (TFHUB_CACHE_DIR), so a hub handle and its mirror agree.
"""

from __future__ import annotations

import functools
import hashlib

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.models import is_remote_hub_handle

_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_MODEL_FOLDERS = ("variables/", "assets/")
_CHUNK = 1 << 22


def model_folder(handle: str) -> str:
    """The folder holding the SavedModel: a hub URL is downloaded and unpacked by tensorflow_hub first."""
    if is_remote_hub_handle(handle):
        from transforms.embed import import_tensorflow

        import_tensorflow()
        import tensorflow_hub as hub

        return hub.resolve(handle)
    return handle.rstrip("/")


@functools.lru_cache(maxsize=8)
def model_fingerprint(handle: str) -> str:
    """'sha256:<hex>' of the model's defining files; raises ValueError when `handle` holds no SavedModel."""
    folder = model_folder(handle).rstrip("/")
    prefix = folder + "/"
    matched = FileSystems.match([FileSystems.join(folder, "**")])[0].metadata_list
    files = sorted(
        (m.path[len(prefix):], m.size_in_bytes, m.path)
        for m in matched
        if m.path.startswith(prefix)
        and (m.path[len(prefix):] in _MODEL_FILES or m.path[len(prefix):].startswith(_MODEL_FOLDERS))
    )
    if not any(relative in _MODEL_FILES for relative, _, _ in files):
        raise ValueError(f"{handle} holds no saved_model.pb, so its content cannot be fingerprinted.")
    digest = hashlib.sha256()
    for relative, size, path in files:
        digest.update(f"{relative}\0{size}\0".encode())
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
