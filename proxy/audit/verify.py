"""Chain verification over a store (SQLite or PostgreSQL), streaming and bounded in memory.

A store is read through an :class:`AuditReader`: the chains to check (each
as a seq range), their records in ``seq`` order, and single records. Every
chain is checked on its own with :class:`~proxy.audit.chain.ChainCheck`:

- whole store / one chain: every row of the chain, from seq 1 (the genesis)
  to its last record; a row at any other position (seq 0, negative, NULL,
  a duplicate) breaks the chain, and so does a row whose own columns
  disagree (:class:`~proxy.audit.chain.StoredRecord`); rows of no chain are
  reported on their own;
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

    def records(self, chain_id: str, lo: int | None = None, hi: int | None = None
                ) -> AsyncGenerator[dict[str, Any], None]:
        """The chain's records by seq: ``lo..hi``, or without bounds every row of the
        chain, whatever its seq (0, negative, NULL: rows no writer stores)."""
        ...

    async def record_at(self, chain_id: str, seq: int) -> dict[str, Any] | None: ...

    async def strays(self) -> list[str]:
        """Rows that belong to no chain, described (a store's schema may forbid them)."""
        ...

    async def refresh(self) -> None:
        """Start a new snapshot (``audit export --follow``)."""
        ...


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
    windowed = since is not None or until is not None
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
        rows = reader.records(cid, lo, hi) if windowed else reader.records(cid)
        async with contextlib.aclosing(rows) as records:
            async for rec in records:
                if check.feed(rec) is not None:
                    break
            else:
                check.finish()
        yield ChainResult(cid, check, lo, hi)
    if chain is None:
        for n, problem in enumerate(await reader.strays()):
            stray = ChainCheck("(no chain)")
            stray.broken = Break("(no chain)", 0, "?", problem, "inserted")
            yield ChainResult(f"(no chain) #{n + 1}", stray, 0, 0)


@dataclass(frozen=True, slots=True)
class DigestFinding:
    """One line of comparing a store with a digest: ``ok``, ``broken`` or ``new``."""

    status: str
    chain_id: str
    message: str


def coverage(doc: dict[str, Any]) -> tuple[str | None, str]:
    """The ``ts`` range a digest covers: its window, or everything up to its creation."""
    window = doc.get("window")
    if isinstance(window, dict):
        return str(window["since"]), str(window["until"])
    return None, str(doc["created_at"])


async def compare_with_digest(reader: AuditReader, doc: dict[str, Any],
                              store_chains: list[str], chain: str | None = None
                              ) -> list[DigestFinding]:
    """Check the store against a (verified) digest document.

    - each chain of the digest must still hold the first and last record the
      digest saw (records removed from the end, or replaced, show here);
    - each chain of the store the digest does not know is named: ``broken``
      when it has records in the time the digest covers (it would have been
      in it: a forged or hidden chain), else ``new`` (started after it).
    """
    out: list[DigestFinding] = []
    known: set[str] = set()
    for entry in doc["chains"]:
        cid = str(entry["chain_id"])
        known.add(cid)
        if chain is not None and cid != chain:
            continue
        for seq, want in ((entry["first_seq"], entry["first_hash"]),
                          (entry["last_seq"], entry["last_hash"])):
            rec = await reader.record_at(cid, int(seq))
            if (rec is None or rec.get("hash") != want or record_hash(rec) != want
                    or getattr(rec, "problem", None)):
                what = "missing" if rec is None else "not the record the digest saw"
                out.append(DigestFinding("broken", cid, f"chain {cid!r} seq {seq}: {what} "
                                         "(records removed or replaced after the digest)"))
                break
        else:
            out.append(DigestFinding("ok", cid, f"chain {cid!r} still holds the digest's "
                                     f"records seq {entry['first_seq']}..{entry['last_seq']}"))
    since, until = coverage(doc)
    for cid in store_chains:
        if cid in known or (chain is not None and cid != chain):
            continue
        inside = await reader.chains(cid, since, until)
        if inside:
            _, lo, hi = inside[0]
            out.append(DigestFinding(
                "broken", cid, f"chain {cid!r} is not in the digest but has records in the "
                f"time it covers (seq {lo}..{hi}, before {until}): a forged or hidden chain"))
        else:
            out.append(DigestFinding(
                "new", cid, f"chain {cid!r} is not in the digest (all its records are "
                f"later than {until}: a chain started since, or a forged one)"))
    return out
