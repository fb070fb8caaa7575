"""Read-only views of the audit trail for the console: recent records and chain status.

:class:`AuditView` is the port; :class:`SqliteAuditView` reads the embedded
audit file (queries on a worker thread, never on the event loop) and
:class:`PostgresAuditView` the ``audit_events`` table through a small pool
(a reader login is enough: SELECT only). Both only read.

``recent`` returns the records of one tenant, newest first; filters compare
exactly (tool, decision, kind, one reason code) and ``since``/``until`` are
``ts`` bounds in the records' own text form (see
:func:`proxy.audit.verify.normalise_ts`). ``chain_status`` verifies every
chain with :func:`proxy.audit.verify.check_chains`, as ``casf-proxy audit
verify`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from proxy.audit import postgres as pg
from proxy.audit import sqlite as sq
from proxy.audit.records import FIELDS
from proxy.audit.verify import AuditReader, check_chains
from proxy.ports import AuditUnavailable

MAX_PAGE = 200


@dataclass(frozen=True, slots=True)
class Filters:
    """What the recent-decisions page asks for; None means "any"."""

    tenant: str | None
    tool: str | None = None
    decision: str | None = None
    reason: str | None = None
    kind: str | None = None
    since: str | None = None
    until: str | None = None


@dataclass(frozen=True, slots=True)
class ChainHead:
    chain_id: str
    records: int
    last_seq: int
    last_hash: str
    broken: str | None  # what is wrong, when the chain does not verify


@dataclass(frozen=True, slots=True)
class ChainStatus:
    verified_at: float
    chains: tuple[ChainHead, ...]
    error: str | None = None  # the store could not be read

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.broken is None for c in self.chains)

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)


class AuditView(Protocol):
    """Read-only access to the audit trail (the console's only view of it)."""

    async def recent(self, filters: Filters, limit: int, offset: int) -> list[dict[str, Any]]:
        """Records matching ``filters``, newest first; raises AuditUnavailable."""
        ...

    async def chain_status(self) -> ChainStatus:
        """Verify every chain now (never raises: a store error is in ``error``)."""
        ...

    async def close(self) -> None: ...


async def verify_all(reader: AuditReader) -> tuple[ChainHead, ...]:
    out = []
    async for result in check_chains(reader):
        c = result.check
        out.append(ChainHead(result.chain_id, c.count, c.last_seq, c.last_hash,
                             str(result.broken) if result.broken is not None else None))
    return tuple(out)


def _where_sqlite(f: Filters) -> tuple[str, list[Any]]:
    where = ["tenant IS ?"]
    args: list[Any] = [f.tenant]
    for column, value in (("tool", f.tool), ("decision", f.decision), ("kind", f.kind)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if f.reason is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(audit_events.reason_codes) "
                     "WHERE json_each.value = ?)")
        args.append(f.reason)
    if f.since is not None:
        where.append("ts >= ?")
        args.append(f.since)
    if f.until is not None:
        where.append("ts < ?")
        args.append(f.until)
    return " AND ".join(where), args


class SqliteAuditView:
    """The embedded audit file, read on a worker thread through one read connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def _query(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        if self._conn is None:
            self._conn = sq.connect(self.path, create=False)
        try:
            rows = self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit file {self.path}: {exc}") from exc
        return [sq.from_row(r) for r in rows]

    async def recent(self, filters: Filters, limit: int, offset: int) -> list[dict[str, Any]]:
        where, args = _where_sqlite(filters)
        sql = (f"SELECT {', '.join(FIELDS)}, extra FROM audit_events "  # noqa: S608
               f"WHERE {where} ORDER BY ts DESC, chain_id, seq DESC LIMIT ? OFFSET ?")
        async with self._lock:
            return await asyncio.to_thread(self._query, sql,
                                           [*args, min(limit, MAX_PAGE), max(offset, 0)])

    async def chain_status(self) -> ChainStatus:
        now = time.time()
        try:
            async with sq.SqliteReader.open(self.path) as reader:
                return ChainStatus(now, await verify_all(reader))
        except (AuditUnavailable, sqlite3.Error) as exc:
            return ChainStatus(now, (), f"audit file cannot be read: {exc}")

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            async with self._lock:
                await asyncio.to_thread(conn.close)


class PostgresAuditView:
    """The ``audit_events`` table through a pool of at most ``pool_size`` connections."""

    def __init__(self, dsn: str, *, pool_size: int = 2, timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> Any:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=self.pool_size, timeout=self.timeout_s,
                    command_timeout=self.timeout_s,
                    server_settings={"application_name": "casf-proxy console",
                                     "default_transaction_read_only": "on"})
            return self._pool

    async def recent(self, filters: Filters, limit: int, offset: int) -> list[dict[str, Any]]:
        f = filters
        where = ["tenant IS NOT DISTINCT FROM $1"]
        args: list[Any] = [f.tenant]
        for column, value in (("tool", f.tool), ("decision", f.decision), ("kind", f.kind)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if f.reason is not None:
            args.append(f.reason)
            where.append("EXISTS (SELECT 1 FROM json_array_elements_text(reason_codes) "  # noqa: S608
                         "AS r(v) "
                         f"WHERE r.v = ${len(args)})")
        for cond, value in (("ts >= ", f.since), ("ts < ", f.until)):
            if value is not None:
                args.append(value)
                where.append(f"{cond}${len(args)}")
        args += [min(limit, MAX_PAGE), max(offset, 0)]
        sql = (f"SELECT {', '.join(pg.COLUMNS)} FROM {pg.TABLE} "  # noqa: S608
               f"WHERE {' AND '.join(where)} ORDER BY ts DESC, chain_id, seq DESC "
               f"LIMIT ${len(args) - 1} OFFSET ${len(args)}")
        try:
            pool = await self._get_pool()
            rows = await pool.fetch(sql, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise AuditUnavailable(f"audit database: {type(exc).__name__}") from exc
        return [pg.from_row(r) for r in rows]

    async def chain_status(self) -> ChainStatus:
        now = time.time()
        try:
            async with pg.PostgresReader.open(self.dsn, timeout_s=self.timeout_s) as reader:
                return ChainStatus(now, await verify_all(reader))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            return ChainStatus(now, (), f"audit database cannot be read: {type(exc).__name__}")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), self.timeout_s)


@contextlib.asynccontextmanager
async def open_audit_view(view: AuditView) -> AsyncIterator[AuditView]:
    try:
        yield view
    finally:
        await view.close()
