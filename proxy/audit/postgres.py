"""Durable audit store on PostgreSQL: per-instance chains, group commit, a chain lease.

Writing (:class:`PostgresAuditSink`)
    Requests hand their record to :meth:`PostgresAuditSink.append` and wait.
    One writer task drains whatever is queued (up to ``batch_max``, after at
    most ``batch_wait_ms``), seals the records into this instance's chain and
    writes them with one binary ``COPY`` — a single statement, so the whole
    batch commits atomically in one transaction and one round trip. Only
    then are the waiters resolved; a failed batch resolves every waiter with
    :class:`AuditUnavailable` (the pipeline answers 503 ``Audit_Unavailable``
    and forwards nothing).

    The chain is leased: the writer connection holds the session advisory
    lock ``pg_try_advisory_lock(hashtextextended('casf.audit:' || chain_id, 0))``
    and every batch is written **on that same connection**. A write is
    therefore only possible while the lease is held; when the connection
    dies the lease dies with it, and a reconnect must take the lease again
    (which waits until the old server backend is gone, i.e. until its last
    statement committed or rolled back) and re-read the chain head before
    writing. So an acknowledged record is never lost, and a batch whose
    outcome was uncertain (connection lost during the commit) leaves neither
    a gap nor a fork: the next batch continues from whatever the database
    holds. ``UNIQUE (chain_id, seq)`` is the last line of defence.

    Every database call is bounded (connect, lease, head, COPY: the audit
    ``timeout_ms``; the server-side ``statement_timeout`` as well). While the
    database is unreachable the writer retries in the background about once
    a second, so ``/healthz`` recovers without traffic and without a restart.

Reading (:class:`PostgresReader`)
    ``audit verify`` and ``audit digest`` read one consistent snapshot
    (a read-only REPEATABLE READ transaction) through a server-side cursor,
    so memory stays bounded however long the chains are.

Schema: ``proxy/audit/sql/*.sql`` (identical to the operator copy in
``deploy/sql/``), applied by :func:`migrate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from proxy.audit.chain import GENESIS, StoredRecord, seal
from proxy.audit.records import FIELDS
from proxy.audit.spool import AuditSpooled, Spool, SpoolError, spool_file
from proxy.audit.waiting import DEFAULT_QUEUE_MAX, Pending, QueuedSink
from proxy.canonical import canonical_json
from proxy.ports import AuditReceipt, AuditUnavailable
from proxy.tasks import spawn

log = logging.getLogger("casf.audit")

TABLE = "audit_events"
COLUMNS = (*FIELDS, "extra")
LEASE_PREFIX = "casf.audit:"
MAX_SLOTS = 64

_JSON = frozenset({"reason_codes", "attrs"})
_INT_RANGE = {"seq": (1, 2**63 - 1), "status": (-(2**31), 2**31 - 1)}
_LEASE_SQL = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_HEAD_SQL = f"SELECT seq, hash FROM {TABLE} WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1"  # noqa: S608
_HOLDER_SQL = """
WITH k AS (SELECT hashtextextended($1, 0) AS k)
SELECT a.pid, a.application_name, a.client_addr::text AS client_addr
FROM k, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = ((k.k >> 32) & 4294967295)::oid AND l.objid = (k.k & 4294967295)::oid
LIMIT 1
"""


class AuditStartError(RuntimeError):
    """The PostgreSQL audit store cannot be used (connectivity, schema, or lease)."""


# ------------------------------------------------------------------ rows


def _fits(field: str, value: Any) -> bool:
    """Whether ``value`` is stored in its own column exactly as it was hashed."""
    if field in _JSON:
        return True
    if field in _INT_RANGE:
        lo, hi = _INT_RANGE[field]
        return type(value) is int and lo <= value <= hi
    if type(value) is not str or "\x00" in value:
        return False
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def to_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """A sealed record as a row of :data:`COLUMNS`.

    A value that does not fit its column's type (which the proxy never
    produces, but a record must never be refused for it) is kept in
    ``extra`` under its own name, with its column NULL: the hashed record is
    reproduced exactly, and :func:`from_row` accepts nothing else there.
    """
    extra = {k: v for k, v in record.items() if k not in FIELDS}
    values: list[Any] = []
    for f in FIELDS:
        v = record.get(f)
        if v is not None and f in _JSON:
            v = canonical_json(v).decode()
        elif v is not None and not _fits(f, v):
            extra[f] = v
            v = None
        values.append(v)
    values.append(canonical_json(extra).decode())
    return tuple(values)


def from_row(row: Any) -> StoredRecord:
    """The record a reader of the row sees, from a row of :data:`COLUMNS`.

    A column's field may appear in ``extra`` only the way :func:`to_row`
    puts it there: its column NULL and a value the column cannot hold. A
    field in both places, or in ``extra`` although its column could hold it
    (or a JSON field, or null), is an inconsistent row: tampering.
    """
    record: dict[str, Any] = {}
    problems: list[str] = []
    for f in FIELDS:
        v = row[f]
        record[f] = orjson.loads(v) if f in _JSON and v is not None else v
    extra = orjson.loads(row["extra"]) if row["extra"] is not None else None
    if not isinstance(extra, dict):
        problems.append("column extra is not a JSON object")
        extra = {}
    both = sorted(k for k in extra if k in record and record[k] is not None)
    if both:
        problems.append(f"field(s) {', '.join(both)} stored in extra as well as in their "
                        "column(s)")
    misplaced = sorted(k for k in extra if k in record and record[k] is None
                       and (extra[k] is None or _fits(k, extra[k])))
    if misplaced:
        problems.append(f"field(s) {', '.join(misplaced)} stored in extra although their "
                        "column(s) could hold them")
    for k, v in extra.items():
        if k not in record or record[k] is None:
            record[k] = v
    return StoredRecord(record, "; ".join(problems) or None)


def _lease_key(chain_id: str) -> str:
    return LEASE_PREFIX + chain_id


async def _close(conn: Any, timeout_s: float = 5.0) -> None:
    """Close gracefully (releasing session locks at once), or drop the socket."""
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), timeout=timeout_s)
    except Exception:
        conn.terminate()


# ------------------------------------------------------------------ sink


@dataclass(slots=True)
class _Writer:
    conn: Any  # asyncpg.Connection holding the chain lease
    lost: bool = False


class PostgresAuditSink(QueuedSink):
    """This instance's chain in ``audit_events``, appended by a single writer task.

    ``chain_id`` ``None`` picks the chain automatically: ``{host}-{n}`` with
    the lowest worker slot ``n`` (0..63) whose lease is free, so several
    processes on one host (or pod) each get their own stable chain. An
    explicit ``chain_id`` whose lease is held elsewhere refuses to start.
    """

    def __init__(self, dsn: str, chain_id: str | None, *, host: str = "casf",
                 batch_max: int = 256, batch_wait_s: float = 0.0, timeout_s: float = 2.0,
                 retry_s: float = 1.0, queue_max: int = DEFAULT_QUEUE_MAX,
                 spool_dir: Path | None = None,
                 on_full: Callable[[], None] | None = None) -> None:
        self.dsn = dsn
        self._explicit = chain_id
        self.host = host
        self.chain_id = chain_id or ""
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._init_queue(queue_max, on_full)
        # None: no spool (an append_later record of a failed batch is refused)
        self.spool_dir = spool_dir
        self._spool: Spool | None = None
        self._w: _Writer | None = None
        self._seq = 0
        self._prev = GENESIS
        self._writer: asyncio.Task[None] | None = None
        self._ok = False
        self._committing_since: float | None = None
        self._last_attempt = 0.0
        self._last_error = ""
        self.batches = 0  # committed batches (group commit: usually far fewer than records)

    # ---------------------------------------------------------- connection

    async def _connect(self) -> Any:
        ms = str(max(1, int(self.timeout_s * 1000)))
        return await asyncpg.connect(
            self.dsn, timeout=self.timeout_s, command_timeout=self.timeout_s,
            statement_cache_size=16,
            # keepalives: if this proxy vanishes without closing the socket (a
            # network partition), the server drops the session, and its chain
            # lease, within about 25 s instead of the kernel's default 2 h
            server_settings={"application_name": "casf-proxy audit",
                             "statement_timeout": ms, "lock_timeout": ms,
                             "idle_in_transaction_session_timeout": ms,
                             "tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                             "tcp_keepalives_count": "3"})

    async def _take_lease(self, conn: Any, chain_id: str) -> bool:
        return bool(await conn.fetchval(_LEASE_SQL, _lease_key(chain_id),
                                        timeout=self.timeout_s))

    async def _holder(self, conn: Any, chain_id: str) -> str:
        try:
            row = await conn.fetchrow(_HOLDER_SQL, _lease_key(chain_id), timeout=self.timeout_s)
        except (asyncpg.PostgresError, OSError, TimeoutError):
            return "another session"
        if row is None:
            return "another session"
        return (f"backend pid {row['pid']} ({row['application_name'] or 'no application name'}"
                f"{', from ' + row['client_addr'] if row['client_addr'] else ''})")

    async def _head(self, conn: Any) -> tuple[int, str]:
        row = await conn.fetchrow(_HEAD_SQL, self.chain_id, timeout=self.timeout_s)
        return (int(row["seq"]), str(row["hash"])) if row else (0, GENESIS)

    def _watch(self, conn: Any) -> _Writer:
        w = _Writer(conn)

        def lost(_: Any) -> None:
            w.lost = True
            if self._w is w:
                self._ok = False
                self._last_error = "connection to PostgreSQL lost"
                log.warning("audit: connection to PostgreSQL lost (chain %r lease released)",
                            self.chain_id)

        conn.add_termination_listener(lost)
        return w

    async def _drop(self) -> None:
        w, self._w = self._w, None
        if w is not None and not w.conn.is_closed():
            w.conn.terminate()  # releases the lease once the server notices

    async def start(self) -> None:
        """Connect, take this chain's lease and resume it from its last committed record."""
        try:
            conn = await self._connect()
        except (OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            raise AuditStartError(f"cannot connect to the PostgreSQL audit store (PG_DSN): "
                                  f"{exc}") from exc
        try:
            try:
                await conn.fetchval(f"SELECT 1 FROM {TABLE} LIMIT 0", timeout=self.timeout_s)  # noqa: S608
            except asyncpg.UndefinedTableError as exc:
                raise AuditStartError(f"table {TABLE} does not exist in the PostgreSQL audit "
                                      "store: run `casf-proxy audit migrate -c FILE` as the "
                                      "schema owner") from exc
            except asyncpg.InsufficientPrivilegeError as exc:
                raise AuditStartError(f"no SELECT on {TABLE}: grant casf_audit_writer to the "
                                      "PG_DSN user") from exc
            candidates = ([self._explicit] if self._explicit else
                          [f"{self.host}-{n}" for n in range(MAX_SLOTS)])
            for candidate in candidates:
                if await self._take_lease(conn, candidate):
                    self.chain_id = candidate
                    break
            else:
                if self._explicit:
                    who = await self._holder(conn, self._explicit)
                    raise AuditStartError(
                        f"audit chain {self._explicit!r} is already being written by {who}: "
                        "two writers would fork it; give each process its own audit.chain_id "
                        "(or leave it unset to pick a free worker slot)")
                raise AuditStartError(f"all {MAX_SLOTS} worker chains {self.host}-0.."
                                      f"{self.host}-{MAX_SLOTS - 1} are leased; "
                                      "set audit.chain_id")
            await conn.execute("SELECT set_config('application_name', $1, false)",
                               f"casf-proxy audit {self.chain_id}"[:63], timeout=self.timeout_s)
            self._seq, self._prev = await self._head(conn)
        except AuditStartError:
            conn.terminate()
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise AuditStartError(f"PostgreSQL audit store: {exc}") from exc
        if self.spool_dir is not None:
            spool = Spool(spool_file(self.spool_dir, self.chain_id), self.queue_max)
            try:
                await asyncio.to_thread(spool.open)
            except SpoolError as exc:
                if exc.in_use:
                    conn.terminate()
                    raise AuditStartError(str(exc)) from exc
                log.error("audit: %s; running without a spool (a record nobody waits for is "
                          "lost when its commit fails)", exc)
                spool.disable(str(exc))
            self._spool = spool
        self._w = self._watch(conn)
        self._ok = True
        log.warning("audit on PostgreSQL: chain %r resumes after seq %d", self.chain_id,
                    self._seq)
        if self._spool is not None and self._spool.pending:
            try:
                await self._replay(self._w)
            except AuditUnavailable as exc:
                log.warning("audit: %d spooled record(s) not written yet: %s",
                            len(self._spool), exc)
        self._writer = spawn(self._write_loop(), name="casf-audit-pg-writer")

    @property
    def spooled(self) -> int:
        """Records waiting in the local spool for the store to commit again."""
        return len(self._spool) if self._spool is not None else 0

    async def _prepare_replay(self, w: _Writer) -> tuple[list[tuple[Any, ...]], int, str]:
        """The spooled records sealed onto the chain head, their marker written.

        A replay whose outcome is unknown is settled first (the records after
        its marker are read back). Returns the rows to write before anything
        newer, and the head after them; raises :class:`AuditUnavailable` (the
        connection dropped) when the store cannot be read.
        """
        sp = self._spool
        if sp is None or not sp.pending:
            return [], self._seq, self._prev
        try:
            if sp.marker is not None:
                stored = await w.conn.fetch(
                    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE chain_id = $1 "  # noqa: S608
                    "AND seq > $2 AND seq <= $3 ORDER BY seq", self.chain_id, sp.marker,
                    sp.marker + sp.covered, timeout=self.timeout_s)
                if await asyncio.to_thread(sp.resolve, [from_row(r) for r in stored]):
                    log.warning("audit: the last spool replay of chain %r had committed",
                                self.chain_id)
            if not sp.entries:
                await asyncio.to_thread(sp.committed)
                return [], self._seq, self._prev
            seq, prev = self._seq, self._prev
            rows = []
            for entry in sp.entries:
                record = seal(dict(entry), self.chain_id, seq + 1, prev)
                rows.append(to_row(record))
                seq, prev = seq + 1, record["hash"]
            await asyncio.to_thread(sp.begin, self._seq)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._ok = False
            self._last_error = f"spool replay failed: {type(exc).__name__}: {exc}"
            await self._drop()
            raise AuditUnavailable(self._last_error) from exc
        return rows, seq, prev

    async def _replay(self, w: _Writer) -> None:
        """Write the spooled records to the chain on their own (no newer record waits)."""
        rows, seq, prev = await self._prepare_replay(w)
        if not rows:
            return
        self._committing_since = time.monotonic()
        try:
            await w.conn.copy_records_to_table(TABLE, records=rows, columns=COLUMNS,
                                               timeout=self.timeout_s * 0.8)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._ok = False
            self._last_error = f"spool replay failed: {type(exc).__name__}: {exc}"
            await self._drop()
            raise AuditUnavailable(self._last_error) from exc
        finally:
            self._committing_since = None
        self._seq, self._prev = seq, prev
        self.batches += 1
        await self._spool_written(len(rows))

    async def _spool_written(self, n: int) -> None:
        if self._spool is not None:
            await asyncio.to_thread(self._spool.committed)
        log.warning("audit: %d spooled record(s) written to chain %r (now at seq %d)",
                    n, self.chain_id, self._seq)

    async def _reconnect(self) -> _Writer:
        """A connection holding the lease, with the chain head re-read (after any failure)."""
        if self._w is not None and not self._w.lost and not self._w.conn.is_closed():
            return self._w
        await self._drop()
        now = time.monotonic()
        if now - self._last_attempt < min(self.retry_s, 0.25):
            raise AuditUnavailable(f"audit store unavailable: {self._last_error}")
        self._last_attempt = now
        try:
            conn = await self._connect()
        except Exception as exc:
            self._last_error = f"cannot connect: {exc}"
            raise AuditUnavailable(self._last_error) from exc
        try:
            if not await self._take_lease(conn, self.chain_id):
                self._last_error = (f"chain {self.chain_id!r} lease is held by "
                                    f"{await self._holder(conn, self.chain_id)}")
                raise AuditUnavailable(self._last_error)
            await conn.execute("SELECT set_config('application_name', $1, false)",
                               f"casf-proxy audit {self.chain_id}"[:63], timeout=self.timeout_s)
            seq, prev = await self._head(conn)
        except AuditUnavailable:
            conn.terminate()
            raise
        except Exception as exc:
            conn.terminate()
            self._last_error = f"cannot resume chain: {exc}"
            raise AuditUnavailable(self._last_error) from exc
        if seq < self._seq:
            log.error("audit: chain %r head in PostgreSQL is seq %d but seq %d was committed "
                      "earlier: acknowledged records are missing from the database "
                      "(restored backup or failover?); continuing from the database's head",
                      self.chain_id, seq, self._seq)
        elif (seq, prev) != (self._seq, self._prev):
            log.warning("audit: chain %r resumes at seq %d (the interrupted batch committed)",
                        self.chain_id, seq)
        self._seq, self._prev = seq, prev
        self._w = self._watch(conn)
        log.warning("audit: PostgreSQL reachable again; chain %r resumes after seq %d",
                    self.chain_id, seq)
        return self._w

    # ---------------------------------------------------------- the port

    async def healthy(self) -> bool:
        """Connected with the lease, last batch committed, no commit pending past the timeout."""
        if self._writer is None or self._writer.done() or not self._ok:
            return False
        w = self._w
        if w is None or w.lost or w.conn.is_closed():
            return False
        since = self._committing_since
        return since is None or time.monotonic() - since <= self.timeout_s

    async def close(self) -> None:
        """Flush queued records (bounded), stop the writer, release the lease."""
        await self._stop_writer()
        await self._failed(self._leftovers(), "the audit writer stopped")
        w, self._w = self._w, None
        if w is not None:
            await _close(w.conn, self.timeout_s)
        spool, self._spool = self._spool, None
        if spool is not None:
            await asyncio.to_thread(spool.close)

    # ---------------------------------------------------------- the writer

    async def _next(self) -> Pending | None:
        """The next queued record; while disconnected, wake up to retry the connection."""
        if self._w is not None and not self._w.lost:
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
                with contextlib.suppress(AuditUnavailable):
                    w = await self._reconnect()
                    await self._replay(w)
                    self._ok = True
                continue
            batch = [first]
            if self.batch_wait_s > 0 and q.empty():
                await asyncio.sleep(self.batch_wait_s)
            while len(batch) < self.batch_max and not q.empty():
                batch.append(q.get_nowait())
            try:
                # a waiter that already gave up (timed out) is not written: its
                # request was refused, so its record must not claim otherwise
                live = [e for e in batch if not e[1].done()]
                if live:
                    await self._write(live)
            except Exception:  # never let the writer die: the next batch starts afresh
                log.exception("audit: unexpected error in the writer")
                self._ok = False
                await self._drop()
                await self._failed(batch, "audit writer error")
            finally:
                for _ in batch:
                    q.task_done()

    async def _failed(self, batch: list[Pending], error: str) -> None:
        """A batch not committed: waiters get AuditUnavailable, append_later records the spool."""
        later = [(r, f) for r, f, is_later in batch if is_later and not f.done()]
        taken = 0
        if later and self._spool is not None:
            try:
                taken = await asyncio.to_thread(self._spool.add, [r for r, _ in later])
            except Exception:
                log.exception("audit: cannot write the spool %s", self._spool.path)
        for i, (_, fut) in enumerate(later):
            if not fut.done():
                fut.set_exception(AuditSpooled(f"{error}; kept in the local spool") if i < taken
                                  else AuditUnavailable(error))
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(AuditUnavailable(error))

    async def _write(self, live: list[Pending]) -> None:
        try:
            w = await self._reconnect()
            # older records first, in the same COPY: the chain keeps their order
            rows, seq, prev = await self._prepare_replay(w)
        except AuditUnavailable as exc:
            self._ok = False
            await self._failed(live, str(exc))
            return
        spooled = len(rows)
        live = [e for e in live if not e[1].done()]  # waiters may give up meanwhile
        done: list[tuple[Pending, AuditReceipt]] = []
        for entry in live:
            record, fut, _ = entry
            try:
                for f in FIELDS:
                    record.setdefault(f, None)
                seal(record, self.chain_id, seq + 1, prev)
                row = to_row(record)
            except Exception as exc:  # e.g. a value canonical JSON cannot represent
                log.error("audit: record cannot be serialised (%s); request refused",
                          type(exc).__name__)
                if not fut.done():
                    fut.set_exception(AuditUnavailable("audit record cannot be serialised"))
                continue
            seq += 1
            prev = record["hash"]
            rows.append(row)
            done.append((entry, AuditReceipt(self.chain_id, seq, prev)))
        if not rows:
            return
        self._committing_since = time.monotonic()
        try:
            await w.conn.copy_records_to_table(TABLE, records=rows, columns=COLUMNS,
                                               timeout=self.timeout_s * 0.8)
        except Exception as exc:
            # the outcome may be unknown (lost connection, timeout): drop the
            # connection and its lease; the next batch re-reads the chain head
            self._ok = False
            self._last_error = f"commit failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, asyncpg.UniqueViolationError):
                log.error("audit: chain %r position already taken (another writer without "
                          "the lease?); re-reading the chain head", self.chain_id)
            else:
                log.warning("audit: batch of %d not committed: %s", len(rows), self._last_error)
            await self._drop()
            await self._failed([e for e, _ in done], self._last_error)
        else:
            self._ok = True
            self._seq, self._prev = seq, prev
            self.batches += 1
            for (_, fut, _), receipt in done:
                if not fut.done():
                    fut.set_result(receipt)
        finally:
            self._committing_since = None
        if spooled and self._ok:
            await self._spool_written(spooled)


# ------------------------------------------------------------------ reading


class PostgresReader:
    """Read-only access for ``audit verify`` / ``digest`` / ``export`` (one snapshot)."""

    def __init__(self, conn: Any, prefetch: int = 1000) -> None:
        self.conn = conn
        self.prefetch = prefetch
        self._tx: Any = None

    async def _begin(self) -> None:
        self._tx = self.conn.transaction(isolation="repeatable_read", readonly=True)
        await self._tx.start()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, dsn: str, timeout_s: float = 10.0) -> AsyncIterator[PostgresReader]:
        conn = await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=60,
                                     server_settings={"application_name": "casf-proxy audit cli"})
        try:
            reader = cls(conn)
            await reader._begin()
            try:
                yield reader
            finally:
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError,
                                         OSError):
                    await reader._tx.rollback()
        finally:
            await _close(conn)

    async def refresh(self) -> None:
        """End the snapshot and start a new one (sees what was committed since)."""
        await self._tx.rollback()
        await self._begin()

    async def chains(self, chain: str | None, since: str | None, until: str | None
                     ) -> list[tuple[str, int, int]]:
        """(chain_id, first seq, last seq) to check, ordered by chain_id.

        Without a window a chain is checked from seq 1 (so a deleted first
        record shows); with one, from its first record in the window.
        """
        if since is None and until is None:
            if chain is not None:
                ids = [chain]
            else:
                ids = [r["chain_id"] for r in await self.conn.fetch(_CHAIN_IDS)]
            out = []
            for cid in ids:
                last = await self.conn.fetchval(
                    f"SELECT max(seq) FROM {TABLE} WHERE chain_id = $1", cid)  # noqa: S608
                if last is not None:
                    out.append((cid, 1, int(last)))
            return out
        where: list[str] = []
        args: list[Any] = []
        for cond, value in (("ts >= ", since), ("ts < ", until), ("chain_id = ", chain)):
            if value is not None:
                args.append(value)
                where.append(f"{cond}${len(args)}")
        rows = await self.conn.fetch(
            f"SELECT chain_id, min(seq) AS lo, max(seq) AS hi FROM {TABLE} "  # noqa: S608
            f"WHERE {' AND '.join(where)} GROUP BY chain_id ORDER BY chain_id", *args)
        return [(r["chain_id"], int(r["lo"]), int(r["hi"])) for r in rows]

    async def strays(self) -> list[str]:
        """Rows that belong to no chain: the schema (NOT NULL chain_id) allows none."""
        return []

    async def records(self, chain_id: str, lo: int | None = None, hi: int | None = None
                      ) -> AsyncGenerator[StoredRecord, None]:
        """The chain's records by seq; without bounds every row of the chain."""
        if lo is None and hi is None:
            sql = (f"SELECT {', '.join(COLUMNS)} FROM {TABLE} "  # noqa: S608
                   "WHERE chain_id = $1 ORDER BY seq")  # seq is NOT NULL: the index order
            args: tuple[Any, ...] = (chain_id,)
        else:
            sql = (f"SELECT {', '.join(COLUMNS)} FROM {TABLE} "  # noqa: S608
                   "WHERE chain_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq")
            args = (chain_id, 1 if lo is None else lo, 2**63 - 1 if hi is None else hi)
        async for row in self.conn.cursor(sql, *args, prefetch=self.prefetch):
            yield from_row(row)

    async def record_at(self, chain_id: str, seq: int) -> StoredRecord | None:
        row = await self.conn.fetchrow(
            f"SELECT {', '.join(COLUMNS)} FROM {TABLE} "  # noqa: S608
            "WHERE chain_id = $1 AND seq = $2", chain_id, seq)
        return from_row(row) if row is not None else None


