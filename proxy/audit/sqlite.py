"""Embedded audit store: a SQLite file written by one writer task (group commit).

Requests hand their record to :meth:`SqliteAuditSink.append` and wait; the
writer drains whatever is queued (up to ``batch_max``), seals the records
into this instance's chain, commits them in one transaction on a dedicated
thread (never on the event loop) and only then resolves the waiters. A failed
commit resolves every waiter of that batch with :class:`AuditUnavailable`
and leaves the chain where it was; records handed over with
``append_later`` go to the local spool instead (:mod:`proxy.audit.spool`)
and are written first once the file commits again.

Schema (``PRAGMA user_version`` 2): ``chain_id`` text and ``seq`` an
integer >= 1, both NOT NULL, one row per (chain, seq). Files made by
earlier versions (user version 0) are upgraded by ``casf-proxy audit
migrate``; the proxy keeps writing them as they are until then.

Several processes may open one file at once (``run --workers N``: each its
own chain): the busy timeout is set before the first statement, the switch
to WAL is retried while another process holds the lock it needs, and the
schema is created inside ``BEGIN IMMEDIATE``, so a process that finds the
file being set up waits for it instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from proxy.audit.chain import GENESIS, StoredRecord, seal
from proxy.audit.records import FIELDS
from proxy.audit.spool import AuditSpooled, Spool, SpoolError, spool_file
from proxy.audit.waiting import DEFAULT_QUEUE_MAX, Pending, QueuedSink
from proxy.ports import AuditReceipt, AuditUnavailable
from proxy.tasks import spawn

log = logging.getLogger("casf.audit")

SCHEMA_VERSION = 2
_JSON_FIELDS = ("reason_codes", "attrs")
_INT_FIELDS = ("seq", "status")
_CONSTRAINED = {
    "chain_id": "TEXT NOT NULL CHECK (typeof(chain_id) = 'text')",
    "seq": "INTEGER NOT NULL CHECK (typeof(seq) = 'integer' AND seq >= 1)",
}


def _table(name: str) -> str:
    cols = ", ".join(f"{f} {_CONSTRAINED.get(f, 'INTEGER' if f in _INT_FIELDS else 'TEXT')}"
                     for f in FIELDS)
    return (f"CREATE TABLE IF NOT EXISTS {name} ({cols}, extra TEXT NOT NULL DEFAULT '{{}}', "
            "PRIMARY KEY (chain_id, seq))")


_INDEXES = ("CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts)",
            "CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id)")
# rows no writer of this schema version can store (a v1 file accepted them)
_STRAY_SQL = ("SELECT rowid, chain_id, seq FROM audit_events WHERE chain_id IS NULL "
              "OR typeof(chain_id) != 'text' OR seq IS NULL OR typeof(seq) != 'integer' "
              "OR seq < 1 ORDER BY rowid LIMIT ?")
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


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> StoredRecord:
    """The record a reader of the row sees: the columns, plus ``extra``'s own fields.

    The writer never puts a column's field in ``extra``: one found there
    (hiding what the column says, or standing in for it) makes the row
    inconsistent, and so does an ``extra`` that is not a JSON object.
    """
    record: dict[str, Any] = {}
    problems: list[str] = []
    for f, v in zip(FIELDS, row, strict=False):
        if f in _JSON_FIELDS and isinstance(v, str):
            try:
                v = orjson.loads(v)
            except orjson.JSONDecodeError:
                problems.append(f"column {f} is not JSON")
        record[f] = v
    raw = row[len(FIELDS)]
    try:
        extra = orjson.loads(raw) if isinstance(raw, str | bytes) else None
    except orjson.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        problems.append("column extra is not a JSON object")
        extra = {}
    clash = sorted(k for k in extra if k in record)
    if clash:
        problems.append(f"field(s) {', '.join(clash)} stored in extra as well as in their "
                        "column(s)")
    for k, v in extra.items():
        if k not in record:
            record[k] = v
    return StoredRecord(record, "; ".join(problems) or None)


def _create(conn: sqlite3.Connection) -> None:
    """Create the schema of a new file (in one write transaction; nothing when it exists)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                              "AND name = 'audit_events'").fetchone()
        if not exists:
            conn.execute(_table("audit_events"))
            for sql in _INDEXES:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _wal(conn: sqlite3.Connection, path: Path, timeout_s: float) -> None:
    """Switch the file to WAL, waiting (bounded) while another connection holds a lock.

    Switching needs the file's exclusive lock, and SQLite does not call the
    busy handler when two connections want it at once (one would deadlock
    the other): it fails at once with "database is locked". That is what a
    worker met when another one was setting up the same new file.
    """
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()  # a bounded wait on a worker thread, never the event loop
    delay = 0.002
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            mode = None
        if mode == "wal":
            return
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(
                f"cannot switch {path} to WAL within {timeout_s} s (journal mode "
                f"{mode or 'locked'})")
        pause.wait(delay)
        delay = min(delay * 2, 0.05)


