"""Embedded audit store: a SQLite file written by one writer task (group commit).

Requests hand their record to :meth:`SqliteAuditSink.append` and wait; the
writer drains whatever is queued (up to ``batch_max``), seals the records
into this instance's chain, commits them in one transaction on a dedicated
thread (never on the event loop) and only then resolves the waiters. A failed
commit resolves every waiter of that batch with :class:`AuditUnavailable`
and leaves the chain where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from proxy.audit.chain import GENESIS, seal
from proxy.audit.records import FIELDS
from proxy.audit.waiting import QueuedSink
from proxy.ports import AuditReceipt, AuditUnavailable
from proxy.tasks import spawn

_JSON_FIELDS = ("reason_codes", "attrs")
_INT_FIELDS = ("seq", "status")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit_events (
  {", ".join(f + (" INTEGER" if f in _INT_FIELDS else " TEXT") for f in FIELDS)},
  extra TEXT NOT NULL DEFAULT '{{}}',
  PRIMARY KEY (chain_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id);
"""
_COLUMNS = ", ".join(FIELDS)
_PLACEHOLDERS = ", ".join("?" for _ in FIELDS)
_INSERT = f"INSERT INTO audit_events ({_COLUMNS}, extra) VALUES ({_PLACEHOLDERS}, ?)"  # noqa: S608


def to_row(record: dict[str, Any]) -> tuple[Any, ...]:
    values: list[Any] = []
    for f in FIELDS:
        v = record.get(f)
        if f in _JSON_FIELDS:
            v = orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
        values.append(v)
    extra = {k: v for k, v in record.items() if k not in FIELDS}
    values.append(orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode())
    return tuple(values)


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for f, v in zip(FIELDS, row, strict=False):
        record[f] = orjson.loads(v) if f in _JSON_FIELDS and v is not None else v
    record.update(orjson.loads(row[len(FIELDS)]))
    return record


def connect(path: Path, *, create: bool, busy_timeout_ms: int = 2000) -> sqlite3.Connection:
    if not create and not path.exists():
        raise AuditUnavailable(f"audit file {path} does not exist")
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if create:
            conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot open audit file {path}: {exc}") from exc
    return conn


