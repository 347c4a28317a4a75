"""What one input row may hold: the checks every source applies where it parses a row.

A row that fails them becomes that row's failure (stage "manifest") with one sentence saying why; it never
reaches a coder, a shuffle or a reader that would fail its bundle. An id is written to Parquet, PostgreSQL
and LanceDB, so it must be text all of them take; a URI must name a scheme this pipeline reads.
"""

from __future__ import annotations

import urllib.parse
from typing import Optional

from transforms.uri_reader import FILESYSTEM_SCHEMES, HTTP_SCHEMES, scheme_of

# UTF-8 bytes: room for any path-like id (a uri without an id is its own id), and within PostgreSQL's limit for a
# text primary key (a btree entry holds at most 2,704 bytes).
MAX_ID_BYTES = 2048
READABLE_SCHEMES = tuple(s for s in FILESYSTEM_SCHEMES if s) + ("file",) + HTTP_SCHEMES
_SHOWN_CHARACTERS = 200


def shown(text: str) -> str:
    """`text` as it can be written anywhere (Parquet, a terminal): lone surrogates and control characters
    escaped, cut to a length a message can carry."""
    escaped = "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                      for ch in writable(text))
    return escaped if len(escaped) <= _SHOWN_CHARACTERS else escaped[:_SHOWN_CHARACTERS] + "..."


def writable(text: str) -> str:
    """`text` with lone surrogates escaped, so that a failure row can always be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encoded(text: str) -> Optional[bytes]:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def id_problem(id_: str) -> Optional[str]:
    """Why `id_` cannot be an output id, or None."""
    encoded = _encoded(id_)
    if encoded is None:
        return f"has an id that is not valid Unicode text (a lone surrogate): {shown(id_)!r}."
    if "\x00" in id_:
        return f"has an id with a NUL character: {shown(id_)!r}."
    if len(encoded) > MAX_ID_BYTES:
        return f"has an id of {len(encoded):,} bytes, over the {MAX_ID_BYTES:,}-byte limit: {shown(id_)!r}."
    return None


def uri_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot be read by any reader of this pipeline, or None (whether it exists is the reader's to
    find out)."""
    if _encoded(uri) is None:
        return f"has a uri that is not valid Unicode text (a lone surrogate): {shown(uri)!r}."
    if "\x00" in uri:
        return f"has a uri with a NUL character: {shown(uri)!r}."
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        return f"has a uri that is not a valid URL ({exc}): {shown(uri)!r}."
    scheme = scheme_of(uri)
    if scheme and scheme not in READABLE_SCHEMES:
        return (f"has a uri with the scheme {shown(scheme)}://, which this pipeline does not read (it reads local "
                f"paths, {', '.join(s + '://' for s in READABLE_SCHEMES)}): {shown(uri)!r}.")
    if scheme in HTTP_SCHEMES and not parts.hostname:
        return f"has an http(s) uri without a host: {shown(uri)!r}."
    if scheme and scheme not in ("file",) + HTTP_SCHEMES and not parts.netloc:
        return f"has a {scheme}:// uri without a bucket or host: {shown(uri)!r}."
    return None
