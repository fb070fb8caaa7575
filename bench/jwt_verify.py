"""Cost of JWT verification per request, with and without the verified-token cache.

    .venv/bin/python bench/jwt_verify.py            # verifier only, every algorithm
    .venv/bin/python bench/jwt_verify.py --http     # plus whole requests through the proxy

Verifier mode times ``JwtVerifier.verify`` (header parsing, key lookup,
signature, claims; the same code the authenticator runs) for each algorithm:
"uncached" with ``cache_size: 0`` (a full verification every call), "cached"
with the same token again (SHA-256 of the token + an LRU lookup). The API-key
lookup is timed for comparison.

HTTP mode starts the proxy in-process on the clinic config in front of a tiny
upstream and sends sequential GET /appointments with: an API key; one JWT
again and again (cache hits); a fresh JWT per request (minted beforehand, so
every request pays a full RS256 verification).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey  # noqa: E402

from proxy.config import JwtConfig  # noqa: E402
from proxy.identity.jwks import KeySetCache  # noqa: E402
from proxy.identity.jwt import JwtVerifier  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402

warnings.filterwarnings("ignore", message="EdDSA is deprecated")
ISS, AUD = "https://idp.bench", "casf-bench"
SECRET = b"bench-secret-bench-secret-bench-secret-48-bytes!!"


def make_keys() -> dict[str, tuple[str, Key]]:
    return {
        "RS256": ("rs", RSAKey.generate_key(2048, parameters={"kid": "rs", "alg": "RS256"},
                                            private=True)),
        "PS256": ("ps", RSAKey.generate_key(2048, parameters={"kid": "ps", "alg": "PS256"},
                                            private=True)),
        "ES256": ("ec", ECKey.generate_key("P-256", parameters={"kid": "ec"}, private=True)),
        "EdDSA": ("ed", OKPKey.generate_key("Ed25519", parameters={"kid": "ed"}, private=True)),
    }


def token(alg: str, kid: str | None, key: Any, sub: str = "bench-user") -> bytes:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "sub": sub, "role": "nurse", "tenant": "t1",
              "iat": now, "exp": now + 3600}
    header = {"alg": alg} | ({"kid": kid} if kid else {})
    return jwt.encode(header, claims, key, algorithms=[alg]).encode()


async def verifier_bench(n: int) -> list[tuple[str, float, float]]:
    keys = make_keys()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "jwks.json").write_text(json.dumps(
        {"keys": [dict(k.as_dict(private=False)) for _, k in keys.values()]}))
    base = JwtConfig(issuers=(ISS,), audiences=(AUD,),
                     algorithms=frozenset({"RS256", "PS256", "ES256", "EdDSA", "Ed25519",
                                           "HS256"}),
                     jwks_file=tmp / "jwks.json", hs256_secret=SECRET)
    rows = []
    for cache_size in (0, 10_000):
        cfg = dataclasses.replace(base, cache_size=cache_size)
        cache = KeySetCache(cfg, Metrics())
        await cache.refresh()
        verifier = JwtVerifier(cfg, cache)
        for alg, (kid, key) in [*keys.items(), ("HS256", (None, OctKey.import_key(SECRET)))]:
            tok = token(alg, kid, key)
            assert not hasattr(await verifier.verify(tok), "reason"), alg
            n = 2000 if cache_size else 400
            start = time.perf_counter()
            for _ in range(n):
                await verifier.verify(tok)
            rows.append((alg, cache_size, (time.perf_counter() - start) / n * 1e6))
        await cache.close()
    out = []
    for alg in ("RS256", "PS256", "ES256", "EdDSA", "HS256"):
        unc = next(r[2] for r in rows if r[0] == alg and r[1] == 0)
        hit = next(r[2] for r in rows if r[0] == alg and r[1] > 0)
        out.append((alg, unc, hit))
    return out


def api_key_us(n: int = 200_000) -> float:
    import hashlib
    import hmac

    table = {hashlib.sha256(f"key-{i}".encode()).hexdigest(): i for i in range(100)}
    presented = "key-42"
    start = time.perf_counter()
    for _ in range(n):
        d = hashlib.sha256(presented.encode()).hexdigest()
        hit = table.get(d)
        hmac.compare_digest(d, d if hit is not None else "")
    return (time.perf_counter() - start) / n * 1e6


# ------------------------------------------------------------ whole requests


async def http_bench(n: int) -> list[tuple[str, float, float]]:
    import aiohttp
    from aiohttp import web

    from proxy.app import Runtime, serve
    from proxy.config import load_config
    from proxy.settings import Environment
    sys.path.insert(0, str(ROOT / "examples" / "clinic"))
    from mint_token import mint  # type: ignore[import-not-found]

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    up = f"http://127.0.0.1:{runner.addresses[0][1]}"
    tmp = Path(tempfile.mkdtemp())
    env = Environment({"CLINIC_UPSTREAM": up, "CASF_PORT": "0", "CASF_ADMIN_PORT": "0",
                       "CASF_DECISIONS_PORT": "0",
                       "CASF_AUDIT_PATH": str(tmp / "audit.db")})
    cfg = load_config(ROOT / "examples" / "clinic" / "casf.yaml", env)
    fresh = [mint("nurse", "t1", subject=f"u{i}") for i in range(n + 50)]
    same = mint("nurse", "t1")
    results = []
    async with Runtime.open(cfg, env) as rt:
        serving = await serve(rt)
        url = f"http://127.0.0.1:{serving.traffic_port}/appointments"
        try:
            async with aiohttp.ClientSession() as s:
                async def run(label: str, headers_for: Any) -> None:
                    for i in range(50):  # warm-up (connections, caches)
                        async with s.get(url, headers=headers_for(i)) as r:
                            assert r.status == 200, await r.text()
                    lat = []
                    for i in range(50, n + 50):
                        t0 = time.perf_counter()
                        async with s.get(url, headers=headers_for(i)) as r:
                            await r.read()
                            assert r.status == 200
                        lat.append((time.perf_counter() - t0) * 1e6)
                    results.append((label, statistics.mean(lat), statistics.median(lat)))

                await run("API key", lambda i: {"X-API-Key": "demo-nurse"})
                await run("JWT RS256, cache hit", lambda i: {"Authorization": f"Bearer {same}"})
                await run("JWT RS256, fresh token", lambda i: {
                    "Authorization": f"Bearer {fresh[i]}"})
        finally:
            await serving.close()
    await runner.cleanup()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", action="store_true", help="also time whole requests")
    ap.add_argument("-n", type=int, default=2000, help="requests per HTTP case")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    print(f"python {sys.version.split()[0]}")
    print("\nverifier (µs per verification)")
    print(f"{'alg':<8}{'uncached':>12}{'cached':>10}")
    for alg, unc, hit in asyncio.run(verifier_bench(0)):
        print(f"{alg:<8}{unc:>12.1f}{hit:>10.2f}")
    print(f"{'API key':<8}{'':>12}{api_key_us():>10.2f}   (SHA-256 + dict + compare_digest)")
    if args.http:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        print(f"\nwhole requests through the proxy (µs, sequential, n={args.n})")
        print(f"{'case':<26}{'mean':>10}{'median':>10}")
        for label, mean, median in asyncio.run(http_bench(args.n)):
            print(f"{label:<26}{mean:>10.0f}{median:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
