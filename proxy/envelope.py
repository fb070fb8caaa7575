"""The JSON error envelope (contract §5), built for every non-forwarded answer.

It carries reason codes and identifiers only: never body values, credentials
or exception text.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiohttp import web

from proxy.model import Verdict


def envelope_body(verdict: Verdict, tool: str | None, request_id: str, trace_id: str,
                  policy_hash: str) -> bytes:
    return orjson.dumps({
        "decision": verdict.decision,
        "status": verdict.status,
        "reason_codes": list(verdict.reasons),
        "message": verdict.message,
        "tool": tool or None,
        "request_id": request_id or None,
        "trace_id": trace_id,
        "policy_hash": policy_hash,
    }) + b"\n"


def envelope_response(verdict: Verdict, tool: str | None, request_id: str, trace_id: str,
                      policy_hash: str, extra: Iterable[tuple[str, str]] = ()) -> web.Response:
    resp = web.Response(
        status=verdict.status,
        body=envelope_body(verdict, tool, request_id, trace_id, policy_hash),
        content_type="application/json",
    )
    resp.headers["X-Casf-Trace-Id"] = trace_id
    resp.headers["Cache-Control"] = "no-store"
    for name, value in (*verdict.headers, *extra):
        resp.headers[name] = value
    return resp
