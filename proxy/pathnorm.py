"""Request-target normalisation (pure).

The proxy matches, decides on and forwards the *normalised* path, so the
policy and the upstream can never see two different resources. Anything whose
meaning differs between common servers is rejected rather than guessed:

* characters outside visible ASCII (NUL, spaces, DEL, raw non-ASCII bytes);
* ``\\``, ``;`` (path parameters) and ``#`` in the path;
* malformed percent-escapes, ``%00``, encoded ``/`` or ``\\``;
* double-encoded escapes (``%25`` followed by two hex digits, e.g. ``%252e``):
  an upstream that decodes twice would see a different path;
* a segment that only becomes ``.`` or ``..`` after percent-decoding;
* percent-decoded bytes that are not valid UTF-8 (this catches overlong
  encodings such as ``%C0%AE``);
* ``..`` that would climb above the root.

Accepted paths are rewritten: escapes of unreserved characters are decoded,
other escapes get upper-case hex, runs of ``/`` collapse to one and ``.`` /
``..`` segments are resolved (RFC 3986 §5.2.4). A trailing slash is kept.

The query is kept byte for byte but checked: visible ASCII only, no ``#``,
well-formed escapes, no ``%00``, and its percent-decoded bytes must be UTF-8
(a Latin-1 escape such as ``%E9`` reads differently to different decoders).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
_FORBIDDEN_RAW = frozenset("\\;#")
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")


class MalformedTarget(ValueError):
    """The request target is ambiguous or malformed; answer 400."""


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    query: str

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def _visible_ascii(text: str, what: str) -> None:
    for ch in text:
        if not ("\x21" <= ch <= "\x7e"):
            raise MalformedTarget(f"{what} contains a character outside visible ASCII")


def _normalise_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    out: list[str] = []
    decoded = bytearray()
    i = 0
    n = len(segment)
    while i < n:
        ch = segment[i]
        if ch != "%":
            out.append(ch)
            decoded += ch.encode()
            i += 1
            continue
        esc = segment[i + 1 : i + 3]
        if len(esc) != 2 or not set(esc) <= _HEX:
            raise MalformedTarget("malformed percent-escape in path")
        byte = int(esc, 16)
        if byte == 0:
            raise MalformedTarget("encoded NUL in path")
        if byte in (0x2F, 0x5C):
            raise MalformedTarget("encoded slash or backslash in path")
        decoded.append(byte)
        char = chr(byte)
        out.append(char if char in _UNRESERVED else f"%{esc.upper()}")
        i += 3
    try:
        decoded.decode("utf-8", "strict")
    except UnicodeDecodeError as exc:
        raise MalformedTarget("percent-decoded path is not valid UTF-8") from exc
    result = "".join(out)
    if result in (".", ".."):
        raise MalformedTarget("encoded dot segment in path")
    if _DOUBLE_ENCODED.search(result):  # on the output: %25a%31 becomes %25a1
        raise MalformedTarget("double-encoded percent-escape in path")
    return result


def normalise_path(raw_path: str) -> str:
    """Normalise a request path (no query) or raise :class:`MalformedTarget`."""
    if not raw_path.startswith("/"):
        raise MalformedTarget("path must start with '/'")
    _visible_ascii(raw_path, "path")
    if any(ch in _FORBIDDEN_RAW for ch in raw_path):
        raise MalformedTarget("path contains '\\', ';' or '#'")
    raw_segments = raw_path.split("/")[1:]
    trailing = raw_path.endswith("/") and len(raw_path) > 1
    stack: list[str] = []
    for raw in raw_segments:
        if raw == "":
            continue
        if raw == ".":
            continue
        if raw == "..":
            if not stack:
                raise MalformedTarget("'..' climbs above the root")
            stack.pop()
            continue
        stack.append(_normalise_segment(raw))
    last = raw_segments[-1] if raw_segments else ""
    if last in (".", "..") and stack:
        trailing = True
    path = "/" + "/".join(stack)
    if trailing and stack:
        path += "/"
    return path


def split_target(raw_target: str) -> Target:
    """Split and normalise a raw request target (``/path?query``)."""
    path, sep, query = raw_target.partition("?")
    if sep:
        _visible_ascii(query, "query")
        if "#" in query:
            raise MalformedTarget("query contains '#'")
        _check_query_escapes(query)
    return Target(normalise_path(path), query)


def _check_query_escapes(query: str) -> None:
    i = query.find("%")
    if i == -1:
        return
    while i != -1:
        esc = query[i + 1 : i + 3]
        if len(esc) != 2 or not set(esc) <= _HEX:
            raise MalformedTarget("malformed percent-escape in query")
        if esc == "00":
            raise MalformedTarget("encoded NUL in query")
        i = query.find("%", i + 3)
    try:
        unquote_to_bytes(query).decode("utf-8", "strict")
    except UnicodeDecodeError as exc:
        raise MalformedTarget("percent-decoded query is not valid UTF-8") from exc