def connect(path: Path, *, create: bool, busy_timeout_ms: int = 2000,
            open_timeout_ms: int = 10_000) -> sqlite3.Connection:
    """Open the file (WAL, synchronous commits); with ``create``, make its schema.

    Several processes may open a new file at once (``run --workers N``): the
    busy timeout is set before the first statement, the switch to WAL waits
    for a lock held elsewhere, and the schema is created in ``BEGIN
    IMMEDIATE``, so they wait for each other (up to ``open_timeout_ms``)
    instead of failing. From then on the busy timeout is ``busy_timeout_ms``.
    """
    if not create and not path.exists():
        raise AuditUnavailable(f"audit file {path} does not exist")
    try:
        # timeout= is the busy timeout from the very first statement on
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                               timeout=open_timeout_ms / 1000)
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot open audit file {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout={int(open_timeout_ms)}")
        if create:
            _wal(conn, path, open_timeout_ms / 1000)
        conn.execute("PRAGMA synchronous=FULL")
        if create:
            _create(conn)
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        conn.close()
        raise AuditUnavailable(f"cannot open audit file {path}: {exc}") from exc
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


class MigrationRefused(Exception):
    """The file holds rows the constrained schema forbids: evidence, not to be discarded."""


def migrate_file(path: Path) -> str:
    """Bring the file to the current schema; returns "created", "upgraded" or "present".

    The upgrade rebuilds the table with its constraints in one transaction.
    Rows the new schema forbids (no chain, seq NULL, 0, negative or not an
    integer) are never dropped: the upgrade is refused and names them.
    """
    fresh = not path.exists()
    conn = connect(path, create=True)
    try:
        if schema_version(conn) >= SCHEMA_VERSION:
            return "created" if fresh else "present"
        conn.execute("BEGIN IMMEDIATE")
        try:
            stray = conn.execute(_STRAY_SQL, (20,)).fetchall()
            if stray:
                listed = ", ".join(f"rowid {r} (chain {c!r}, seq {s!r})" for r, c, s in stray)
                raise MigrationRefused(
                    f"{path} holds rows outside any chain position: {listed}; they are "
                    "evidence of tampering (run `casf-proxy audit verify`); the file is left "
                    "as it is")
            conn.execute("DROP TABLE IF EXISTS audit_events_v2")
            conn.execute(_table("audit_events_v2"))
            cols = ", ".join((*FIELDS, "extra"))
            conn.execute(f"INSERT INTO audit_events_v2 ({cols}) SELECT {cols} "  # noqa: S608
                         "FROM audit_events ORDER BY chain_id, seq")
            conn.execute("DROP TABLE audit_events")
            conn.execute("ALTER TABLE audit_events_v2 RENAME TO audit_events")
            for sql in _INDEXES:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return "upgraded"
    finally:
        conn.close()


_SELECT = f"SELECT {', '.join(FIELDS)}, extra FROM audit_events"  # noqa: S608 - fixed names


class SqliteReader:
    """Read-only access for ``audit verify`` / ``digest`` / ``export`` (one read transaction).

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

    def _refresh(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.execute("BEGIN")

    async def refresh(self) -> None:
        """End the snapshot and start a new one (sees what was committed since)."""
        await asyncio.to_thread(self._refresh)

    def _chains(self, chain: str | None, since: str | None, until: str | None
                ) -> list[tuple[str, int, int]]:
        where: list[str] = ["typeof(chain_id) = 'text'"]
        args: list[Any] = []
        for cond, value in (("ts >= ?", since), ("ts < ?", until), ("chain_id = ?", chain)):
            if value is not None:
                where.append(cond)
                args.append(value)
        windowed = since is not None or until is not None
        good = "CASE WHEN typeof(seq) = 'integer' THEN seq END"
        sql = ("SELECT chain_id, " + (f"min({good})" if windowed else "1")  # noqa: S608
               + f", max({good}) FROM audit_events WHERE " + " AND ".join(where)
               + " GROUP BY chain_id ORDER BY chain_id")
        out = []
        for c, lo, hi in self.conn.execute(sql, args):
            if windowed and (lo is None or hi is None):
                continue
            out.append((str(c), int(lo), int(hi) if hi is not None else 0))
        return out

    async def chains(self, chain: str | None, since: str | None, until: str | None
                     ) -> list[tuple[str, int, int]]:
        return await asyncio.to_thread(self._chains, chain, since, until)

    def _strays(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT rowid, chain_id, seq, event_id FROM audit_events "
            "WHERE chain_id IS NULL OR typeof(chain_id) != 'text' ORDER BY rowid LIMIT 20"
        ).fetchall()
        return [f"row {r} (chain_id {'NULL' if c is None else repr(c)}, seq {s!r}, event {e}) "
                "belongs to no chain (record inserted)" for r, c, s, e in rows]

    async def strays(self) -> list[str]:
        """Rows that belong to no chain (none in a file of the current schema)."""
        return await asyncio.to_thread(self._strays)

    async def records(self, chain_id: str, lo: int | None = None, hi: int | None = None
                      ) -> AsyncGenerator[StoredRecord, None]:
        """The chain's records by seq; without bounds every row of the chain, whatever its seq."""
        if lo is None and hi is None:
            sql = _SELECT + " WHERE chain_id = ? ORDER BY seq, rowid"
            args: tuple[Any, ...] = (chain_id,)
        else:
            sql = _SELECT + " WHERE chain_id = ? AND seq BETWEEN ? AND ? ORDER BY seq"
            args = (chain_id, 1 if lo is None else lo, 2**63 - 1 if hi is None else hi)
        cur = await asyncio.to_thread(self.conn.execute, sql, args)
        while True:
            rows = await asyncio.to_thread(cur.fetchmany, self.chunk)
            if not rows:
                return
            for row in rows:
                yield from_row(row)

    async def record_at(self, chain_id: str, seq: int) -> StoredRecord | None:
        sql = _SELECT + " WHERE chain_id = ? AND seq = ?"
        cur = await asyncio.to_thread(self.conn.execute, sql, (chain_id, seq))
        row = await asyncio.to_thread(cur.fetchone)
        return from_row(row) if row is not None else None


class SqliteAuditSink(QueuedSink):
    """One chain (``chain_id``) in a SQLite file, appended by a single writer task.

    ``spool_dir`` (default: ``<file name>.spool`` next to the file) holds the
    chain's spool; ``queue_max`` bounds the records waiting for the writer.
    """

    def __init__(self, path: Path, chain_id: str, *, batch_max: int = 256,
                 batch_wait_s: float = 0.0, timeout_s: float = 2.0,
                 queue_max: int = DEFAULT_QUEUE_MAX, spool_dir: Path | None = None,
                 on_full: Callable[[], None] | None = None, retry_s: float = 1.0) -> None:
        self.path = path
        self.chain_id = chain_id
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._init_queue(queue_max, on_full)
        self.spool_dir = (spool_dir if spool_dir is not None
                          else path.parent / f"{path.name}.spool")
        self._spool = Spool(spool_file(self.spool_dir, chain_id), queue_max)
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

    @property
    def spooled(self) -> int:
        """Records waiting in the local spool for the file to commit again."""
        return len(self._spool)

    def _head(self) -> tuple[int, str]:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT seq, hash FROM audit_events WHERE chain_id = ? AND typeof(seq) = 'integer' "
            "ORDER BY seq DESC LIMIT 1", (self.chain_id,)).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def _open(self) -> tuple[int, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # give up on a locked file before the waiters do, so a refused request's
        # record is (almost always) not committed after the refusal
        self._conn = connect(self.path, create=True,
                             busy_timeout_ms=max(1, int(self.timeout_s * 500)))
        if schema_version(self._conn) < SCHEMA_VERSION:
            log.warning("audit file %s has the schema of an earlier version (no constraints "
                        "on chain positions): run `casf-proxy audit migrate -c FILE`", self.path)
        try:
            self._spool.open()
        except SpoolError as exc:
            if exc.in_use:
                self._conn.close()
                self._conn = None
                raise
            log.error("audit: %s; running without a spool (a record nobody waits for is "
                      "lost when its commit fails)", exc)
            self._spool.disable(str(exc))
        return self._head()

    async def start(self) -> None:
        """Open the file, resume this chain from its last committed record, replay the spool."""
        try:
            self._seq, self._prev = await self._run(self._open)
        except SpoolError as exc:
            raise AuditUnavailable(str(exc)) from exc
        self._ok = True
        if self._spool.pending:
            try:
                await self._run(self._replay)
            except sqlite3.Error as exc:
                self._ok = False
                log.warning("audit: %d spooled record(s) not written yet: %s", len(self._spool),
                            exc)
            else:
                log.warning("audit: spooled records written to chain %r (now at seq %d)",
                            self.chain_id, self._seq)
        self._writer = spawn(self._write_loop(), name="casf-audit-writer")

    async def close(self) -> None:
        """Flush queued records (bounded), then stop the writer and close the file."""
        await self._stop_writer()
        await self._failed(self._leftovers(), "the audit writer stopped")
        if self._conn is not None:
            await self._run(self._conn.close)
        await self._run(self._spool.close)
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

    def _prepare_replay(self) -> tuple[list[tuple[Any, ...]], int, str]:
        """The spooled records sealed onto the chain head, their marker written.

        A replay of unknown outcome is settled first. Returns the rows to
        commit (before anything newer) and the head after them.
        """
        assert self._conn is not None
        sp = self._spool
        if sp.marker is not None:
            cur = self._conn.execute(
                _SELECT + " WHERE chain_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (self.chain_id, sp.marker, sp.marker + sp.covered))
            if sp.resolve([from_row(r) for r in cur.fetchall()]):
                log.warning("audit: the last spool replay of chain %r had committed",
                            self.chain_id)
        head, prev = self._head()
        if not sp.entries:
            sp.committed()
            self._seq, self._prev = head, prev
            return [], head, prev
        rows = []
        seq = head
        for entry in sp.entries:
            record = seal(dict(entry), self.chain_id, seq + 1, prev)
            rows.append(to_row(record))
            seq, prev = seq + 1, record["hash"]
        sp.begin(head)
        return rows, seq, prev

    def _replay(self) -> None:
        """Write the spooled records to the chain on their own (no newer record waits)."""
        rows, seq, prev = self._prepare_replay()
        if rows:
            self._commit(rows)
            self._spool.committed()
            self._seq, self._prev = seq, prev

    async def _next(self) -> Pending | None:
        """The next queued record; with records spooled, wake up to retry the file."""
        if not self._spool.pending:
            return await self._queue.get()
        try:
            async with asyncio.timeout(self.retry_s):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def _write_loop(self) -> None:
        q = self._queue
        while True:
            first = await self._next()
            if first is None:
                with contextlib.suppress(sqlite3.Error):
                    await self._run(self._replay)
                    self._ok = True
                continue
            batch = [first]
            if self.batch_wait_s > 0 and q.empty():
                await asyncio.sleep(self.batch_wait_s)
            while len(batch) < self.batch_max and not q.empty():
                batch.append(q.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    q.task_done()

    async def _write(self, batch: list[Pending]) -> None:
        seq, prev = self._seq, self._prev
        rows: list[tuple[Any, ...]] = []
        spooled = 0
        if self._spool.pending:  # older records first, in the same transaction
            try:
                rows, seq, prev = await self._run(self._prepare_replay)
            except Exception as exc:
                self._ok = False
                await self._failed(batch, f"audit commit failed: {exc}")
                return
            spooled = len(rows)
        receipts: list[AuditReceipt | None] = []
        for record, fut, _ in batch:
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
            await self._failed([e for e, r in zip(batch, receipts, strict=True)
                                if r is not None], f"audit commit failed: {exc}")
        else:
            self._ok = True
            self._seq, self._prev = seq, prev
            for (_, fut, _), receipt in zip(batch, receipts, strict=True):
                if receipt is not None and not fut.done():
                    fut.set_result(receipt)
        finally:
            self._committing_since = None
        if spooled and self._ok:
            await self._run(self._spool.committed)
            log.warning("audit: %d spooled record(s) written to chain %r", spooled,
                        self.chain_id)

    async def _failed(self, batch: list[Pending], error: str) -> None:
        """A batch not committed: waiters get AuditUnavailable, append_later records the spool."""
        later = [(r, f) for r, f, is_later in batch if is_later and not f.done()]
        taken = 0
        if later:
            try:
                taken = await self._run(self._spool.add, [r for r, _ in later])
            except Exception:
                log.exception("audit: cannot write the spool %s", self._spool.path)
        for i, (_, fut) in enumerate(later):
            if not fut.done():
                fut.set_exception(AuditSpooled(f"{error}; kept in the local spool") if i < taken
                                  else AuditUnavailable(error))
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(AuditUnavailable(error))