# distinct chain ids without reading the whole table (a loose index scan)
_CHAIN_IDS = f"""
WITH RECURSIVE c(chain_id) AS (
  (SELECT chain_id FROM {TABLE} ORDER BY chain_id LIMIT 1)
  UNION ALL
  SELECT (SELECT t.chain_id FROM {TABLE} t WHERE t.chain_id > c.chain_id
          ORDER BY t.chain_id LIMIT 1)
  FROM c WHERE c.chain_id IS NOT NULL
)
SELECT chain_id FROM c WHERE chain_id IS NOT NULL
"""  # noqa: S608


# ------------------------------------------------------------------ migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The schema files shipped in the package (``proxy/audit/sql/NNN_*.sql``), in order."""
    folder = resources.files("proxy.audit").joinpath("sql")
    out = [Migration(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8"))
           for p in folder.iterdir() if p.name.endswith(".sql")]
    return sorted(out, key=lambda m: m.version)


_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS casf_audit_migrations (
  version    text PRIMARY KEY,
  sha256     text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(dsn: str, timeout_s: float = 30.0) -> list[tuple[str, str]]:
    """Apply the schema files not applied yet; returns (version, "applied" | "present").

    One transaction, serialised against concurrent runs by an advisory lock.
    The files are idempotent themselves, so a lost bookkeeping row is harmless.
    """
    conn = await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=timeout_s,
                                 server_settings={"application_name": "casf-proxy migrate"})
    done: list[tuple[str, str]] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               "casf.audit.migrate")
            await conn.execute(_MIGRATIONS_TABLE)
            applied = {r["version"]: r["sha256"] for r in
                       await conn.fetch("SELECT version, sha256 FROM casf_audit_migrations")}
            for m in migrations():
                if m.version in applied:
                    if applied[m.version] != m.sha256:
                        log.warning("migration %s changed since it was applied; re-applying "
                                    "(the schema files are idempotent)", m.version)
                    else:
                        done.append((m.version, "present"))
                        continue
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO casf_audit_migrations (version, sha256) VALUES ($1, $2) "
                    "ON CONFLICT (version) DO UPDATE SET sha256 = EXCLUDED.sha256, "
                    "applied_at = now()", m.version, m.sha256)
                done.append((m.version, "applied"))
    finally:
        await _close(conn)
    return done
