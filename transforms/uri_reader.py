"""Reads the bytes a URI names: local paths, file://, any filesystem Beam reads (gs://, s3://, ...), and http(s).

Every error is classified once, here:
- the input's own fault (missing, forbidden, not a file, too large, unsupported scheme): `ReadError` at once;
- transient (resets, timeouts, 5xx, 429, 408, throttling): retried within the step with exponential backoff,
  then `ReadError` saying it persisted, so the input is reported (and retried by the next run) instead of
  failing its bundle: Beam's local runners never retry a bundle, and a hosted runner gives up after four.
A systemic outage still shows: every input fails, and `--max_error_rate` turns that into exit code 3.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http.client
import os
import socket
import ssl
import time
import urllib.parse
from typing import Callable, Optional

# Schemes read through Beam's FileSystems; "" is a local path.
FILESYSTEM_SCHEMES = ("", "gs", "s3", "hdfs", "azfs")
HTTP_SCHEMES = ("http", "https")
_MAX_REDIRECTS = 5
_MAX_RETRY_AFTER_S = 60.0
_CHUNK = 1 << 16
# What Beam's FileSystems.match takes as a glob; it has no way to quote them, so a name holding one is read whole.
GLOB_CHARACTERS = "*?["

# google.api_core exception names (checked by name, so the gcp extra stays optional).
_NOT_FOUND = ("NotFound",)
_FORBIDDEN = ("Forbidden", "Unauthorized", "PermissionDenied")
_TRANSIENT_NAMES = (
    "ServiceUnavailable", "InternalServerError", "TooManyRequests", "BadGateway", "GatewayTimeout",
    "DeadlineExceeded", "RetryError", "TransportError", "ChunkedEncodingError", "ConnectTimeout", "ReadTimeout",
)


class ReadError(OSError):
    """The URI's bytes could not be read; the message is the sentence reported to the user."""


class TransientReadError(Exception):
    """A failure worth retrying: the same read may well succeed in a moment."""

    def __init__(self, problem: str, retry_after_s: Optional[float] = None):
        super().__init__(problem)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    max_bytes: int = 64 * 1024 * 1024
    http_timeout_s: float = 30.0  # a total deadline per http(s) attempt, not per socket operation
    retries: int = 3  # of transient failures, on every scheme
    backoff_s: float = 0.5
    allowed_prefixes: tuple = ()  # --allow_uri_prefix: when set, only URIs (and redirects) under one of these


def scheme_of(uri: str) -> str:
    """The lower-case scheme of `uri` ("" for a local path, a Windows drive letter, or a URI that does not parse)."""
    try:
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
    except ValueError:
        return ""
    return "" if len(scheme) == 1 else scheme


def has_glob(path: str) -> bool:
    """Whether Beam would take `path` as a glob rather than one name."""
    return any(ch in path for ch in GLOB_CHARACTERS)


def read_uri(uri: str, config: ReadConfig = ReadConfig()) -> bytes:
    """All bytes of `uri`, at most `config.max_bytes` (a larger object is an error, never truncated)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:
        raise ReadError(f"{uri}: not a valid URL ({exc}).") from None
    check_allowed(uri, uri, config)
    scheme = scheme_of(uri)
    if scheme in HTTP_SCHEMES:
        read = _read_http
    elif scheme == "file":
        uri = _file_path(parts)
        read = _read_filesystem
    elif scheme in FILESYSTEM_SCHEMES:
        read = _read_filesystem
    else:
        raise ReadError(
            f"{uri}: the scheme {scheme}:// is not supported; use a local path, file://, "
            f"{', '.join(s + '://' for s in FILESYSTEM_SCHEMES if s)} or http(s)://."
        )
    return with_retries(lambda: read(uri, config), uri, config)


def _file_path(parts: urllib.parse.SplitResult) -> str:
    """The local path of a file:// URI."""
    return urllib.parse.unquote(parts.path)


# A version recorded for a failure must have stood this long before it was read: an object still being written
# (or replaced by a copy that kept an old mtime: its change time is new) is read again the next night.
SETTLED_S = 600


def settled_version(uri: str) -> Optional[str]:
    """A token that changes whenever the object at `uri` is rewritten, from its metadata alone (no bytes read);
    None when there is no such token (http(s), where ETags promise too little), the object cannot be stat'ed, or it
    changed less than SETTLED_S ago. Local files: size, mtime, inode and change time; other Beam filesystems
    (gs://, s3://): size and last update time, which every rewrite of an object sets."""
    from apache_beam.io.filesystems import FileSystems

    scheme = scheme_of(uri)
    try:
        if scheme in ("", "file"):
            info = os.stat(_file_path(urllib.parse.urlsplit(uri)) if scheme else uri)
            token, changed = f"{info.st_size}:{info.st_mtime_ns}:{info.st_ino}:{info.st_ctime_ns}", info.st_ctime
        elif scheme in FILESYSTEM_SCHEMES:
            [found] = FileSystems.match([uri])[0].metadata_list
            token, changed = f"{found.size_in_bytes}:{found.last_updated_in_seconds}", found.last_updated_in_seconds
        else:
            return None
    except Exception:  # unknown is safe: the input is read again
        return None
    return token if changed < time.time() - SETTLED_S else None


