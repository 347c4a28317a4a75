"""Reads the bytes a URI names: anything Beam's FileSystems read, plus http(s) with timeouts and retries."""

from __future__ import annotations

import dataclasses
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request

from transforms.records import TRANSIENT_ERRORS


class ReadError(OSError):
    """The URI's bytes could not be read; the message is the sentence reported to the user."""


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    max_bytes: int = 64 * 1024 * 1024
    http_timeout_s: float = 30.0
    http_retries: int = 3
    http_backoff_s: float = 0.5


def read_uri(uri: str, config: ReadConfig = ReadConfig()) -> bytes:
    """All bytes of `uri`, at most `config.max_bytes` (a larger object is an error, never truncated)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _read_http(uri, config)
    return _read_filesystem(uri, config)


def _read_filesystem(uri: str, config: ReadConfig) -> bytes:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        # UNCOMPRESSED: an image named *.gz is still read as its raw bytes, never inflated.
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(config.max_bytes + 1)
    except TRANSIENT_ERRORS:
        raise  # the runner retries the bundle
    except IsADirectoryError:
        raise ReadError(f"{uri} is a directory, not a file.") from None
    except FileNotFoundError:
        raise ReadError(f"{uri} does not exist.") from None
    except PermissionError:
        raise ReadError(f"Permission denied reading {uri}.") from None
    except OSError as exc:
        raise ReadError(f"Could not read {uri}: {' '.join(str(exc).split())}") from None
    _check_size(uri, len(data), config)
    return data


def _check_size(uri: str, size: int, config: ReadConfig) -> None:
    if size > config.max_bytes:
        raise ReadError(f"{uri} is larger than the {config.max_bytes}-byte limit (--max_image_bytes).")


def _read_http(uri: str, config: ReadConfig) -> bytes:
    """GET with connect/read timeouts; retries resets, timeouts and 5xx with backoff, never 4xx."""
    last_problem = ""
    for attempt in range(config.http_retries + 1):
        if attempt:
            time.sleep(config.http_backoff_s * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(uri, headers={"User-Agent": "beam-image-embeddings"})
            with urllib.request.urlopen(request, timeout=config.http_timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit():
                    _check_size(uri, int(declared), config)
                data = response.read(config.max_bytes + 1)
            _check_size(uri, len(data), config)
            return data
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise ReadError(f"HTTP {exc.code} {exc.reason} for {uri}.") from None
            last_problem = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            last_problem = f"{type(reason).__name__}: {reason}"
    raise ReadError(f"Could not fetch {uri} after {config.http_retries + 1} attempts; last: {last_problem}.")
