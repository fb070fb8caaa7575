"""The one file watcher: the config, the key sources, the JWKS file and the policies.

A change (content, inode or symlink target: a ConfigMap's ``..data`` swap)
reloads the config; the reload re-reads the key sources and recompiles the
policy only when its files changed. With ``reload.watch`` it is the only
poller of those files (the key authenticator does not poll them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from proxy.config import Config, rego_files
from proxy.metrics import Metrics

log = logging.getLogger("casf")


Stat = tuple[str, int, int, int]


def watched_files(cfg: Config) -> list[Path]:
    """Every file a reload reads: the config, key sources, JWKS file, policy files."""
    out = [cfg.source]
    ak = cfg.identity.api_keys
    if ak is not None:
        if ak.keys_file is not None:
            out.append(ak.keys_file)
        if ak.keys_dir is not None:
            out.append(ak.keys_dir)
            with contextlib.suppress(OSError):
                out.extend(ak.keys_dir / n for n in sorted(os.listdir(ak.keys_dir))
                           if not n.startswith("."))
    if cfg.identity.jwt is not None and cfg.identity.jwt.jwks_file is not None:
        out.append(cfg.identity.jwt.jwks_file)
    if cfg.policy.bundle is not None:
        out.append(cfg.policy.bundle)
        out.extend(cfg.policy.files)
        with contextlib.suppress(OSError):  # a new or removed file changes the bundle
            out.extend(f for f in rego_files(cfg.policy.bundle) if f not in cfg.policy.files)
    return out


def file_stats(paths: list[Path]) -> dict[str, Stat]:
    """Where each path resolves to (symlinks followed: a ConfigMap's ``..data`` swap
    changes it), with inode, mtime and size. Blocking: run it in a thread."""
    out: dict[str, Stat] = {}
    for path in paths:
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
            out[str(path)] = (real, st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            out[str(path)] = ("", -1, -1, -1)
    return out


class Watched(Protocol):
    """What the watcher needs of the runtime."""

    @property
    def cfg(self) -> Config: ...
    @property
    def draining(self) -> bool: ...
    @property
    def metrics(self) -> Metrics: ...
    async def reload(self, reason: str) -> bool: ...


class ConfigWatcher:
    """Polls :func:`watched_files` every ``reload.interval_ms``; a change reloads."""

    def __init__(self, rt: Watched, stats: dict[str, Stat]) -> None:
        self.rt = rt
        self.stats = stats

    async def run(self) -> None:
        """Poll the watched files; a change (content, inode or symlink target) reloads.

        Every completed cycle counts in ``casf_config_watch_cycles_total``, also with
        ``reload.watch: false`` or while draining (then the cycle checks nothing).
        """
        while True:
            await asyncio.sleep(self.rt.cfg.reload.interval_s)
            if self.rt.cfg.reload.watch and not self.rt.draining:
                try:
                    await self.check()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("config file watch failed")
            self.rt.metrics.config_watch_cycles.inc()

    async def check(self) -> None:
        before = self.stats
        now = await asyncio.to_thread(file_stats, watched_files(self.rt.cfg))
        if now == before:
            return
        changed = sorted(p for p in now if now[p] != before.get(p))
        await self.rt.reload("file change: " + ", ".join(changed[:3])
                          + (" ..." if len(changed) > 3 else ""))
        # the stats taken before the load: a write during it is seen next time;
        # files the new config added are stat'ed now
        paths = watched_files(self.rt.cfg)
        fresh = await asyncio.to_thread(file_stats, [p for p in paths if str(p) not in now])
        self.stats = {str(p): now.get(str(p)) or fresh[str(p)] for p in paths}
