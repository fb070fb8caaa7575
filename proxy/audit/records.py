"""Building audit records from a request (pure; no body values, no credentials)."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.canonical import canonical_json, sha256_hex
from proxy.model import Exchange

# Fields every record carries, in the order docs/audit.md lists them.
FIELDS = ("chain_id", "seq", "event_id", "ts", "kind", "request_id", "trace_id", "actor",
          "role", "tenant", "tool", "effect", "method", "route", "decision", "status",
          "reason_codes", "policy_hash", "body_sha256", "attrs", "prev_hash", "hash")


class _Clock:
    """RFC 3339 UTC timestamps with microseconds; the seconds part is cached."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1_000_000):06d}Z"


class EventIds:
    """Unique event ids: a random per-process prefix and a counter (no syscall per id)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_CLOCK = _Clock()


def now_iso() -> str:
    return _CLOCK.now()


def redact_attrs(policy_input: Mapping[str, Any], redact: Mapping[str, str]) -> dict[str, Any]:
    """subject/args/context of the policy input with configured redactions applied."""
    out: dict[str, Any] = {}
    for group in ("subject", "args", "context"):
        values = dict(policy_input.get(group, {}))
        for name in list(values):
            rule = redact.get(f"{group}.{name}")
            if rule == "drop":
                del values[name]
            elif rule == "hash":
                values[name] = "sha256:" + sha256_hex(canonical_json(values[name]))
        out[group] = values
    return out


def base_record(ex: Exchange, kind: str, decision: str, status: int,
                reasons: Sequence[str], policy_hash: str,
                redact: Mapping[str, str], event_id: str) -> dict[str, Any]:
    p = ex.principal
    route = ex.route
    return {
        "event_id": event_id,
        "ts": now_iso(),
        "kind": kind,
        "request_id": ex.request_id,
        "trace_id": ex.trace_id,
        "actor": p.id if p else None,
        "role": p.role if p else None,
        "tenant": p.tenant if p else None,
        "tool": route.tool if route else None,
        "effect": route.effect if route else None,
        "method": ex.method,
        "route": route.path if route else None,
        "decision": decision,
        "status": status,
        "reason_codes": list(reasons),
        "policy_hash": policy_hash,
        "body_sha256": ex.body_sha256,
        "attrs": redact_attrs(ex.policy_input, redact) if ex.policy_input else {},
        "mode": ex.mode.value,
        "shadow": bool(ex.shadow),
        "key_id": p.key_id if p else None,
    }
