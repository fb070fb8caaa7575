"""API keys: only their SHA-256 is stored; reloaded when the key sources change.

Sources are a keys file and/or a mounted Secret directory (one file per key
id, see ``proxy.config.load_keys_dir``). A background task compares the
sources' stat signature every ``reload_interval_s`` (1 s by default) and
re-reads them in a worker thread when it changed; :meth:`reload` forces it.
A source that no longer parses keeps the last good key set (logged and
counted): the key set is replaced atomically or not at all.

The presented key is hashed, the digest looked up, and the stored digest
compared with :func:`hmac.compare_digest`. Logs and audit records carry the
key id, never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from proxy.config import ApiKeyEntry, ApiKeysConfig, ConfigError, load_api_keys
from proxy.identity.base import AuthFailure
from proxy.metrics import Metrics
from proxy.model import Exchange, Principal
from proxy.settings import Environment
from proxy.tasks import spawn

log = logging.getLogger("casf.identity")

Signature = tuple[tuple[str, int, int, int], ...]


def _stat(path: Path) -> tuple[str, int, int, int]:
    try:
        st = path.stat()  # follows links: a Secret's ..data swap changes the target
    except OSError:
        return (str(path), -1, -1, -1)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def sources_signature(cfg: ApiKeysConfig) -> Signature:
    """Modification time, size and inode of every key source (blocking: run in a thread)."""
    out = []
    if cfg.keys_file is not None:
        out.append(_stat(cfg.keys_file))
    if cfg.keys_dir is not None:
        out.append(_stat(cfg.keys_dir))
        try:
            names = sorted(os.listdir(cfg.keys_dir))
        except OSError:
            names = []
        out.extend(_stat(cfg.keys_dir / n) for n in names if not n.startswith("."))
    return tuple(out)


class ApiKeyAuthenticator:
    """``X-API-Key`` (configurable): absent → not mine; unknown or repeated → invalid."""

    name = "api_keys"

    def __init__(self, cfg: ApiKeysConfig, env: Environment, metrics: Metrics, *,
                 watch: bool = True) -> None:
        self.cfg = cfg
        self.header = cfg.header
        self._watch_files = watch
        self._env = env
        self._metrics = metrics
        self._by_hash: dict[str, tuple[ApiKeyEntry, Principal]] = {}
        self._install(cfg.keys)
        self._signature: Signature | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------ interface

    @property
    def challenge(self) -> str:
        return f'ApiKey header="{self.header}"'

    @property
    def consumed_headers(self) -> tuple[str, ...]:
        return (self.header,)

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        return ()

    def invalid_challenge(self, failure: AuthFailure) -> str:
        return self.challenge

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(e.key_id for e, _ in self._by_hash.values()))

    async def authenticate(self, ex: Exchange) -> Principal | AuthFailure | None:
        values = ex.headers.getall(self.header, [])
        if not values:
            return None
        if len(values) != 1:
            return AuthFailure("repeated", f"{self.header} is sent more than once")
        presented = values[0].strip()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
        found = self._by_hash.get(digest)
        if found is None or not presented or not hmac.compare_digest(found[0].sha256, digest):
            return AuthFailure("unknown_key", "invalid credentials")
        return found[1]

    async def start(self) -> None:
        await self.reload()  # also catches a change between config load and start
        if self._watch_files:  # else the runtime's one file watcher calls reload()
            self._task = spawn(self._watch(), name="casf-api-keys-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> dict[str, int]:
        """Re-read the key sources now; the old set stays when they do not parse."""
        async with self._lock:
            signature = await asyncio.to_thread(sources_signature, self.cfg)
            try:
                entries = await asyncio.to_thread(load_api_keys, self.cfg, self._env)
            except ConfigError as exc:
                # the message names the file and the key path; key files hold only hashes
                self._metrics.identity_reload.labels("api_keys", "error").inc()
                log.error("api keys not reloaded, keeping %d keys: %s", len(self._by_hash), exc)
                self._signature = signature  # do not retry until the sources change again
                return {"api_keys": len(self._by_hash)}
            before = set(self.key_ids)
            self._install(entries)
            self._signature = signature
            after = set(self.key_ids)
            self._metrics.identity_reload.labels("api_keys", "ok").inc()
            if before != after:
                log.warning("api keys reloaded: %d keys (added %s, removed %s)", len(after),
                            sorted(after - before) or "-", sorted(before - after) or "-")
            return {"api_keys": len(self._by_hash)}

    # ------------------------------------------------------------ internals

    def _install(self, entries: tuple[ApiKeyEntry, ...]) -> None:
        table = {}
        for e in entries:
            p = e.principal
            table[e.sha256] = (e, Principal(p.id, p.role, p.tenant, "api_key", e.key_id))
        self._by_hash = table  # one assignment: requests see the old or the new set

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                signature = await asyncio.to_thread(sources_signature, self.cfg)
                if signature != self._signature:
                    await self.reload()
            except Exception:
                log.exception("api key reload check failed")
