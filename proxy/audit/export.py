"""``casf-proxy audit export``: the records as JSON lines, each verified as it is written.

Every chain is read from its first row (whatever the time window: a record
is only written once every record before it in its chain verified), and a
record is written only after it linked to the one before it. A broken link
stops the export: what verified before it has been written, the break is
returned. With ``follow`` the store is polled (a new snapshot every
``interval_s``) for records appended since, and for new chains, until
``stop`` is set.

Each line is the record exactly as it was hashed (canonical JSON, ``hash``
included), so a consumer can re-verify it with nothing but SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.audit.chain import Break, ChainCheck
from proxy.audit.verify import AuditReader
from proxy.canonical import canonical_json

MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 60.0


@dataclass(slots=True)
class Exporter:
    reader: AuditReader
    write: Callable[[bytes], object]
    chain: str | None = None
    since: str | None = None
    until: str | None = None
    stop: asyncio.Event | None = None  # set: end at the next record (SIGINT/SIGTERM)
    written: int = 0
    checks: dict[str, ChainCheck] = field(default_factory=dict)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _selected(self, record: dict[str, Any]) -> bool:
        ts = record.get("ts")
        if self.since is None and self.until is None:
            return True
        if not isinstance(ts, str):
            return False
        return ((self.since is None or ts >= self.since)
                and (self.until is None or ts < self.until))

    async def _feed(self, check: ChainCheck, records: AsyncIterator[dict[str, Any]]
                    ) -> Break | None:
        async for rec in records:
            if self._stopping():
                return None
            brk = check.feed(rec)
            if brk is not None:
                return brk
            if check._pending is None:  # it linked to the record before it
                if self._selected(rec):
                    self.write(canonical_json(dict(rec)) + b"\n")
                    self.written += 1
            # else: held back one record, to name what happened (the next feed concludes)
        return check.finish()

    async def poll(self) -> Break | None:
        """Write what is new since the last poll (everything, the first time)."""
        for cid, _, _ in await self.reader.chains(self.chain, None, None):
            check = self.checks.get(cid)
            if check is None:
                check = self.checks[cid] = ChainCheck(cid)
                rows = self.reader.records(cid)  # every row, whatever its seq
            else:
                rows = self.reader.records(cid, check.expected_seq, None)
            async with contextlib.aclosing(rows) as records:
                brk = await self._feed(check, records)
            if brk is not None:
                return brk
            if self._stopping():
                return None
        if self.chain is None:
            for problem in await self.reader.strays():
                return Break("(no chain)", 0, "?", problem, "inserted")
        return None


async def run_export(reader: AuditReader, write: Callable[[bytes], object],
                     flush: Callable[[], object], *, chain: str | None, since: str | None,
                     until: str | None, follow: bool, interval_s: float,
                     stop: asyncio.Event) -> tuple[Exporter, Break | None]:
    """Export once, or follow until ``stop``; returns the exporter and the first break."""
    exp = Exporter(reader, write, chain, since, until, stop)
    interval = min(max(interval_s, MIN_INTERVAL_S), MAX_INTERVAL_S)
    while True:
        brk = await exp.poll()
        flush()
        if brk is not None or not follow or stop.is_set():
            return exp, brk
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if stop.is_set():
            return exp, None
        await reader.refresh()
