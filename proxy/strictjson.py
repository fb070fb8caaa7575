"""Strict JSON for request bodies whose fields the policy reads (pure).

The policy must decide on the values the upstream will act on. JSON leaves a
few things to the decoder, and decoders differ; a body that depends on one of
them is refused instead of guessed:

* **duplicate keys** (``{"patient_id": "p1", "patient_id": "p2"}``): most
  decoders keep the last, some the first. Keys that are equal ignoring case
  count as duplicates too, because some decoders (Go's ``encoding/json``)
  match fields case-insensitively. → 400 ``BadRequest_Ambiguous``.
* **integers outside 64 bits**: the proxy's decoder turns them into lossy
  floats, an arbitrary-precision upstream keeps them exact. → 400
  ``BadRequest_InvalidJson``.
* **nesting deeper than** :data:`MAX_DEPTH`: no tool body needs it, and a
  deep value copied into the policy input and the audit record could not be
  serialised there. → 400 ``BadRequest_InvalidJson``.
* anything orjson rejects (RFC 8259 grammar, invalid UTF-8, lone surrogates,
  a BOM, NaN/Infinity, numbers that overflow a double). → 400
  ``BadRequest_InvalidJson``.

Non-integer numbers are IEEE-754 doubles for the policy, as for most decoders.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from proxy.reasons import Reason

MAX_DEPTH = 64
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class JsonRejected(ValueError):
    """The body cannot be read unambiguously; ``reason`` is the envelope's code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _Duplicate(Exception):
    pass


class _OutOfRange(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1:
        folded = {k.casefold() for k, _ in pairs}
        if len(folded) != len(pairs):
            raise _Duplicate
    # the value is never used: the document itself comes from orjson


def _int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise _OutOfRange
    return value


def _too_deep(doc: Any) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def loads_strict(body: bytes) -> Any:
    """Parse ``body`` as JSON, or raise :class:`JsonRejected`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JsonRejected(Reason.INVALID_JSON, "request body is not valid JSON") from exc
    if isinstance(doc, dict | list) and _too_deep(doc):
        raise JsonRejected(Reason.INVALID_JSON,
                           f"request body nests deeper than {MAX_DEPTH} levels")
    try:
        json.loads(body, object_pairs_hook=_pairs, parse_int=_int)
    except _Duplicate:
        raise JsonRejected(Reason.AMBIGUOUS_REQUEST,
                           "request body repeats a JSON key (keys are compared "
                           "ignoring case)") from None
    except _OutOfRange:
        raise JsonRejected(Reason.INVALID_JSON,
                           "request body has an integer outside the 64-bit range") from None
    except (ValueError, RecursionError):  # pragma: no cover - orjson accepted it
        raise JsonRejected(Reason.INVALID_JSON, "request body is not valid JSON") from None
    return doc
