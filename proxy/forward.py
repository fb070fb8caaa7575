"""The upstream side: header rewriting and the one shared ClientSession."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import UpstreamConfig
from proxy.model import Exchange

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# Headers the proxy sets itself (never copied from the client).
_REWRITTEN = frozenset({"host", "content-length", "expect", "x-forwarded-for",
                        "x-forwarded-proto", "x-forwarded-host", "traceparent", "x-request-id"})
# Client-supplied claims about the connection that upstream frameworks believe
# (client address, scheme, host, port, path prefix): dropped, never forwarded;
# the proxy's own X-Forwarded-For/-Proto/-Host are the only ones the upstream sees.
# The proxy is the one that knows the peer, so the whole family goes, not a list
# of spellings: see :func:`is_connection_claim`.
_SPOOFABLE = frozenset({"forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix",
                        "x-forwarded-server", "x-forwarded-scheme", "x-forwarded-ssl",
                        "x-client-ip", "true-client-ip", "x-original-url", "x-rewrite-url",
                        "x-original-host", "x-host", "x-url-scheme", "front-end-https",
                        "x-original-forwarded-for"})
_ADDRESS_SUFFIXES = ("-ip", "-ips", "-addr", "-address", "-addrs")
_ADDRESS_WORDS = ("forwarded", "clientip", "client-ip", "client-addr", "realip", "real-ip",
                  "remoteaddr", "remote-addr", "remoteip", "remote-ip", "originating-ip",
                  "originatingip", "connecting-ip", "connectingip", "proxyuser-ip")


def is_connection_claim(canon: str) -> bool:
    """A header (canonical name) that claims something about the client's connection.

    ``Forwarded``, ``X-Forwarded*``, ``Forwarded-For``, and every name that ends
    in an address word (``Client-IP``, ``CF-Connecting-IP``, ``Fastly-Client-IP``,
    ``X-Cluster-Client-IP``, ``X-Originating-IP``, ``X-Remote-Addr``,
    ``X-ProxyUser-Ip``, ...).
    """
    return (canon in _SPOOFABLE or canon.endswith(_ADDRESS_SUFFIXES)
            or any(word in canon for word in _ADDRESS_WORDS))


def _canon(name: str) -> str:
    """A header name as CGI/WSGI-style servers see it: ``X_API_Key`` is ``x-api-key``.

    Those servers fold ``_`` into ``-`` (``HTTP_X_API_KEY``), so a dropped header must
    also be dropped under its underscore spelling, or it reaches the upstream anyway.
    """
    return name.lower().replace("_", "-")
# Response headers kept when an outcome is stored for replay.
REPLAY_SAFE = frozenset({"content-type", "content-language", "location", "etag",
                         "last-modified", "cache-control", "expires", "vary"})


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", []):
        listed.update(_canon(tok.strip()) for tok in value.split(",") if tok.strip())
    return listed


def upstream_request_headers(ex: Exchange, consumed: Iterable[str],
                             forward_credentials: bool, stripped: Iterable[str] = ()
                             ) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and consumed credentials, plus X-Forwarded-*.

    ``stripped`` headers are dropped even with ``forward_credentials``: identity
    assertions (trusted headers) the upstream might believe.
    """
    drop = HOP_BY_HOP | _REWRITTEN | _connection_listed(ex.headers)
    drop |= {_canon(s) for s in stripped}
    if not forward_credentials:
        drop |= {_canon(c) for c in consumed}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in ex.headers.items():
        canon = _canon(name)
        if canon not in drop and not is_connection_claim(canon):
            out.add(name, value)
    # X-Forwarded-For is the one chain kept (an ingress in front may have
    # written the real client): the proxy appends the peer it saw, and the
    # upstream trusts only the last entry
    prior = ", ".join(ex.headers.getall("X-Forwarded-For", []))
    out["X-Forwarded-For"] = f"{prior}, {ex.peer}" if prior else ex.peer
    out["X-Forwarded-Proto"] = ex.scheme
    if ex.host:
        out["X-Forwarded-Host"] = ex.host
    out["traceparent"] = ex.traceparent
    if ex.request_id:
        out["X-Request-Id"] = ex.request_id
    return out


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones (and framing we redo)."""
    drop = HOP_BY_HOP | _connection_listed(headers) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if _canon(name) not in drop:
            out.add(name, value)
    return out


def replay_headers(headers: CIMultiDictProxy[str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers.items() if k.lower() in REPLAY_SAFE)


class UpstreamClient:
    """The upstream session and the gate in front of its connection pool.

    ``gate`` admits at most ``pool_size`` requests to the session at once, so a
    request waits for a pool slot here, bounded by ``upstream.pool_timeout_ms``,
    and never inside the client where the wait would count as connecting.
    """

    __slots__ = ("gate", "session")

    def __init__(self, session: aiohttp.ClientSession, pool_size: int) -> None:
        self.session = session
        self.gate = asyncio.Semaphore(pool_size)

    async def close(self) -> None:
        await self.session.close()


def new_upstream(cfg: UpstreamConfig) -> UpstreamClient:
    return UpstreamClient(new_session(cfg), cfg.pool_size)


def new_session(cfg: UpstreamConfig) -> aiohttp.ClientSession:
    """The process-wide upstream session: pooled, bounded, no auto-decompression."""
    connector = aiohttp.TCPConnector(limit=cfg.pool_size, limit_per_host=cfg.pool_size,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    # connect bounds only the TCP connect: waiting for a pool slot is bounded
    # separately (the pipeline's pool gate), so the two are never confused
    timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                    sock_connect=cfg.connect_timeout_s,
                                    sock_read=cfg.read_timeout_s)
    session = aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    # A decision authorises one delivery. aiohttp re-sends an idempotent-method
    # request on a fresh connection when a reused keep-alive connection closes
    # without an answer; the first copy may have reached the upstream, so a
    # resend would be a second delivery under one ALLOW record. Retries are the
    # caller's, with its Idempotency-Key.
    session._retry_connection = False
    return session


async def read_capped(content: aiohttp.StreamReader, cap: int) -> bytes:
    """The whole body, or its first ``cap + 1`` bytes when it is longer.

    ``StreamReader.read(n)`` returns what is buffered so far, which may be a
    fraction of a body that arrives in several packets.
    """
    parts: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await content.read(cap + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
