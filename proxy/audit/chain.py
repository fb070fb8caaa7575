"""The hash contract (docs/audit.md), as pure functions.

``hash = sha256(prev_hash || canonical_json(record without "hash"))`` where
``prev_hash`` is the previous record's hex hash in the same chain (the empty
string for the first record) and is itself a field of the record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.canonical import canonical_json

GENESIS = ""
CHAIN_FIELDS = ("chain_id", "seq", "prev_hash", "hash")


class StoredRecord(dict[str, Any]):
    """A record as read back from a store.

    ``problem`` is set when the row itself is inconsistent, whatever its
    hash says: a field stored both in its column and in ``extra``, or in
    ``extra`` where its column could have held it, or an ``extra`` that is
    not a JSON object. Such a row is tampering: the verifier reports it as a
    modified record.
    """

    __slots__ = ("problem",)

    def __init__(self, fields: dict[str, Any], problem: str | None = None) -> None:
        super().__init__(fields)
        self.problem = problem


def record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    prev = str(body.get("prev_hash", ""))
    return hashlib.sha256(prev.encode() + canonical_json(body)).hexdigest()


def seal(record: dict[str, Any], chain_id: str, seq: int, prev_hash: str) -> dict[str, Any]:
    """Stamp chain position and hash onto ``record`` (in place) and return it."""
    record["chain_id"] = chain_id
    record["seq"] = seq
    record["prev_hash"] = prev_hash
    record.pop("hash", None)
    # the record has no "hash" field now: hash it as it is (record_hash would copy it)
    record["hash"] = hashlib.sha256(prev_hash.encode() + canonical_json(record)).hexdigest()
    return record


@dataclass(frozen=True, slots=True)
class Break:
    """The first broken link of a chain.

    ``seq``/``event_id`` name the record where the break was detected; ``kind``
    says what happened (``modified``, ``deleted``, ``inserted``, ``reordered``
    or ``broken-link`` when the evidence does not say which) and ``problem``
    names the record(s) involved.
    """

    chain_id: str
    seq: int
    event_id: str
    problem: str
    kind: str = "broken-link"

    def __str__(self) -> str:
        return f"chain {self.chain_id!r} seq {self.seq} (event {self.event_id}): {self.problem}"


def _seq(record: Mapping[str, Any] | None) -> int:
    value = record.get("seq") if record is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def valid_seq(value: Any) -> bool:
    """Whether ``value`` can be a chain position (1, 2, 3, ...)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(slots=True)
class ChainCheck:
    """Incremental verifier for one chain, fed records in ``seq`` order.

    By default it starts at the genesis (seq 1, empty ``prev_hash``); a
    partial check (a time window) starts at ``expected_seq`` with the hash of
    the record before it as ``prev_hash``. A record that does not link is
    held back until the next one arrives (or :meth:`finish` is called): one
    record of look-ahead is what tells a swap or an insertion from a plain
    modification.
    """

    chain_id: str
    expected_seq: int = 1
    prev_hash: str = GENESIS
    count: int = 0
    first_hash: str = ""
    first_seq: int = 0
    first_prev_hash: str | None = None
    prev_prev_hash: str | None = None
    last_event: str = ""
    broken: Break | None = None
    _pending: dict[str, Any] | None = None

    @property
    def last_seq(self) -> int:
        return self.expected_seq - 1

    @property
    def last_hash(self) -> str:
        return self.prev_hash

    def feed(self, record: Mapping[str, Any]) -> Break | None:
        """Check the next record; returns the chain's break once it is known."""
        if self.broken is not None:
            return None
        if self._pending is not None:
            return self._conclude(self._pending, record)
        problem = getattr(record, "problem", None)
        if problem:
            seq = _seq(record) if valid_seq(record.get("seq")) else self.expected_seq
            self.broken = Break(self.chain_id, seq, str(record.get("event_id", "?")),
                                f"{problem} (record modified)", "modified")
            return self.broken
        if (_seq(record) == self.expected_seq and record.get("prev_hash") == self.prev_hash
                and record_hash(record) == record.get("hash")):
            if self.count == 0:
                self.first_hash = str(record["hash"])
                self.first_seq = self.expected_seq
                self.first_prev_hash = self.prev_hash
            self.prev_prev_hash = self.prev_hash
            self.prev_hash = str(record["hash"])
            self.last_event = str(record.get("event_id", "?"))
            self.expected_seq += 1
            self.count += 1
            return None
        self._pending = dict(record)
        return None

    def finish(self) -> Break | None:
        """End of the chain's records: a held-back record is judged without look-ahead."""
        if self.broken is None and self._pending is not None:
            return self._conclude(self._pending, None)
        return None

    def _conclude(self, rec: Mapping[str, Any], nxt: Mapping[str, Any] | None) -> Break:
        self._pending = None
        self.broken = _classify(self, rec, nxt)
        return self.broken