def iter_records(conn: sqlite3.Connection, chain_id: str | None = None,
                 since: str | None = None, until: str | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Stream records ordered by (chain_id, seq), optionally filtered."""
    where: list[str] = []
    args: list[Any] = []
    if chain_id is not None:
        where.append("chain_id = ?")
        args.append(chain_id)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    sql = f"SELECT {', '.join(FIELDS)}, extra FROM audit_events"  # noqa: S608 - fixed names
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY chain_id, seq"
    cur = conn.execute(sql, args)
    while True:
        rows = cur.fetchmany(1000)
        if not rows:
            return
        for row in rows:
            yield from_row(row)


class SqliteReader:
    """Read-only access for ``audit verify`` / ``audit digest`` (one read transaction).

    Blocking SQLite calls run on a worker thread, a chunk at a time.
    """

    def __init__(self, conn: sqlite3.Connection, chunk: int = 1000) -> None:
        self.conn = conn
        self.chunk = chunk

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[SqliteReader]:
        conn = await asyncio.to_thread(connect, path, create=False)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN")  # one consistent snapshot
            yield cls(conn)
        finally:
            await asyncio.to_thread(conn.close)

    def _chains(self, chain: str | None, since: str | None, until: str | None
                ) -> list[tuple[str, int, int]]:
        where: list[str] = []
        args: list[Any] = []
        for cond, value in (("ts >= ?", since), ("ts < ?", until), ("chain_id = ?", chain)):
            if value is not None:
                where.append(cond)
                args.append(value)
        windowed = since is not None or until is not None
        sql = ("SELECT chain_id, " + ("min(seq)" if windowed else "1") +  # noqa: S608
               ", max(seq) FROM audit_events" + (" WHERE " + " AND ".join(where) if where else "")
               + " GROUP BY chain_id ORDER BY chain_id")
        return [(str(c), int(lo), int(hi)) for c, lo, hi in self.conn.execute(sql, args)]

    async def chains(self, chain: str | None, since: str | None, until: str | None
                     ) -> list[tuple[str, int, int]]:
        return await asyncio.to_thread(self._chains, chain, since, until)

    async def records(self, chain_id: str, lo: int, hi: int
                      ) -> AsyncGenerator[dict[str, Any], None]:
        sql = (f"SELECT {', '.join(FIELDS)}, extra FROM audit_events "  # noqa: S608
               "WHERE chain_id = ? AND seq BETWEEN ? AND ? ORDER BY seq")
        cur = await asyncio.to_thread(self.conn.execute, sql, (chain_id, lo, hi))
        while True:
            rows = await asyncio.to_thread(cur.fetchmany, self.chunk)
            if not rows:
                return
            for row in rows:
                yield from_row(row)

    async def record_at(self, chain_id: str, seq: int) -> dict[str, Any] | None:
        sql = (f"SELECT {', '.join(FIELDS)}, extra FROM audit_events "  # noqa: S608
               "WHERE chain_id = ? AND seq = ?")
        cur = await asyncio.to_thread(self.conn.execute, sql, (chain_id, seq))
        row = await asyncio.to_thread(cur.fetchone)
        return from_row(row) if row is not None else None


class SqliteAuditSink(QueuedSink):
    """One chain (``chain_id``) in a SQLite file, appended by a single writer task."""

    def __init__(self, path: Path, chain_id: str, *, batch_max: int = 256,
                 batch_wait_s: float = 0.0, timeout_s: float = 2.0) -> None:
        self.path = path
        self.chain_id = chain_id
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[AuditReceipt]]] = (
            asyncio.Queue())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casf-audit")
        self._conn: sqlite3.Connection | None = None
        self._seq = 0
        self._prev = GENESIS
        self._writer: asyncio.Task[None] | None = None
        self._ok = False
        self._committing_since: float | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _open(self) -> tuple[int, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # give up on a locked file before the waiters do, so a refused request's
        # record is (almost always) not committed after the refusal
        self._conn = connect(self.path, create=True,
                             busy_timeout_ms=max(1, int(self.timeout_s * 500)))
        row = self._conn.execute(
            "SELECT seq, hash FROM audit_events WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
            (self.chain_id,)).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    async def start(self) -> None:
        """Open the file and resume this chain from its last committed record."""
        self._seq, self._prev = await self._run(self._open)
        self._ok = True
        self._writer = spawn(self._write_loop(), name="casf-audit-writer")

    async def close(self) -> None:
        """Flush queued records (bounded), then stop the writer and close the file."""
        await self._stop_writer()
        if self._conn is not None:
            await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def healthy(self) -> bool:
        """False after a failed commit, or while one has been pending past the timeout."""
        if self._writer is None or self._writer.done() or not self._ok:
            return False
        since = self._committing_since
        return since is None or time.monotonic() - since <= self.timeout_s

    def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    async def _write_loop(self) -> None:
        q = self._queue
        while True:
            batch = [await q.get()]
            if self.batch_wait_s > 0 and q.empty():
                await asyncio.sleep(self.batch_wait_s)
            while len(batch) < self.batch_max and not q.empty():
                batch.append(q.get_nowait())
            seq, prev = self._seq, self._prev
            rows: list[tuple[Any, ...]] = []
            receipts: list[AuditReceipt | None] = []
            for record, fut in batch:
                if fut.done():  # the waiter gave up (timed out): its request was refused
                    receipts.append(None)
                    continue
                for f in FIELDS:  # stored as NULL and read back as null: hash it so
                    record.setdefault(f, None)
                try:
                    seal(record, self.chain_id, seq + 1, prev)
                    row = to_row(record)
                except Exception:  # e.g. a value canonical JSON cannot represent:
                    # refuse this request only; the writer and the chain go on
                    if not fut.done():
                        fut.set_exception(AuditUnavailable("audit record cannot be serialised"))
                    receipts.append(None)
                    continue
                seq += 1
                prev = record["hash"]
                rows.append(row)
                receipts.append(AuditReceipt(self.chain_id, seq, prev))
            self._committing_since = time.monotonic()
            try:
                await self._run(self._commit, rows)
            except Exception as exc:
                self._ok = False
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(AuditUnavailable(f"audit commit failed: {exc}"))
            else:
                self._ok = True
                self._seq, self._prev = seq, prev
                for (_, fut), receipt in zip(batch, receipts, strict=True):
                    if receipt is not None and not fut.done():
                        fut.set_result(receipt)
            finally:
                self._committing_since = None
                for _ in batch:
                    q.task_done()
