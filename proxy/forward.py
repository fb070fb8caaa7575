"""The upstream side: header rewriting and the one shared ClientSession."""

from __future__ import annotations

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
_SPOOFABLE = frozenset({"forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix",
                        "x-forwarded-server", "x-forwarded-scheme", "x-forwarded-ssl",
                        "x-client-ip", "true-client-ip", "x-original-url", "x-rewrite-url"})


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
    drop = HOP_BY_HOP | _REWRITTEN | _SPOOFABLE | _connection_listed(ex.headers)
    drop |= {_canon(s) for s in stripped}
    if not forward_credentials:
        drop |= {_canon(c) for c in consumed}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in ex.headers.items():
        if _canon(name) not in drop:
            out.add(name, value)
    prior = ex.headers.get("X-Forwarded-For")
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


def new_session(cfg: UpstreamConfig) -> aiohttp.ClientSession:
    """The process-wide upstream session: pooled, bounded, no auto-decompression."""
    connector = aiohttp.TCPConnector(limit=cfg.pool_size, limit_per_host=cfg.pool_size,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s,
                                    sock_connect=cfg.connect_timeout_s,
                                    sock_read=cfg.read_timeout_s)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


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
