"""Mirror a model once to a place workers can read without the hub: a local folder or an object store.

    python -m pipeline.mirror HANDLE DEST

Copies every file of the SavedModel (a hub URL is downloaded and unpacked by tensorflow_hub first), then
checks that the copy has the source's content fingerprint and records it in DEST/mirror.json. Runs with
--model_handle DEST continue indexes made from HANDLE: both have the same fingerprint.
"""

from __future__ import annotations

import json

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.fingerprint import model_fingerprint, model_folder
from pipeline.storage import write_bytes

MIRROR_RECORD = "mirror.json"
_CHUNK = 1 << 22


def mirror_model(handle: str, destination: str) -> str:
    """Copies the model at `handle` to `destination`; returns the fingerprint both share."""
    source = model_folder(handle)
    expected = model_fingerprint(handle)
    destination = destination.rstrip("/")
    prefix = source.rstrip("/") + "/"
    files = [m.path for m in FileSystems.match([FileSystems.join(source, "**")])[0].metadata_list
             if m.path.startswith(prefix)]
    for path in files:
        target = FileSystems.join(destination, *path[len(prefix):].split("/"))
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as reader, \
                FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED) as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
    copied = model_fingerprint(destination)
    if copied != expected:
        raise RuntimeError(f"The copy at {destination} has fingerprint {copied}, the source {expected}: copy again.")
    write_bytes(FileSystems.join(destination, MIRROR_RECORD),
                json.dumps({"source": handle, "fingerprint": expected}, indent=2).encode("utf-8"))
    return expected


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.mirror",
                                     description="Copy a model once to a folder or bucket that workers can read.")
    parser.add_argument("handle", help="A hub URL, a gs:// path or a local SavedModel folder.")
    parser.add_argument("destination", help="A local folder or an object-store path (gs://BUCKET/models/NAME).")
    args = parser.parse_args(argv)
    fingerprint = mirror_model(args.handle, args.destination)
    print(f"Mirrored {args.handle} to {args.destination} ({fingerprint}). Pass --model_handle {args.destination}; "
          f"runs from it continue indexes made from {args.handle}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