# Cloud metadata servers: what a VM's credentials are read from. Never a source of images.
_METADATA_HOSTS = ("metadata.google.internal", "metadata", "169.254.169.254", "fd00:ec2::254")


def check_allowed(uri: str, location: str, config: ReadConfig) -> None:
    """Refuses `location` (the URI, or a redirect it led to) outside --allow_uri_prefix, and a cloud metadata
    server or link-local address always: a manifest must not make a worker read its own credentials."""
    via = "" if location == uri else f" (it redirected to {location})"
    if config.allowed_prefixes and ".." in urllib.parse.unquote(urllib.parse.urlsplit(location).path).split("/"):
        raise ReadError(f"{uri}{via} has a '..' segment, which could leave every --allow_uri_prefix; it was not "
                        f"read.")
    if config.allowed_prefixes and not location.startswith(config.allowed_prefixes):
        raise ReadError(f"{uri}{via} is outside every --allow_uri_prefix ({', '.join(config.allowed_prefixes)}); "
                        f"it was not read.")
    if scheme_of(location) in HTTP_SCHEMES:
        host = (urllib.parse.urlsplit(location).hostname or "").rstrip(".").lower()
        if host in _METADATA_HOSTS or _is_link_local(host):
            raise ReadError(f"{uri}{via} names a cloud metadata server or a link-local address, which is never "
                            f"read.")


def _is_link_local(host: str) -> bool:
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    return address.is_link_local or str(address) == "fd00:ec2::254"


def _refuse_metadata_addresses(uri: str, host: str, port) -> None:
    """A host name that resolves to a metadata or link-local address is refused like the address itself."""
    try:
        found = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return  # the connection reports it, classified as usual
    if any(_is_link_local(info[4][0].split("%")[0]) for info in found):
        raise ReadError(f"{uri}: the host {host} resolves to a link-local address (a cloud metadata server), "
                        f"which is never read.")


def with_retries(read: Callable[[], bytes], uri: str, config: ReadConfig, sleep=time.sleep) -> bytes:
    """Calls `read` until it succeeds, fails for good, or stays transient for `config.retries` retries."""
    for attempt in range(config.retries + 1):
        try:
            return read()
        except TransientReadError as exc:
            if attempt == config.retries:
                raise ReadError(
                    f"Could not read {uri}: still failing after {attempt + 1} attempts ({exc}); "
                    f"the next run tries it again."
                ) from None
            delay = config.backoff_s * 2**attempt
            if exc.retry_after_s is not None:
                delay = max(delay, min(exc.retry_after_s, _MAX_RETRY_AFTER_S))
            sleep(delay)
    raise AssertionError("unreachable")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no details'}"


def _read_filesystem(uri: str, config: ReadConfig) -> bytes:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        # UNCOMPRESSED: an image named *.gz is still read as its raw bytes, never inflated.
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(config.max_bytes + 1)
    except MemoryError:
        raise
    except Exception as exc:
        raise _classify_filesystem_error(uri, exc) from None
    _check_size(uri, len(data), config)
    return data


