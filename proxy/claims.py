"""The life of one idempotency claim, in one place.

The admission stage takes a claim atomically (with the rate limits). From
then on exactly one of three things happens to it, through this handle:

* ``complete(outcome)``: the upstream (or, for a decision door, the decision)
  produced an outcome; a retry with the same key and fingerprint gets it back;
* ``release()``: nothing reached the upstream (a deny, a connect failure, a
  pool wait that gave up, an unaudited decision); a corrected retry is
  evaluated afresh;
* ``abandon()``: the upstream may have acted but no outcome can be stored (a
  timeout, an error after sending); the claim stays until its lease expires,
  so a retry is refused as in flight rather than delivered twice.

The first call wins; later calls do nothing. Store failures are logged, never
raised: the request's answer has already been decided.
"""

from __future__ import annotations

import logging

from proxy.ports import AdmissionStore, Claim, StoredOutcome

log = logging.getLogger("casf.pipeline")


class ClaimHandle:
    __slots__ = ("_claim", "_store", "_ttl_s", "state", "trace_id")

    def __init__(self, store: AdmissionStore, claim: Claim, ttl_s: float, trace_id: str
                 ) -> None:
        self._store = store
        self._claim = claim
        self._ttl_s = ttl_s
        self.trace_id = trace_id
        self.state = "held"  # held | completed | released | abandoned

    @property
    def held(self) -> bool:
        return self.state == "held"

    async def complete(self, outcome: StoredOutcome) -> None:
        if self.state != "held":
            return
        self.state = "completed"
        try:
            await self._store.complete(self._claim, outcome, self._ttl_s)
        except Exception:
            log.warning("could not store outcome for replay (trace %s)", self.trace_id)

    async def release(self) -> None:
        if self.state != "held":
            return
        self.state = "released"
        try:
            await self._store.release(self._claim)
        except Exception:
            log.warning("could not release idempotency claim (trace %s)", self.trace_id)

    def abandon(self) -> None:
        if self.state == "held":
            self.state = "abandoned"  # expires with its lease, never re-opened
