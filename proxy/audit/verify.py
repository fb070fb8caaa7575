"""Chain verification over a store (SQLite or PostgreSQL), streaming and bounded in memory.

A store is read through an :class:`AuditReader`: the chains to check (each
as a seq range), their records in ``seq`` order, and single records. Every
chain is checked on its own with :class:`~proxy.audit.chain.ChainCheck`:

- whole store / one chain: from seq 1 (the genesis) to the chain's last record;
- a time window: from the chain's first record in the window to its last,
  *including* every record in between whatever its timestamp (so a record
  deleted inside the window shows as a gap), anchored on the record just
  before the window (which must exist and hash correctly).

Timestamps are compared as text: the records' ``ts`` is always
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC), and :func:`normalise_ts` brings a
user's bound to that form.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from proxy.audit.chain import Break, ChainCheck, record_hash


class AuditReader(Protocol):
    async def chains(self, chain: str | None, since: str | None, until: str | None
                     ) -> list[tuple[str, int, int]]: ...

    def records(self, chain_id: str, lo: int, hi: int
                ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def record_at(self, chain_id: str, seq: int) -> dict[str, Any] | None: ...


def normalise_ts(text: str) -> str:
    """An ISO-8601 date or time (naive = UTC) as the records' ``ts`` text; ValueError if not."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def day_window(day: str) -> tuple[str, str]:
    """``[day 00:00 UTC, next day 00:00 UTC)`` as ``ts`` bounds; ValueError if not a date."""
    d = date.fromisoformat(day.strip())
    start = datetime(d.year, d.month, d.day, tzinfo=UTC)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    return start.strftime(fmt), (start + timedelta(days=1)).strftime(fmt)


@dataclass(slots=True)
class ChainResult:
    chain_id: str
    check: ChainCheck
    lo: int
    hi: int

    @property
    def broken(self) -> Break | None:
        return self.check.broken

    def summary(self) -> dict[str, Any]:
        """The chain's digest entry (only meaningful when it verified)."""
        c = self.check
        return {"chain_id": self.chain_id, "count": c.count, "first_seq": c.first_seq,
                "last_seq": c.last_seq, "first_hash": c.first_hash, "last_hash": c.last_hash,
                "prev_hash": c.first_prev_hash or ""}


async def check_chains(reader: AuditReader, chain: str | None = None,
                       since: str | None = None, until: str | None = None
                       ) -> AsyncIterator[ChainResult]:
    """Verify each chain (or one) of the store, optionally within a ``ts`` window."""
    for cid, lo, hi in await reader.chains(chain, since, until):
        check = ChainCheck(cid)
        if lo > 1:
            anchor = await reader.record_at(cid, lo - 1)
            if anchor is None:
                check.broken = Break(cid, lo, "?", f"record seq {lo - 1} (just before the "
                                     "window) is missing (deleted)", "deleted")
                yield ChainResult(cid, check, lo, hi)
                continue
            if record_hash(anchor) != anchor.get("hash"):
                check.broken = Break(cid, lo - 1, str(anchor.get("event_id", "?")),
                                     "hash mismatch: record modified", "modified")
                yield ChainResult(cid, check, lo, hi)
                continue
            check = ChainCheck(cid, expected_seq=lo, prev_hash=str(anchor["hash"]))
        async with contextlib.aclosing(reader.records(cid, lo, hi)) as records:
            async for rec in records:
                if check.feed(rec) is not None:
                    break
            else:
                check.finish()
        yield ChainResult(cid, check, lo, hi)
