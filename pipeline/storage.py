"""Storage: every write the project makes that must be whole or conditional, and the names it writes under.

On any filesystem Beam writes (local, gs://, s3://, ...):

    read_bytes(path)            one object's bytes
    write_bytes(path, data)     one object, whole (an object store's upload is atomic; locally a temp file
                                renamed into place, so a reader or a crash never sees half of it)
    upload(local, path)         a local file to `path`, the same way; download(path, local) the other way
    timestamped_name()          a sortable, unique name for a generation of files (UTC time + random suffix)

Beam's FileSystems has no create-if-absent, no compare-and-swap and listings that may hide errors (a local
glob skips folders it cannot read). The index's commit log, identity and lease, and a search index's manifest,
go through `objects_for(root)`:

    read(path)                  -> Version (bytes, generation, the store's time of the write) or None if not found
    create(path, data)          -> Version; Conflict when the object exists    (GCS ifGenerationMatch=0; local link)
    replace(path, data, gen)    -> Version; Conflict when it changed since gen (GCS ifGenerationMatch; local flock)
    delete(path, gen)           -> Conflict when it changed since gen
    store_time(folder)          -> now, by the store's clock (a probe's write time), never this host's clock
    children(folder), files(folder): honest listings: only "not found" is empty, every other error is raised

Supported roots: local (or mounted) folders and gs://. Other schemes are refused: without a conditional
create, two writers could both commit the same log entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import os
import shutil
import uuid
from typing import BinaryIO, Iterator, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

COPY_BLOCK = 64 << 20


def timestamped_name() -> str:
    """A name that sorts by creation time (to the second, UTC); 24 random bits tell apart writers in one second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _write_temporary(folder: str, fill) -> str:
    """Calls `fill(file)` on a fresh temporary file in the local `folder` and syncs it to disk; returns its path.
    The name starts with a dot, so listings and dataset readers skip it."""
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return temporary


def _write_stream(path: str, fill) -> None:
    """Calls `fill(file)` to write `path` whole: locally into a temporary file beside it, then renamed; elsewhere
    into the store's own upload, which makes the object visible only once it is complete."""
    if _is_local(path):
        path = os.path.abspath(_local_path(path))
        os.replace(_write_temporary(os.path.dirname(path), fill), path)
        return
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        fill(f)


def read_bytes(path: str) -> bytes:
    """The whole object at `path`, on any filesystem Beam reads."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """`data` as the whole object at `path`, replacing any earlier one; a reader sees the old one or this one."""
    _write_stream(path, lambda f: f.write(data))


def upload(local: str, path: str) -> None:
    """The local file `local` as the whole object at `path`."""
    with open(local, "rb") as source:
        _write_stream(path, lambda f: shutil.copyfileobj(source, f, COPY_BLOCK))


def download(path: str, local: str) -> None:
    """The object at `path` as the local file `local`, which appears only once complete."""
    def copy(out: BinaryIO) -> None:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as source:
            shutil.copyfileobj(source, out, COPY_BLOCK)

    _write_stream(local, copy)


class Conflict(Exception):
    """The object exists (create) or changed since the generation given (replace, delete)."""


class UnsupportedStore(ValueError):
    """A root on a store without conditional writes."""


class StoreError(RuntimeError):
    """The store failed an operation (refused, unreachable); the message names it. Never taken for "empty"."""


def _reported(operation: str):
    """Turns any failure but Conflict into a StoreError naming the operation and the path."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, path, *args):
            try:
                return method(self, path, *args)
            except (Conflict, StoreError):
                raise
            except Exception as exc:
                detail = " ".join(str(exc).split())[:300]
                raise StoreError(f"{operation} {path} failed ({type(exc).__name__}: {detail}).") from exc
        return call
    return wrap


@dataclasses.dataclass(frozen=True)
class Version:
    data: bytes
    generation: str  # changes with every write; the token of compare-and-swap
    written_at: float  # seconds since the epoch, by the store's clock


