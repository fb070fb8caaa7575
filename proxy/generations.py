"""Config generations: the config and everything built from it, replaced as one unit.

Everything a config change can touch — the config, the routes, the compiled
policy, the identity sources, the upstream session, the decision core and its
front doors — lives in a :class:`Generation`. :meth:`Generations.reload`
loads the config and has a complete new generation built (policy compiled,
authenticators started); only then does it become current. A request pins the
current generation once, when it arrives, and finishes with it; a replaced
generation closes what only it owns (:class:`Shared` parts are reference
counted) when its last request is done. A reload that fails changes nothing; a
reload whose files did not change is not a reload. What is opened once per
process (listeners, Redis, the audit store, the mode, approvals, telemetry)
needs a restart to change (:func:`restart_only`): a reload that changes it
says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from aiohttp import web

from proxy.config import Config
from proxy.doors.inline import InlineProxy
from proxy.forward import UpstreamClient
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.ports import PolicyEngine
from proxy.tasks import spawn

log = logging.getLogger("casf")
T = TypeVar("T")


class Shared(Generic[T]):
    """A resource used by one or more generations; closed when the last lets go."""

    def __init__(self, value: T, close: Callable[[], Awaitable[Any]]) -> None:
        self.value = value
        self._close = close
        self.users = 0

    def acquire(self) -> T:
        self.users += 1
        return self.value

    async def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            await self._close()


class Generation:
    """The config and everything built from it, as one unit (see the module doc)."""

    __slots__ = ("active", "cfg", "engine", "identity", "pipeline", "released", "retired",
                 "session")

    def __init__(self, cfg: Config, pipeline: InlineProxy, engine: Shared[PolicyEngine],
                 identity: Shared[Identity], session: Shared[UpstreamClient]) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.engine = engine
        self.identity = identity
        self.session = session
        for ref in (engine, identity, session):
            ref.acquire()
        self.active = 0
        self.retired = False
        self.released = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.pipeline.flush()  # outcome records still on their way to the sink
        for ref in (self.session, self.identity, self.engine):
            try:
                await ref.release()
            except Exception:
                log.exception("closing a replaced config generation failed")


GEN = web.RequestKey("casf_generation", Generation)


def describe(exc: BaseException) -> str:
    from proxy.config import ConfigError
    from proxy.policy_regorus import PolicyLoadError

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, PolicyLoadError):
        return f"policy does not compile: {exc}"
    return f"{type(exc).__name__}: {exc}"


# Settings read once at startup: a reload that changes them is logged, not applied.
def restart_only(old: Config, new: Config) -> list[str]:
    changed = []
    if old.traffic != new.traffic:
        changed.append("listen.traffic")
    if old.admin != new.admin:
        changed.append("listen.admin")
    if old.decisions_listener != new.decisions_listener:
        changed.append("listen.decisions")
    if old.redis != new.redis:
        changed.append("redis")
    for name in ("sqlite_path", "chain_id", "batch_max", "batch_wait_s", "timeout_s",
                 "queue_max", "spool_dir"):
        if getattr(old.audit, name) != getattr(new.audit, name):
            changed.append(f"audit.{name.removesuffix('_s')}")
    if old.mode_default != new.mode_default:
        changed.append("mode.default")
    if old.mode_state_path != new.mode_state_path:
        changed.append("mode.state_path")
    if old.approvals != new.approvals:
        changed.append("approvals")
    if old.telemetry != new.telemetry:
        changed.append("telemetry")
    return changed


def session_params(cfg: Config) -> tuple[float, float, int]:
    u = cfg.upstream
    return (u.connect_timeout_s, u.read_timeout_s, u.pool_size)


def same_identity(old: Config, new: Config) -> bool:
    """Equal apart from the key set (the authenticator re-reads its sources itself)."""
    a, b = old.identity, new.identity
    if a.api_keys is not None and b.api_keys is not None:
        a = dataclasses.replace(a, api_keys=dataclasses.replace(a.api_keys, keys=()))
        b = dataclasses.replace(b, api_keys=dataclasses.replace(b.api_keys, keys=()))
    return a == b


class Generations:
    """The current generation, the retired ones still serving, and the reload lock."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._current: Generation | None = None
        self._retired: list[Generation] = []
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Generation:
        assert self._current is not None, "runtime is not open"
        return self._current

    def start(self, gen: Generation) -> None:
        self._current = gen

    def every(self) -> list[Generation]:
        """Every generation still serving requests (the current one last)."""
        return [*self._retired, *([self._current] if self._current is not None else [])]

    def pin(self) -> Generation:
        """The generation a request that arrives now uses, until :meth:`unpin`."""
        gen = self.current
        gen.active += 1
        return gen

    def unpin(self, gen: Generation) -> None:
        gen.active -= 1
        if gen.retired and gen.active == 0:
            spawn(self._release(gen), name="casf-release-generation")

    async def _release(self, gen: Generation) -> None:
        with contextlib.suppress(ValueError):
            self._retired.remove(gen)
        await gen.release()

    async def close(self) -> None:
        async with self._lock:  # a reload in progress finishes first
            gens = self.every()
            self._retired.clear()
            for gen in gens:
                await gen.release()

    async def reload(self, reason: str, load: Callable[[Config], Config],
                     build: Callable[[Config, Generation], Awaitable[Generation]]) -> bool:
        """Load the config again (``load`` runs in a thread) and switch to the
        generation ``build`` makes of it, if (and only if) all of it is valid."""
        async with self._lock:
            old = self.current
            try:
                cfg = await asyncio.to_thread(load, old.cfg)
                gen = await build(cfg, old)
            except Exception as exc:
                self.metrics.config_reload.labels("error").inc()
                log.error("config reload (%s) failed, keeping config %s: %s", reason,
                          old.cfg.digest[:12], describe(exc),
                          extra={"fields": {"event": "config_reload", "result": "error",
                                            "hash": old.cfg.digest}})
                return False
            if cfg.digest == old.cfg.digest and reason.startswith("file change"):
                # the same bytes as the config in force (a file was touched, or a
                # directory and the file in it were both seen to change): nothing
                # to do, and not a reload
                await gen.release()
                self.metrics.config_reload.labels("unchanged").inc()
                log.info("config files touched, content unchanged (hash %s): not reloaded",
                         cfg.digest[:12])
                return True
            ignored = restart_only(old.cfg, cfg)
            if ignored:
                log.warning("config reload (%s): %s changed; these settings apply only after "
                            "a restart (the running values stay)", reason, ", ".join(ignored),
                            extra={"fields": {"event": "config_reload",
                                              "restart_required": ignored}})
            self._current = gen  # from here on, new requests use the new generation
            old.retired = True
            if old.active == 0:
                await old.release()
            else:
                self._retired.append(old)
            self.metrics.config_reload.labels("success").inc()
            self.metrics.set_config_hash(cfg.digest)
            log.warning("config reloaded (%s): hash %s -> %s, policy %s", reason,
                        old.cfg.digest[:12], cfg.digest[:12], gen.pipeline.policy_hash,
                        extra={"fields": {"event": "config_reload", "result": "success",
                                          "hash": cfg.digest,
                                          "policy_hash": gen.pipeline.policy_hash}})
            return True
