"""Authentication: API keys stored only as SHA-256; missing → 401, unknown → 401."""

from __future__ import annotations

import hashlib
import hmac

from proxy.config import ApiKeysConfig
from proxy.model import Exchange, Principal, Verdict
from proxy.reasons import Reason


class ApiKeyAuthenticator:
    name = "api_key"

    def __init__(self, cfg: ApiKeysConfig) -> None:
        self.header = cfg.header
        self._by_hash = {k.sha256: k for k in cfg.keys}
        self._challenge = (("WWW-Authenticate", f'ApiKey header="{cfg.header}"'),)

    async def check(self, ex: Exchange) -> Verdict | None:
        values = ex.headers.getall(self.header, [])
        if not values:
            return Verdict("DENY", 401, (Reason.AUTH_MISSING,),
                           f"credentials required ({self.header})", self._challenge)
        presented = values[0].strip()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
        entry = self._by_hash.get(digest)
        if len(values) != 1 or entry is None or not hmac.compare_digest(entry.sha256, digest):
            return Verdict("DENY", 401, (Reason.AUTH_INVALID,), "invalid credentials",
                           self._challenge)
        p = entry.principal
        ex.principal = Principal(p.id, p.role, p.tenant, "api_key", entry.key_id)
        return None