def objects_for(root: str) -> "LocalObjects | GcsObjects":
    if root.startswith("gs://"):
        return GcsObjects()
    if "://" in root:
        raise UnsupportedStore(
            f"An index needs a store with conditional writes (create-if-absent, compare-and-swap): local or "
            f"mounted folders and gs://. {root.split('://', 1)[0]}:// is not supported; keep the index on gs:// "
            f"or a local disk (the inputs it embeds may live anywhere)."
        )
    return LocalObjects()


class LocalObjects:
    """A local or mounted folder. Generations are inode + mtime: every write makes a new file."""

    @staticmethod
    def _version(fd: int, data: bytes) -> Version:
        info = os.fstat(fd)
        return Version(data, f"{info.st_ino}-{info.st_mtime_ns}", info.st_mtime_ns / 1e9)

    @_reported("Reading")
    def read(self, path: str) -> Optional[Version]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return self._version(f.fileno(), f.read())

    def _write_new(self, path: str, data: bytes) -> str:
        """Writes `data` completely under a fresh name beside `path`; returns that name."""
        return _write_temporary(os.path.dirname(path), lambda f: f.write(data))

    @_reported("Writing")
    def create(self, path: str, data: bytes) -> Version:
        temporary = self._write_new(path, data)
        try:
            os.link(temporary, path)  # atomic, and fails when the name exists: nobody sees half a file
        except FileExistsError:
            raise Conflict(path) from None
        finally:
            os.unlink(temporary)
        return self.read(path)

    def check_conditional_writes(self, folder: str) -> None:
        """Refuses a folder whose filesystem cannot create-if-absent (hard links) or lock (flock), before an index
        is created there. gcsfuse and s3fs refuse hard links: every commit would fail, or worse, without them."""
        os.makedirs(folder, exist_ok=True)
        probe = self._write_new(os.path.join(folder, ".probe"), b"")
        linked = f"{probe}-linked"
        try:
            os.link(probe, linked)
            os.unlink(linked)
            with self._exclusive(probe):
                pass
        except OSError as exc:
            raise UnsupportedStore(
                f"{folder} is on a filesystem that refuses hard links or file locks ({exc.strerror}), which the "
                f"index's conditional writes need; gcsfuse and s3fs mounts are such filesystems. Keep the index on "
                f"gs:// directly or on a local or NFS disk (the inputs it embeds may live anywhere)."
            ) from None
        finally:
            for leftover in (probe, linked, self._lock_path(probe)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    @staticmethod
    def _lock_path(path: str) -> str:
        return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")

    @contextlib.contextmanager
    def _exclusive(self, path: str) -> Iterator[None]:
        """Compare-and-swap of `path` among processes: a kernel lock (released on death) on a lock file beside it,
        opened for writing, which NFS needs for an exclusive flock (man 2 flock). Listings skip dotfiles."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        guard = os.open(self._lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield
        finally:
            os.close(guard)

    @_reported("Writing")
    def replace(self, path: str, data: bytes, generation: str) -> Version:
        with self._exclusive(path):
            current = self.read(path)
            if current is None or current.generation != generation:
                raise Conflict(path)
            os.replace(self._write_new(path, data), path)
            return self.read(path)

    @_reported("Deleting")
    def delete(self, path: str, generation: str) -> None:
        with self._exclusive(path):
            current = self.read(path)
            if current is None or current.generation != generation:
                raise Conflict(path)
            os.unlink(path)

    @_reported("Writing a clock probe in")
    def store_time(self, folder: str) -> float:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".clock-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            written = os.fstat(f.fileno()).st_mtime_ns
        os.unlink(probe)
        return written / 1e9

    @_reported("Listing")
    def children(self, folder: str) -> list[str]:
        """Names of the folders directly in `folder` (empty folders included)."""
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    @_reported("Listing")
    def files(self, folder: str) -> list[str]:
        """Names of the files directly in `folder`, without temporary ones."""
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    @_reported("Listing")
    def is_empty(self, folder: str) -> bool:
        try:
            return not any(os.scandir(folder))
        except FileNotFoundError:
            return True

    @_reported("Deleting")
    def delete_tree(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)


def _split(path: str) -> tuple[str, str]:
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name


def _prefix(folder: str) -> tuple[str, str]:
    bucket, name = _split(folder.rstrip("/") + "/")
    return bucket, name


@functools.lru_cache(maxsize=2)
def _gcs_client(endpoint: Optional[str]):
    """The storage client Beam's own gs:// filesystem uses: the same credentials and project (one per endpoint,
    which STORAGE_EMULATOR_HOST can change)."""
    from apache_beam.io.gcp.gcsio import create_storage_client
    from apache_beam.options.pipeline_options import PipelineOptions

    return create_storage_client(PipelineOptions())


class GcsObjects:
    """gs://: generations and preconditions are GCS's own; times are the objects' `updated` (the store's clock).

    The client retries conditional requests; a retried write whose first attempt landed answers 412, so a
    Conflict is checked against what is there: our own bytes mean the write succeeded.
    """

    @property
    def _client(self):
        return _gcs_client(os.environ.get("STORAGE_EMULATOR_HOST"))

    def _blob(self, path: str):
        bucket, name = _split(path)
        return self._client.bucket(bucket).blob(name)

    @staticmethod
    def _version(blob, data: bytes) -> Version:
        return Version(data, str(blob.generation), blob.updated.timestamp())

    def check_conditional_writes(self, folder: str) -> None:
        """Always met: every write of an object takes a generation precondition."""

    @_reported("Reading")
    def read(self, path: str) -> Optional[Version]:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        bucket, name = _split(path)
        for _ in range(5):
            try:
                blob = self._client.bucket(bucket).get_blob(name)
                if blob is None:
                    return None
                data = blob.download_as_bytes(if_generation_match=blob.generation)
                return self._version(blob, data)
            except (NotFound, PreconditionFailed):  # replaced or deleted between metadata and media: read again
                continue
        raise Conflict(f"{path} kept changing while it was read")

    def _upload(self, path: str, data: bytes, generation: int) -> Version:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = self._blob(path)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except (PreconditionFailed, NotFound):
            current = self.read(path)
            if current is not None and current.data == data and current.generation != str(generation):
                return current  # a retry of our own write that had landed
            raise Conflict(path) from None
        return self._version(blob, data)

    @_reported("Writing")
    def create(self, path: str, data: bytes) -> Version:
        return self._upload(path, data, 0)

    @_reported("Writing")
    def replace(self, path: str, data: bytes, generation: str) -> Version:
        return self._upload(path, data, int(generation))

    @_reported("Deleting")
    def delete(self, path: str, generation: str) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self._blob(path).delete(if_generation_match=int(generation))
        except (PreconditionFailed, NotFound):
            raise Conflict(path) from None

    @_reported("Writing a clock probe in")
    def store_time(self, folder: str) -> float:
        path = f"{folder.rstrip('/')}/.clock-{uuid.uuid4().hex}"
        probe = self.create(path, b"")
        with contextlib.suppress(Exception):  # a probe left behind is harmless: listings skip dot files
            self.delete(path, probe.generation)
        return probe.written_at

    def _list(self, folder: str, delimiter: Optional[str]):
        bucket, prefix = _prefix(folder)
        pages = self._client.list_blobs(bucket, prefix=prefix, delimiter=delimiter)
        blobs = list(pages)  # consumes every page; an error on any page is raised, never taken for "empty"
        return prefix, blobs, pages.prefixes

    @_reported("Listing")
    def children(self, folder: str) -> list[str]:
        prefix, _, prefixes = self._list(folder, "/")
        return sorted(p[len(prefix):].rstrip("/") for p in prefixes)

    @_reported("Listing")
    def files(self, folder: str) -> list[str]:
        prefix, blobs, _ = self._list(folder, "/")
        return sorted(b.name[len(prefix):] for b in blobs if not b.name[len(prefix):].startswith("."))

    @_reported("Listing")
    def is_empty(self, folder: str) -> bool:
        bucket, prefix = _prefix(folder)
        return not list(self._client.list_blobs(bucket, prefix=prefix, max_results=1))

    @_reported("Deleting")
    def delete_tree(self, folder: str) -> None:
        from google.api_core.exceptions import NotFound

        _, blobs, _ = self._list(folder, None)
        for blob in blobs:
            with contextlib.suppress(NotFound):
                blob.delete()
