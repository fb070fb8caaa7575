"""Several processes opening one fresh SQLite audit file at once all start.

``run --workers N`` starts N processes that open the same file, each for its
own chain. Switching a new file to WAL and creating its schema take the
file's write lock; a process that met the lock before its busy timeout was
set failed with ``database is locked`` (and was restarted by the
supervisor). Here rounds of processes, forked together and released at the
same instant, open a fresh file and append to their own chain; every one
must start, and the file must verify.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

from proxy.audit.sqlite import SqliteAuditSink, SqliteReader
from proxy.audit.verify import check_chains
from tests.conftest import ROOT

ROUNDS, PROCS = 30, 4

SCRIPT = r"""
import asyncio, os, sys, time
from pathlib import Path
from proxy.audit.sqlite import SqliteAuditSink

base, rounds, procs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

async def one(path, chain, start):
    sink = SqliteAuditSink(path, chain, timeout_s=2)
    while time.time() < start:  # released together, everything but the open done
        pass
    await sink.start()
    try:
        await sink.append({"event_id": chain, "kind": "decision"})
    finally:
        await sink.close()

failures = 0
for r in range(rounds):
    path = base / f"round-{r}.db"
    start = time.time() + 0.15
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(one(path, f"w{i}", start))
            except Exception as exc:
                print(f"round {r} worker {i}: {exc}", flush=True)
                os._exit(1)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failures += os.waitstatus_to_exitcode(status) != 0
print(f"failures {failures}")
"""


async def test_workers_opening_a_fresh_file_together_all_start(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(ROUNDS), str(PROCS)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("failures 0"), res.stdout[-3000:] + res.stderr[-2000:]
    for r in range(ROUNDS):
        async with SqliteReader.open(tmp_path / f"round-{r}.db") as reader:
            results = [c async for c in check_chains(reader)]
        assert sorted(c.chain_id for c in results) == [f"w{i}" for i in range(PROCS)]
        assert all(c.broken is None and c.check.count == 1 for c in results)


async def test_a_file_another_process_is_setting_up_is_waited_for(tmp_path: Path) -> None:
    """The interleaving of the race, made certain: another connection is in the middle of
    setting up the new file (it holds its write lock) when the sink opens it. The switch
    to WAL cannot wait in SQLite's busy handler there; the sink must wait, not fail."""
    db = tmp_path / "a.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE setup_in_progress (x)")
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, other.execute, "COMMIT")
    sink = SqliteAuditSink(db, "w0", timeout_s=2)
    try:
        await sink.start()
        receipt = await sink.append({"event_id": "e1", "kind": "decision"})
    finally:
        await sink.close()
        other.close()
    assert receipt.seq == 1
    async with SqliteReader.open(db) as reader:
        results = [c async for c in check_chains(reader)]
    assert [(c.chain_id, c.broken, c.check.count) for c in results] == [("w0", None, 1)]