def _classify_filesystem_error(uri: str, exc: Exception) -> Exception:
    """The filesystem's exception as ReadError (this input's fault) or TransientReadError (try again)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, IsADirectoryError):
        return ReadError(f"{uri} is a directory, not a file.")
    if isinstance(exc, FileNotFoundError) or names & set(_NOT_FOUND):
        return ReadError(f"{uri} does not exist.")
    if isinstance(exc, PermissionError) or names & set(_FORBIDDEN):
        return ReadError(f"Permission denied reading {uri}.")
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)) or names & set(_TRANSIENT_NAMES):
        return TransientReadError(_one_line(exc))
    if isinstance(exc, ValueError):  # Beam: no filesystem for the scheme (e.g. s3:// without apache-beam[aws])
        return ReadError(f"Could not read {uri}: {' '.join(str(exc).split())}")
    return ReadError(f"Could not read {uri} ({_one_line(exc)}).")


def _check_size(uri: str, size: int, config: ReadConfig) -> None:
    if size > config.max_bytes:
        raise ReadError(f"{uri} is larger than the {config.max_bytes}-byte limit (--max_image_bytes).")


def _request_target(parts: urllib.parse.SplitResult) -> str:
    """Path and query, percent-encoded: URLs with non-ASCII characters are valid input."""
    safe = "/%:@!$&'()*+,;=~-._"
    path = urllib.parse.quote(parts.path or "/", safe=safe)
    return path + (f"?{urllib.parse.quote(parts.query, safe=safe + '?')}" if parts.query else "")


def _retry_after_s(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _connection(parts: urllib.parse.SplitResult, timeout: float) -> tuple:
    """(connection, request target, headers) for a GET of `parts`, through the proxy the environment names.

    http_proxy / https_proxy / no_proxy (any case), as curl and urllib read them: an http URL is asked of the
    proxy in absolute form, an https one through a CONNECT tunnel, so TLS stays end to end.
    """
    import base64
    import urllib.request

    https = parts.scheme.lower() == "https"
    headers = {"User-Agent": "beam-image-embeddings"}
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return cls(parts.hostname, parts.port, timeout=timeout), _request_target(parts), headers
    proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_headers = {}
    if proxied.username:
        credentials = f"{urllib.parse.unquote(proxied.username)}:{urllib.parse.unquote(proxied.password or '')}"
        proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    if https:
        connection = cls(proxied.hostname, proxied.port or 8080, timeout=timeout)
        connection.set_tunnel(parts.hostname, parts.port or 443, headers=proxy_headers)
        return connection, _request_target(parts), headers
    connection = cls(proxied.hostname, proxied.port or 8080, timeout=timeout)
    absolute = f"http://{parts.netloc.rsplit('@', 1)[-1]}{_request_target(parts)}"
    return connection, absolute, {**headers, **proxy_headers}


def _read_http(uri: str, config: ReadConfig) -> bytes:
    """One GET within a total deadline of `http_timeout_s` (connect, headers and body together)."""
    deadline = time.monotonic() + config.http_timeout_s

    too_slow = f"no complete answer within {config.http_timeout_s:g} s (--http_timeout)"

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransientReadError(too_slow)
        return left

    location = uri
    for _ in range(_MAX_REDIRECTS + 1):
        try:
            parts = urllib.parse.urlsplit(location)
            if parts.scheme.lower() not in HTTP_SCHEMES or not parts.hostname:
                raise ReadError(f"{uri}: not a valid http(s) URL ({location}).")
            check_allowed(uri, location, config)
            connection, target, headers = _connection(parts, remaining())
        except ValueError as exc:  # a malformed port or host
            raise ReadError(f"{uri}: not a valid http(s) URL ({exc}).") from None
        if connection.host == parts.hostname:  # not through a proxy: the address we connect to is checked
            _refuse_metadata_addresses(uri, parts.hostname, parts.port)
        try:
            connection.connect()
            sock = connection.sock  # kept: the connection lets go of it once the response says "close"
            connection.request("GET", target, headers=headers)
            sock.settimeout(remaining())
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                location = urllib.parse.urljoin(location, response.getheader("Location"))
                continue
            if response.status in (408, 429) or response.status >= 500:
                raise TransientReadError(
                    f"HTTP {response.status} {response.reason}", _retry_after_s(response.getheader("Retry-After"))
                )
            if response.status != 200:
                raise ReadError(f"HTTP {response.status} {response.reason} for {uri}.")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit():
                _check_size(uri, int(declared), config)
            chunks, size = [], 0
            while True:
                sock.settimeout(remaining())
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                _check_size(uri, size, config)
            if declared and declared.isdigit() and size < int(declared):
                raise TransientReadError(f"the connection closed after {size} of the {declared} bytes announced")
            return b"".join(chunks)
        except (ReadError, TransientReadError):
            raise
        except socket.gaierror as exc:  # an unknown host is this input's fault; a DNS hiccup is not
            if exc.errno == socket.EAI_AGAIN:
                raise TransientReadError(_one_line(exc)) from None
            raise ReadError(f"Could not fetch {uri} ({_one_line(exc)}).") from None
        except ssl.SSLCertVerificationError as exc:
            raise ReadError(f"Could not fetch {uri} ({_one_line(exc)}).") from None
        except TimeoutError:  # the socket waited out the rest of the deadline
            raise TransientReadError(too_slow) from None
        except (OSError, http.client.HTTPException) as exc:  # resets, truncated bodies
            raise TransientReadError(_one_line(exc)) from None
        except UnicodeError as exc:  # a host name IDNA cannot encode
            raise ReadError(f"{uri}: not a valid http(s) URL ({_one_line(exc)}).") from None
        finally:
            connection.close()
    raise ReadError(f"{uri}: more than {_MAX_REDIRECTS} redirects.")
