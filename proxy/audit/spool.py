"""The local spool: records nobody waits for, kept on disk while the store is down.

A record handed to ``append_later`` (a refusal, an upstream outcome) has no
request waiting on it, so when its batch cannot be committed it is not given
up: the writer appends it to this chain's spool file (fsynced) and writes it
to the store, in order and on the chain, once the store commits again —
before any newer record, and at the next start if the process stopped
first.

One file per chain (``<spool_dir>/<chain>.spool``), JSON lines, locked by
the writing process (``flock``). A line is either a record as it will be
sealed (without ``chain_id``, ``seq``, ``prev_hash``, ``hash``)::

    {"record": {...}}

or a replay marker, written just before the spooled records are committed::

    {"replay_after": <head seq>}

The marker makes the replay exactly-once: if the commit's outcome is unknown
(the connection was lost during it, or the process died before the spool was
emptied), the next replay reads the store at the positions after
``replay_after`` and drops the records it finds there. A torn last line (the
process died while writing it) is cut off when the spool is opened; it was
never reported as spooled.

The spool holds at most ``max_records`` records; beyond that a record is
refused as before (its failure is counted and logged). All methods block:
call them off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from proxy.audit.chain import CHAIN_FIELDS
from proxy.audit.records import FIELDS
from proxy.canonical import canonical_json
from proxy.ports import AuditUnavailable


class AuditSpooled(AuditUnavailable):
    """Not committed yet, but kept in the local spool: written once the store is back."""


class SpoolError(Exception):
    """The spool cannot be used: its directory or file cannot be opened, or
    (``in_use``) another process holds it (two writers on one chain)."""

    def __init__(self, message: str, *, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use


_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def spool_file(directory: Path, chain_id: str) -> Path:
    """The chain's spool file; chain ids that are not plain file names are hashed."""
    if _SAFE.fullmatch(chain_id) and not chain_id.startswith("."):
        name = chain_id
    else:
        name = "chain-" + hashlib.sha256(chain_id.encode()).hexdigest()[:32]
    return directory / f"{name}.spool"


def unsealed(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its chain position, every fixed field present (null when
    absent, as the store reads it back): what the spool keeps and compares."""
    out: dict[str, Any] = {f: None for f in FIELDS if f not in CHAIN_FIELDS}
    out.update((k, v) for k, v in record.items() if k not in CHAIN_FIELDS)
    return out


class Spool:
    """One chain's spool file (see the module doc)."""

    def __init__(self, path: Path, max_records: int) -> None:
        self.path = path
        self.max_records = max_records
        self.entries: list[dict[str, Any]] = []
        self.marker: int | None = None  # head seq before a replay whose outcome is unknown
        self.covered = 0  # how many of the entries the marker covers
        self._fh: BinaryIO | None = None
        self.disabled: str | None = None  # why records cannot be kept (the spool is off)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def pending(self) -> bool:
        """Records (or an unresolved replay) waiting for the store."""
        return bool(self.entries) or self.marker is not None

    # ------------------------------------------------------------ file

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+b")  # held open until close()
        except OSError as exc:
            raise SpoolError(f"cannot open audit spool {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise SpoolError(f"audit spool {self.path} is in use by another process "
                             "(two writers on one chain?)", in_use=True) from exc
        self._fh = fh
        self._load()

    def disable(self, reason: str) -> None:
        """Run without a spool: :meth:`add` keeps nothing (records fail as before)."""
        self.disabled = reason

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # releases the lock

    def _load(self) -> None:
        assert self._fh is not None
        fh = self._fh
        fh.seek(0)
        data = fh.read()
        good = 0
        entries: list[dict[str, Any]] = []
        marker: int | None = None
        covered = 0
        for line in data.split(b"\n")[:-1] if data else []:
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                break
            if isinstance(item, dict) and isinstance(item.get("record"), dict):
                entries.append(unsealed(item["record"]))
            elif isinstance(item, dict) and isinstance(item.get("replay_after"), int):
                marker, covered = int(item["replay_after"]), len(entries)
            else:
                break
            good += len(line) + 1
        if good != len(data):  # a torn or foreign tail: never acknowledged, cut it off
            fh.truncate(good)
            self._sync()
        self.entries, self.marker, self.covered = entries, marker, covered

    def _sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _append(self, lines: Sequence[bytes]) -> None:
        assert self._fh is not None
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(b"".join(lines))
        self._sync()

    # ------------------------------------------------------------ records

    def add(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Keep as many of ``records`` as fit (in order), durably; returns how many."""
        if self._fh is None:
            return 0
        room = max(0, self.max_records - len(self.entries))
        taken = [unsealed(r) for r in records[:room]]
        if not taken:
            return 0
        lines = [canonical_json({"record": r}) + b"\n" for r in taken]
        try:
            self._append(lines)
        except (OSError, ValueError):
            return 0
        self.entries.extend(taken)
        return len(taken)

    def begin(self, head_seq: int) -> None:
        """Mark a replay of every entry after ``head_seq`` (before its commit)."""
        self._append([canonical_json({"replay_after": head_seq}) + b"\n"])
        self.marker, self.covered = head_seq, len(self.entries)

    def committed(self) -> None:
        """The replay committed: the spool is empty again.

        No fsync: should the truncation be lost, the records come back with
        their marker, and the next replay finds them in the store.
        """
        assert self._fh is not None
        self._fh.truncate(0)
        self._fh.flush()
        self.entries, self.marker, self.covered = [], None, 0

    def resolve(self, stored: Sequence[Mapping[str, Any]]) -> int:
        """Settle an unresolved replay from the records now stored after its marker.

        ``stored`` are the chain's records at seq ``marker + 1`` onwards (up to
        ``covered`` of them, in order). When they are the spooled records, that
        replay committed: they are dropped (the file is rewritten without
        them). Otherwise the marker is only forgotten: the next one appended
        supersedes it (on load, only the last marker counts; every earlier one
        was settled as not committed before it was written). Returns how many
        records were dropped.
        """
        if self.marker is None:
            return 0
        covered = self.entries[:self.covered]
        done = (len(stored) == len(covered)
                and all(unsealed(s) == c for s, c in zip(stored, covered, strict=True)))
        if not done:
            self.marker, self.covered = None, 0
            return 0
        self._rewrite(self.entries[self.covered:])
        return len(covered)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the file's content by ``entries`` (atomically: write, fsync, rename)."""
        assert self._fh is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(b"".join(canonical_json({"record": r}) + b"\n" for r in entries))
            out.flush()
            os.fsync(out.fileno())
        # the lock is on the open file: take it on the new one before the rename
        new = open(tmp, "a+b")  # becomes the held spool file
        try:
            fcntl.flock(new.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            new.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        old, self._fh = self._fh, new
        old.close()
        self.entries, self.marker, self.covered = entries, None, 0
