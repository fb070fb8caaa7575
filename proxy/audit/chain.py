"""The hash contract (contract §6), as pure functions.

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
    record["hash"] = record_hash(record)
    return record


@dataclass(frozen=True, slots=True)
class Break:
    """The first broken link of a chain."""

    chain_id: str
    seq: int
    event_id: str
    problem: str

    def __str__(self) -> str:
        return f"chain {self.chain_id!r} seq {self.seq} (event {self.event_id}): {self.problem}"


@dataclass(slots=True)
class ChainCheck:
    """Incremental verifier for one chain, fed records in ``seq`` order."""

    chain_id: str
    expected_seq: int = 1
    prev_hash: str = GENESIS
    count: int = 0
    first_hash: str = ""

    def feed(self, record: Mapping[str, Any]) -> Break | None:
        seq = int(record.get("seq", -1))
        event = str(record.get("event_id", "?"))
        if seq != self.expected_seq:
            what = "missing (deleted)" if seq > self.expected_seq else "duplicated or reordered"
            return Break(self.chain_id, seq, event,
                         f"expected seq {self.expected_seq}, found {seq}: record {what}")
        if record.get("prev_hash") != self.prev_hash:
            return Break(self.chain_id, seq, event,
                         "prev_hash does not match the previous record "
                         "(record inserted, removed or reordered)")
        computed = record_hash(record)
        if computed != record.get("hash"):
            return Break(self.chain_id, seq, event, "hash mismatch: record modified")
        if self.count == 0:
            self.first_hash = computed
        self.prev_hash = computed
        self.expected_seq += 1
        self.count += 1
        return None


def verify_records(records: Iterable[Mapping[str, Any]]) -> Iterator[Break | ChainCheck]:
    """Verify records sorted by (chain_id, seq); yields each finished chain or its break."""
    current: ChainCheck | None = None
    broken = False
    for rec in records:
        cid = str(rec.get("chain_id"))
        if current is None or current.chain_id != cid:
            if current is not None and not broken:
                yield current
            current = ChainCheck(cid)
            broken = False
        if broken:
            continue
        brk = current.feed(rec)
        if brk is not None:
            broken = True
            yield brk
    if current is not None and not broken:
        yield current
