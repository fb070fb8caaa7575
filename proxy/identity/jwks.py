"""JSON Web Key Sets: parsing with per-key algorithm pinning, and a refreshing cache.

Every usable key is pinned to the algorithms its type allows (an RSA key to
its ``alg``, RS256 when the JWK names none; an EC P-256 key to ES256; an
Ed25519 key to EdDSA / Ed25519), intersected with ``identity.jwt.algorithms``.
Symmetric (``oct``) keys are never taken from a key set: HS256 only comes
from an environment secret. So ``alg: none`` and HS/RS confusion have no key
to verify against.

The key set comes from a file or a URL. It is fetched at start (bounded by
``jwks_timeout_ms``), refreshed in the background every
``jwks_refresh_seconds`` (sooner while it has never loaded or the last fetch
failed), and refreshed when a token names an unknown ``kid``, at most once
per ``jwks_min_refresh_seconds`` (concurrent requests share one fetch). A
failed fetch keeps the cached keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey, import_key
from joserfc.jws import JWSRegistry

from proxy.config import JwtConfig
from proxy.forward import read_capped
from proxy.metrics import Metrics
from proxy.tasks import spawn

log = logging.getLogger("casf.identity")

MAX_JWKS_BYTES = 1_048_576
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key (or the HS256 secret) and the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    key: Key
    models: Mapping[str, Any]  # alg -> joserfc JWSAlgModel

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        model = self.models.get(alg)
        if model is None:
            return False
        try:
            return bool(model.verify(signing_input, signature, self.key))
        except (JoseError, ValueError, TypeError):
            return False


def _models(algs: frozenset[str]) -> dict[str, Any]:
    return {a: JWSRegistry.algorithms[a] for a in algs}


def hs256_key(secret: bytes, kid: str | None) -> VerifyKey:
    algs = frozenset({"HS256"})
    return VerifyKey(kid, algs, OctKey.import_key(secret), _models(algs))


def _pinned(jwk: Mapping[str, Any], key: Key, allowed: frozenset[str]) -> frozenset[str]:
    """The algorithms this key may verify (empty: the key is not usable here)."""
    declared = jwk.get("alg")
    if isinstance(key, RSAKey):
        if key.raw_value.key_size < MIN_RSA_BITS:
            return frozenset()
        family = {"RS256", "PS256"}
        algs = {declared} if declared is not None else {"RS256"}
    elif isinstance(key, ECKey):
        family = {"ES256"} if key.curve_name == "P-256" else set()
        algs = {declared} if declared is not None else family
    elif isinstance(key, OKPKey):
        family = {"EdDSA", "Ed25519"} if key.curve_name == "Ed25519" else set()
        algs = family if declared in (None, "EdDSA", "Ed25519") else {declared}
    else:
        return frozenset()
    return frozenset(a for a in algs if isinstance(a, str) and a in family and a in allowed)


def parse_jwks(raw: bytes, allowed: frozenset[str], source: str) -> dict[str, VerifyKey]:
    """Usable signing keys by ``kid`` (a key without ``kid`` is stored under ``""``).

    Raises ``ValueError`` when the document is not a key set at all; single
    unusable keys are skipped with a warning.
    """
    doc = orjson.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JSON Web Key Set (expected {\"keys\": [...]})")
    out: dict[str, VerifyKey] = {}
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            log.warning("%s: keys[%d] is not an object; skipped", source, i)
            continue
        kid = jwk.get("kid")
        label = f"keys[{i}]" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
        if kid is not None and not isinstance(kid, str):
            log.warning("%s: %s has a non-string kid; skipped", source, label)
            continue
        if jwk.get("use") not in (None, "sig") or jwk.get("kty") == "oct":
            if jwk.get("kty") == "oct":
                log.warning("%s: %s is a symmetric key; never taken from a key set", source,
                            label)
            continue
        public = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        try:
            key = import_key(public)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: %s cannot be imported (%s); skipped", source, label,
                        type(exc).__name__)
            continue
        algs = _pinned(jwk, key, allowed)
        if not algs:
            log.warning("%s: %s (kty %s, alg %s) allows none of the configured algorithms; "
                        "skipped", source, label, jwk.get("kty"), jwk.get("alg"))
            continue
        name = kid or ""
        if name in out:
            log.warning("%s: %s repeats a kid; the first key is kept", source, label)
            continue
        out[name] = VerifyKey(kid, algs, key, _models(algs))
    return out


class KeySetCache:
    """The current key set of one source, refreshed as described in the module docstring."""

    def __init__(self, cfg: JwtConfig, metrics: Metrics,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self._metrics = metrics
        self._on_change = on_change
        self._keys: dict[str, VerifyKey] = {}
        self._digest = b""
        self._loaded = False
        self._last_attempt = float("-inf")
        self._last_ok = False
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.source = cfg.jwks_url or str(cfg.jwks_file)

    @property
    def size(self) -> int:
        return len(self._keys)

    def get(self, kid: str | None) -> VerifyKey | None:
        """The key for ``kid``; a token without ``kid`` needs a one-key set."""
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            return None
        return self._keys.get(kid)

    async def start(self) -> None:
        if self.cfg.jwks_url is not None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2),
                timeout=aiohttp.ClientTimeout(total=self.cfg.jwks_timeout_s),
                cookie_jar=aiohttp.DummyCookieJar())
        await self.refresh()
        self._task = spawn(self._background(), name="casf-jwks-refresh")

    async def close(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh_for(self, kid: str | None) -> VerifyKey | None:
        """Refresh because ``kid`` is unknown: at most once per ``jwks_min_refresh_s``."""
        inflight = self._inflight
        if inflight is None or inflight.done():
            if time.monotonic() - self._last_attempt < self.cfg.jwks_min_refresh_s:
                return None
        await self.refresh()
        return self.get(kid)

    async def refresh(self) -> bool:
        """Fetch now (joining a fetch already in flight); true when the set loaded."""
        if self._inflight is None or self._inflight.done():
            self._last_attempt = time.monotonic()
            self._inflight = spawn(self._fetch(), name="casf-jwks-fetch")
        return await asyncio.shield(self._inflight)

    # ------------------------------------------------------------ internals

    async def _background(self) -> None:
        while True:
            healthy = self._loaded and self._last_ok
            await asyncio.sleep(self.cfg.jwks_refresh_s if healthy
                                else max(self.cfg.jwks_min_refresh_s, 1.0))
            with contextlib.suppress(Exception):
                await self.refresh()

    async def _read(self) -> bytes:
        if self.cfg.jwks_file is not None:
            return await asyncio.to_thread(_read_file, self.cfg.jwks_file)
        assert self._session is not None and self.cfg.jwks_url is not None
        async with asyncio.timeout(self.cfg.jwks_timeout_s):
            async with self._session.get(self.cfg.jwks_url, allow_redirects=False,
                                         headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP status {resp.status}")
                body = await read_capped(resp.content, MAX_JWKS_BYTES)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return body

    async def _fetch(self) -> bool:
        try:
            raw = await self._read()
            keys = parse_jwks(raw, self.cfg.algorithms, self.source)
        except (OSError, ValueError, TimeoutError, aiohttp.ClientError,
                orjson.JSONDecodeError) as exc:
            self._last_ok = False
            self._metrics.identity_reload.labels("jwks", "error").inc()
            problem = "timed out" if isinstance(exc, TimeoutError) else (
                str(exc) or type(exc).__name__)
            log.warning("JWKS %s not refreshed (%s); keeping %d cached keys", self.source,
                        problem, len(self._keys))
            return False
        self._last_ok = True
        self._metrics.identity_reload.labels("jwks", "ok").inc()
        digest = hashlib.sha256(b"".join(sorted(
            orjson.dumps([k, sorted(v.algorithms), v.key.as_dict(private=False)],
                         option=orjson.OPT_SORT_KEYS) for k, v in keys.items()))).digest()
        if not self._loaded or digest != self._digest:
            if not keys:
                log.warning("JWKS %s has no usable signing keys", self.source)
            else:
                log.info("JWKS %s loaded: kids %s", self.source, sorted(keys))
            self._keys, self._digest, self._loaded = keys, digest, True
            self._on_change()
        return True


def _read_file(path: Path) -> bytes:
    with path.open("rb") as f:
        body = f.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return body
