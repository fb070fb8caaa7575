"""Canonical JSON and the digests built on it (pure functions).

Canonical JSON here is: object keys sorted by code point, no insignificant
whitespace, UTF-8, no NaN/Infinity. It is the serialisation the audit hash
contract (docs/audit.md) and the idempotency fingerprint are defined over.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_OPTS = orjson.OPT_SORT_KEYS


class NotCanonicalisable(ValueError):
    """The value cannot be written as canonical JSON (e.g. a huge integer)."""


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` canonically (sorted keys, compact, UTF-8)."""
    try:
        return orjson.dumps(value, option=_OPTS)
    except TypeError as exc:  # orjson.JSONEncodeError subclasses TypeError
        raise NotCanonicalisable(str(exc)) from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_body(body: bytes, content_type: str | None) -> bytes:
    """The body as it enters the fingerprint.

    JSON bodies are re-serialised canonically, so key order and whitespace do
    not change the fingerprint; anything else (or JSON that does not parse)
    is taken byte for byte.
    """
    if body and content_type is not None and "json" in content_type.lower():
        try:
            return canonical_json(orjson.loads(body))
        except (orjson.JSONDecodeError, NotCanonicalisable):
            return body
    return body


def fingerprint(tool: str, method: str, path_and_query: str, canonical: bytes) -> str:
    """SHA-256 over tool, method, normalised path+query and the canonical body.

    Each part is length-prefixed so no two different tuples share an input.
    """
    h = hashlib.sha256()
    for part in (tool.encode(), method.upper().encode(), path_and_query.encode(), canonical):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()