def _classify(c: ChainCheck, r: Mapping[str, Any], n: Mapping[str, Any] | None) -> Break:
    """Name what happened at the first record ``r`` that does not link (``n`` follows it)."""
    e, seq, event = c.expected_seq, _seq(r), str(r.get("event_id", "?"))

    def brk(problem: str, kind: str) -> Break:
        return Break(c.chain_id, seq, event, problem, kind)

    raw = r.get("seq")
    if not valid_seq(raw):
        # no writer stores such a row: 1, 2, 3, ... are the only positions
        return Break(c.chain_id, e, event, f"a record stored at seq {_show(raw)}, outside the "
                     f"chain's positions 1, 2, 3, ... (inserted)", "inserted")
    if seq != e:
        if seq > e:
            if n is not None and _seq(n) == e:
                return brk(f"expected seq {e}, found {seq}: seq {seq} is stored before seq {e} "
                           "(records reordered)", "reordered")
            gone = f"seq {e}" if seq == e + 1 else f"seqs {e}..{seq - 1}"
            return brk(f"expected seq {e}, found {seq}: record {gone} missing (deleted)",
                       "deleted")
        return brk(f"expected seq {e}, found {seq}: record duplicated or reordered", "reordered")
    prev = r.get("prev_hash")
    if prev == c.prev_hash:
        return brk("hash mismatch: record modified", "modified")
    if n is not None and n.get("prev_hash") == c.prev_hash and prev == n.get("hash"):
        return brk(f"records seq {seq} and seq {seq + 1} (event {n.get('event_id', '?')}) "
                   "are swapped: each links to the other's place (records reordered)",
                   "reordered")
    if c.prev_prev_hash is not None and prev == c.prev_prev_hash:
        return brk(f"record seq {seq - 1} (event {c.last_event}) was inserted: "
                   f"seq {seq} links past it to seq {seq - 2}", "inserted")
    if n is not None and n.get("prev_hash") == c.prev_hash:
        return brk(f"record seq {seq} was inserted: it does not link to seq {seq - 1} "
                   f"and seq {seq + 1} links past it", "inserted")
    if r.get("hash") == record_hash({**r, "seq": seq + 1}):
        return brk(f"record at seq {seq} was written as seq {seq + 1}: the original seq {seq} "
                   "was deleted and the later records renumbered", "deleted")
    if record_hash(r) != r.get("hash"):
        return brk("hash and prev_hash do not match: record modified", "modified")
    return brk("prev_hash does not match the previous record "
               "(record inserted, deleted or reordered before this one)", "broken-link")


def _show(value: Any) -> str:
    return "NULL" if value is None else repr(value)


def verify_records(records: Iterable[Mapping[str, Any]]) -> Iterator[Break | ChainCheck]:
    """Verify records sorted by (chain_id, seq); yields each finished chain or its break."""
    current: ChainCheck | None = None
    for rec in records:
        cid = str(rec.get("chain_id"))
        if current is None or current.chain_id != cid:
            if current is not None:
                yield from _finished(current)
            current = ChainCheck(cid)
        brk = current.feed(rec)
        if brk is not None:
            yield brk
    if current is not None:
        yield from _finished(current)


def _finished(check: ChainCheck) -> Iterator[Break | ChainCheck]:
    if check.broken is not None:
        return
    brk = check.finish()
    yield brk if brk is not None else check
