"""Console sign-in sessions: a server-side table of random tokens with a fixed lifetime.

The browser holds only the token (an HttpOnly, SameSite=Strict cookie); the
table maps its SHA-256 to the signed-in principal, the session's CSRF token
and its expiry. A session ends ``ttl_s`` after sign-in (then: sign in again),
on sign-out, or when the table is full and it is the oldest. The table lives
in the process: a restart signs everybody out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.model import Principal


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    csrf: str
    created_at: float
    expires_at: float

    def csrf_ok(self, presented: str | None) -> bool:
        """Constant-time comparison of a form's CSRF token with the session's."""
        return presented is not None and hmac.compare_digest(presented.encode(),
                                                             self.csrf.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionTable:
    def __init__(self, ttl_s: float, *, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._by_digest: dict[str, Session] = {}

    def create(self, principal: Principal) -> tuple[str, Session]:
        now = self.clock()
        if len(self._by_digest) >= self.max_sessions:
            self._purge(now)
        while len(self._by_digest) >= self.max_sessions:  # oldest first (insertion order)
            del self._by_digest[next(iter(self._by_digest))]
        token = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), now, now + self.ttl_s)
        self._by_digest[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        key = _digest(token)
        session = self._by_digest.get(key)
        if session is None:
            return None
        if self.clock() >= session.expires_at:
            del self._by_digest[key]
            return None
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(_digest(token), None)

    def _purge(self, now: float) -> None:
        for key, s in list(self._by_digest.items()):
            if now >= s.expires_at:
                del self._by_digest[key]

    def __len__(self) -> int:
        return len(self._by_digest)
