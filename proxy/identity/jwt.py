"""Bearer JWTs: signature against a pinned key, then ``iss``/``aud``/``exp``/``nbf``.

Verification order (every failure is a 401 ``Auth_Invalid``):

1. ``Authorization: Bearer <token>`` (header name configurable), sent once,
   at most ``max_token_bytes``, three base64url parts (JWS compact; JWE and
   unsecured tokens are refused);
2. the header: ``alg`` in ``identity.jwt.algorithms`` (never ``none``), no
   ``crit``; ``typ`` absent or a JWT type;
3. the key: HS256 only with the environment secret; otherwise the key named
   by ``kid`` (an unknown ``kid`` triggers a rate-bounded key-set refresh),
   and the token's ``alg`` must be one the key is pinned to;
4. the signature (joserfc's algorithm implementations; canonical base64url);
5. the claims: ``exp`` required, ``exp``/``nbf`` with ``leeway_seconds``;
   ``iss`` one of the configured issuers; ``aud`` (string or list) naming a
   configured audience; actor and role claims present (tenant when
   ``require_tenant``).

A verified token's principal is cached under the SHA-256 of the token until
its ``exp`` (bounded LRU, ``cache_size`` entries; cleared when the key set
changes). Tokens are never logged; only the failure reason and ``kid`` are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import time
from collections import OrderedDict
from typing import Any, TypeGuard

import orjson

from proxy.config import JwtConfig
from proxy.identity.base import AuthFailure, printable
from proxy.identity.jwks import KeySetCache, VerifyKey, hs256_key
from proxy.metrics import Metrics
from proxy.model import Exchange, Principal

log = logging.getLogger("casf.identity")

_COMPACT = re.compile(rb"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_JWT_TYPES = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})


def _b64(part: bytes) -> bytes:
    return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))


def _fail(reason: str, message: str) -> AuthFailure:
    return AuthFailure(reason, message)


MALFORMED = _fail("malformed", "malformed token")


def claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TokenCache:
    """Verified principals by SHA-256 of the token, each until the token's ``exp``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    def get(self, digest: bytes, now: float) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if now >= hit[1]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return hit[0]

    def put(self, digest: bytes, principal: Principal, expires: float) -> None:
        if self.size <= 0:
            return
        self._entries[digest] = (principal, expires)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class JwtVerifier:
    """Token → principal or failure; no request objects, so benches can call it directly."""

    def __init__(self, cfg: JwtConfig, keys: KeySetCache | None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.hs = (hs256_key(cfg.hs256_secret, cfg.hs256_kid)
                   if cfg.hs256_secret is not None else None)
        self.cache = TokenCache(cfg.cache_size)
        self._issuers = frozenset(cfg.issuers)
        self._audiences = frozenset(cfg.audiences)

    async def verify(self, token: bytes, now: float | None = None) -> Principal | AuthFailure:
        now = time.time() if now is None else now
        digest = hashlib.sha256(token).digest()
        cached = self.cache.get(digest, now)
        if cached is not None:
            return cached
        result = await self._verify(token, now)
        if isinstance(result, tuple):
            principal, exp = result
            self.cache.put(digest, principal, exp)
            return principal
        return result

    async def _verify(self, token: bytes, now: float
                      ) -> tuple[Principal, float] | AuthFailure:
        cfg = self.cfg
        if len(token) > cfg.max_token_bytes or not _COMPACT.match(token):
            return MALFORMED
        head_b64, body_b64, sig_b64 = token.split(b".")
        try:
            header = orjson.loads(_b64(head_b64))
            signature = _b64(sig_b64)
        except (binascii.Error, ValueError):
            return MALFORMED
        if not isinstance(header, dict):
            return MALFORMED
        if base64.urlsafe_b64encode(signature).rstrip(b"=") != sig_b64:
            return _fail("bad_signature", "token signature is invalid")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            return _fail("alg_not_allowed", "token algorithm is not accepted")
        if "crit" in header:
            return _fail("crit", "token has critical header parameters")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _JWT_TYPES):
            return _fail("typ", "token type is not a JWT")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return MALFORMED
        key = await self._key(alg, kid)
        if key is None:
            return _fail("unknown_key", "token signing key is unknown")
        if alg not in key.algorithms:
            return _fail("alg_mismatch", "token algorithm does not match its key")
        if not key.verify(alg, head_b64 + b"." + body_b64, signature):
            return _fail("bad_signature", "token signature is invalid")
        try:
            claims = orjson.loads(_b64(body_b64))
        except (binascii.Error, ValueError):
            return MALFORMED
        if not isinstance(claims, dict):
            return MALFORMED
        return self._claims(claims, now, kid)

    async def _key(self, alg: str, kid: str | None) -> VerifyKey | None:
        if alg == "HS256":
            if self.hs is None or (self.hs.kid is not None and kid != self.hs.kid):
                return None
            return self.hs
        if self.keys is None:
            return None
        key = self.keys.get(kid)
        if key is None:
            key = await self.keys.refresh_for(kid)
        return key

    def _claims(self, claims: dict[str, Any], now: float, kid: str | None
                ) -> tuple[Principal, float] | AuthFailure:
        cfg = self.cfg
        raw_exp = claims.get("exp")
        if not _number(raw_exp):
            return _fail("no_exp", "token has no expiry")
        exp = float(raw_exp)
        if now > exp + cfg.leeway_s:
            return _fail("expired", "token expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _number(nbf) or now + cfg.leeway_s < nbf):
            return _fail("not_yet_valid", "token is not valid yet")
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in self._issuers:
            return _fail("issuer", "token issuer is not accepted")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not any(
                isinstance(a, str) and a in self._audiences for a in auds):
            return _fail("audience", "token audience is not accepted")
        names = cfg.claims
        actor = claim(claims, names.actor)
        if not isinstance(actor, str) or not printable(actor):
            return _fail("no_actor", f"token has no usable {names.actor} claim")
        role = claim(claims, names.role)
        if not isinstance(role, str) or not printable(role):
            return _fail("no_role", f"token has no usable {names.role} claim")
        tenant = claim(claims, names.tenant)
        if tenant is not None and (not isinstance(tenant, str) or not printable(tenant)):
            return _fail("bad_tenant", f"token's {names.tenant} claim is not a string")
        if tenant is None and cfg.require_tenant:
            return _fail("no_tenant", f"token has no {names.tenant} claim")
        key_id = f"jwt:{kid}" if kid is not None else "jwt"
        return Principal(actor, role, tenant, "jwt", key_id), exp


class JwtAuthenticator:
    """Bearer tokens in ``Authorization``: absent → not mine; anything else present decides."""

    name = "jwt"

    def __init__(self, cfg: JwtConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.header = cfg.header
        self.keys = None
        if cfg.jwks_file is not None or cfg.jwks_url is not None:
            self.keys = KeySetCache(cfg, metrics, on_change=self._keys_changed)
        self.verifier = JwtVerifier(cfg, self.keys)

    def _keys_changed(self) -> None:
        self.verifier.cache.clear()  # a removed key must not keep its tokens alive

    @property
    def challenge(self) -> str:
        return 'Bearer realm="casf"'

    @property
    def consumed_headers(self) -> tuple[str, ...]:
        return (self.header,)

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        return ()

    def invalid_challenge(self, failure: AuthFailure) -> str:
        return 'Bearer realm="casf", error="invalid_token"'

    async def authenticate(self, ex: Exchange) -> Principal | AuthFailure | None:
        values = ex.headers.getall(self.header, [])
        if not values:
            return None
        if len(values) != 1:
            return _fail("repeated", f"{self.header} is sent more than once")
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return _fail("scheme", f"{self.header} must use the Bearer scheme")
        token = token.strip()
        if not token:
            return MALFORMED
        result = await self.verifier.verify(token.encode("utf-8", "surrogateescape"))
        if isinstance(result, AuthFailure):
            log.info("jwt rejected: %s (trace %s)", result.reason, ex.trace_id)
        return result

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()

    async def reload(self) -> dict[str, int]:
        if self.keys is None:
            return {}
        await self.keys.refresh()
        return {"jwks": self.keys.size}
