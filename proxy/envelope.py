"""The JSON error envelope (docs/reason-codes.md), built for every non-forwarded answer.

It carries reason codes and identifiers only: never body values, credentials
or exception text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from proxy.model import Verdict


def envelope_doc(verdict: Verdict, tool: str | None, request_id: str, trace_id: str,
                 policy_hash: str, extra: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """The envelope as a document; ``retry_after`` mirrors a ``Retry-After`` header,
    for callers (MCP agents, ``/verify`` clients) that never see the headers."""
    doc: dict[str, Any] = {
        "decision": verdict.decision,
        "status": verdict.status,
        "reason_codes": list(verdict.reasons),
        "message": verdict.message,
        "tool": tool or None,
        "request_id": request_id or None,
        "trace_id": trace_id,
        "policy_hash": policy_hash,
    }
    for name, value in (*verdict.headers, *extra):
        if name.lower() == "retry-after" and value.isdigit():
            doc["retry_after"] = int(value)
    if verdict.approval is not None:
        doc["approval"] = dict(verdict.approval)
    return doc


def envelope_body(verdict: Verdict, tool: str | None, request_id: str, trace_id: str,
                  policy_hash: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    return orjson.dumps(envelope_doc(verdict, tool, request_id, trace_id, policy_hash,
                                     extra)) + b"\n"


def envelope_response(verdict: Verdict, tool: str | None, request_id: str, trace_id: str,
                      policy_hash: str, extra: Iterable[tuple[str, str]] = ()) -> web.Response:
    extra = tuple(extra)
    resp = web.Response(
        status=verdict.status,
        body=envelope_body(verdict, tool, request_id, trace_id, policy_hash, extra),
        content_type="application/json",
    )
    resp.headers["X-Casf-Trace-Id"] = trace_id
    resp.headers["Cache-Control"] = "no-store"
    for name, value in (*verdict.headers, *extra):
        resp.headers[name] = value
    return resp
