"""External OPA through its Data API (``policy.engine: opa``).

``POST {url}/v1/data/{path}`` with ``{"input": <policy input>}`` — the same
input document the in-process engine sees — on one pooled aiohttp session
(keep-alive connections are reused), bounded by ``policy.opa.timeout_ms``
(350 ms by default).

Failures and what they mean:

- timeout, connection error, non-200 status, a body that is not a JSON
  object: the engine *could not answer* → :class:`PolicyUnavailable` (the
  policy stage fails closed on writes, open on reads: 503 ``OPA_Unavailable``)
  and ``casf_opa_error_total{kind}`` with kind ``timeout``, ``unavailable``,
  ``bad_status`` or ``bad_response``;
- a JSON object without ``result`` (the decision is undefined, e.g. OPA has
  no such package loaded) or whose ``result`` is not a decision document:
  the engine *answered* something unusable → deny with ``Policy_BadResult``,
  exactly like the in-process engine (counted as ``bad_response``).

OPA loads its policies itself, so the proxy cannot refuse them at load as it
does its own bundle. Instead, at startup and on every ``/healthz``, it asks
OPA for the decision document (``GET {url}/v1/data/{path}``, no input): when
OPA answers that the document is undefined (no ``result``: the package is
not loaded or is named differently) or that it is not an object, the
problem is logged and ``/healthz`` reports ``policy: unavailable`` (503), so
a load balancer keeps traffic away from a proxy whose every request would
be ``Policy_BadResult``. OPA that cannot be reached at startup is not fatal
(it may still be starting); the same health check reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from enum import StrEnum
from typing import Any

import aiohttp
import orjson

from proxy.config import OpaConfig, PolicyConfig
from proxy.forward import read_capped
from proxy.metrics import Metrics
from proxy.policy_regorus import RegorusEngine, parse_decision
from proxy.ports import PolicyEngine, PolicyOutcome, PolicyResult, PolicyUnavailable
from proxy.reasons import Reason

log = logging.getLogger("casf.policy")

MAX_RESPONSE_BYTES = 1_048_576


class OpaError(StrEnum):
    """``casf_opa_error_total{kind}`` label values."""

    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    BAD_STATUS = "bad_status"
    BAD_RESPONSE = "bad_response"


class OpaEngine:
    """The external engine; :meth:`evaluate` raises only :class:`PolicyUnavailable`."""

    def __init__(self, cfg: OpaConfig, policy_hash: str, metrics: Metrics) -> None:
        self.cfg = cfg
        self._hash = policy_hash
        self._metrics = metrics
        self._endpoint = f"{cfg.url}/v1/data/{cfg.path}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def policy_hash(self) -> str:
        return self._hash

    @property
    def endpoint(self) -> str:
        return self._endpoint

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.pool_size,
                                         limit_per_host=self.cfg.pool_size,
                                         keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _unavailable(self, kind: OpaError, detail: str) -> PolicyUnavailable:
        self._metrics.opa_errors.labels(kind.value).inc()
        log.warning("OPA %s: %s (%s)", kind.value, detail, self._endpoint)
        return PolicyUnavailable(f"opa {kind.value}: {detail}")

    async def _post(self, url: str, policy_input: Mapping[str, Any]) -> bytes:
        """OPA's answer to ``{"input": policy_input}`` at ``url``; raises PolicyUnavailable."""
        session = self._session
        if session is None:
            raise self._unavailable(OpaError.UNAVAILABLE, "engine not started")
        payload = orjson.dumps({"input": policy_input})
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                async with session.post(url, data=payload,
                                        headers={"Content-Type": "application/json"},
                                        allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise self._unavailable(OpaError.BAD_STATUS, f"HTTP {resp.status}")
                    return await read_capped(resp.content, MAX_RESPONSE_BYTES)
        except TimeoutError as exc:
            raise self._unavailable(OpaError.TIMEOUT,
                                    f"no answer within {self.cfg.timeout_s * 1000:.0f} ms"
                                    ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(OpaError.UNAVAILABLE, type(exc).__name__) from exc

    async def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyResult:
        body = await self._post(self._endpoint, policy_input)
        if len(body) > MAX_RESPONSE_BYTES:
            raise self._unavailable(OpaError.BAD_RESPONSE, "response too large")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise self._unavailable(OpaError.BAD_RESPONSE, "response is not JSON") from exc
        if not isinstance(doc, dict):
            raise self._unavailable(OpaError.BAD_RESPONSE, "response is not a JSON object")
        if "result" not in doc:
            self._metrics.opa_errors.labels(OpaError.BAD_RESPONSE.value).inc()
            log.warning("OPA decision %s is undefined (is the policy loaded?)", self._endpoint)
            return PolicyResult(PolicyOutcome.DENY, error=Reason.POLICY_BAD_RESULT)
        result = parse_decision(doc["result"])
        if result.error is not None:
            self._metrics.opa_errors.labels(OpaError.BAD_RESPONSE.value).inc()
        return result

    async def query_true(self, query: str, policy_input: Mapping[str, Any]) -> bool:
        """Whether ``query`` (``data.a.b``) is ``true`` for ``policy_input`` in OPA;
        undefined or any other value is false. Raises :class:`PolicyUnavailable`."""
        body = await self._post(f"{self.cfg.url}/v1/data/{'/'.join(query.split('.')[1:])}",
                                policy_input)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        return isinstance(doc, dict) and doc.get("result") is True

    async def healthy(self) -> bool:
        """OPA's own ``GET /health`` (readiness), and the decision document exists."""
        return await self.problem() is None

    async def problem(self) -> str | None:
        """Why OPA cannot decide now (unreachable, not ready, no such document), or None."""
        if self._session is None:
            return "engine not started"
        try:
            async with asyncio.timeout(max(self.cfg.timeout_s, 1.0)):
                async with self._session.get(f"{self.cfg.url}/health",
                                             allow_redirects=False) as resp:
                    if resp.status != 200:
                        return f"GET /health answered HTTP {resp.status}"
                async with self._session.get(self._endpoint, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return f"GET /v1/data/{self.cfg.path} answered HTTP {resp.status}"
                    body = await read_capped(resp.content, MAX_RESPONSE_BYTES)
        except TimeoutError:
            return "no answer in time"
        except (aiohttp.ClientError, OSError) as exc:
            return f"cannot reach OPA ({type(exc).__name__})"
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return f"GET /v1/data/{self.cfg.path} did not answer JSON"
        if not isinstance(doc, dict) or "result" not in doc:
            return (f"the decision document data.{self.cfg.path.replace('/', '.')} is "
                    "undefined in OPA: no loaded policy defines it (check the package name "
                    "and policy.opa.path)")
        if not isinstance(doc["result"], dict):
            return (f"the decision document data.{self.cfg.path.replace('/', '.')} is not "
                    "an object with allow")
        return None


@contextlib.asynccontextmanager
async def open_policy_engine(cfg: PolicyConfig, metrics: Metrics
                             ) -> AsyncIterator[PolicyEngine]:
    """The configured engine: in-process regorus, or an external OPA (closed on exit)."""
    if cfg.engine != "opa":
        regorus = RegorusEngine(cfg)
        try:
            yield regorus
        finally:
            regorus.close()
        return
    assert cfg.opa is not None
    engine = OpaEngine(cfg.opa, cfg.policy_hash, metrics)
    await engine.start()
    problem = await engine.problem()
    if problem is not None:  # not fatal: OPA may load its bundle later; /healthz says so
        log.error("OPA cannot decide yet (%s): %s; /healthz reports policy: unavailable "
                  "until it can", engine.endpoint, problem)
    try:
        yield engine
    finally:
        await engine.close()
