"""Identity over real sockets: JWT/JWKS, reloadable API keys, trusted headers, ordering.

JWKS comes from a real aiohttp server on 127.0.0.1; every deny also asserts
that the upstream received nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from proxy.config import ConfigError, load_config
from proxy.identity.jwks import parse_jwks
from proxy.identity.jwt import JwtVerifier, TokenCache
from proxy.model import Principal
from tests.conftest import ADMIN_TOKEN, CLINIC, MakeProxy, Proxy, clinic_env, sha, write_config
from tests.waiting import wait_until

ISS = "https://idp.test.example"
AUD = "casf-test"
DROP = object()

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@cache
def keys() -> dict[str, Key]:
    return {
        "rs1": RSAKey.generate_key(2048, parameters={"kid": "rs1", "alg": "RS256"}, private=True),
        "ps1": RSAKey.generate_key(2048, parameters={"kid": "ps1", "alg": "PS256"}, private=True),
        "ec1": ECKey.generate_key("P-256", parameters={"kid": "ec1"}, private=True),
        "ed1": OKPKey.generate_key("Ed25519", parameters={"kid": "ed1"}, private=True),
        "rs2": RSAKey.generate_key(2048, parameters={"kid": "rs2", "alg": "RS256"}, private=True),
        "rs3": RSAKey.generate_key(2048, parameters={"kid": "rs3", "alg": "RS256"}, private=True),
        "other": RSAKey.generate_key(2048, parameters={"kid": "rs1"}, private=True),
    }


ALGS = {"rs1": "RS256", "ps1": "PS256", "ec1": "ES256", "ed1": "EdDSA", "rs2": "RS256",
        "rs3": "RS256", "other": "RS256"}


def public(*kids: str) -> list[dict[str, Any]]:
    return [dict(keys()[k].as_dict(private=False)) for k in kids]


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "user-nurse", "role": "nurse",
                            "tenant": "t1", "iat": now, "nbf": now - 1, "exp": now + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not DROP}


def mint(kid: str = "rs1", alg: str | None = None, header_kid: str | object | None = DROP,
         **over: Any) -> str:
    key = keys()[kid]
    if alg is not None and alg != ALGS[kid]:  # sign against the key's pinning
        key = RSAKey.import_key({k: v for k, v in key.as_dict(private=True).items()
                                 if k != "alg"})
    alg = alg or ALGS[kid]
    header: dict[str, Any] = {"alg": alg, "kid": kid if header_kid is DROP else header_kid}
    if header["kid"] is None:
        del header["kid"]
    return jwt.encode(header, claims(**over), key, algorithms=[alg])


def unsigned(header: dict[str, Any], body: dict[str, Any], sig: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(body).encode()), b64(sig)))


def rs_public_as_hs_secret() -> str:
    """The classic confusion: HS256 "signed" with the RSA public key's PEM."""
    rs1 = keys()["rs1"]
    assert isinstance(rs1, RSAKey)
    pem = rs1.as_pem(private=False)
    head = b64(json.dumps({"alg": "HS256", "kid": "rs1", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def tampered_signature() -> str:
    head, body, sig = mint().split(".")
    mid = len(sig) // 2
    return f"{head}.{body}.{sig[:mid]}{'A' if sig[mid] != 'A' else 'B'}{sig[mid + 1:]}"


def tampered_payload() -> str:
    head, _, sig = mint().split(".")
    return f"{head}.{b64(json.dumps(claims(role='doctor')).encode())}.{sig}"


# ------------------------------------------------------------ JWKS server


@dataclass
class Jwks:
    keys: list[dict[str, Any]]
    hits: int = 0
    url: str = ""
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def run_jwks(kids: tuple[str, ...] = ("rs1", "ps1", "ec1", "ed1")) -> AsyncIterator[Jwks]:
    state = Jwks(public(*kids))

    async def handler(_: web.Request) -> web.Response:
        state.hits += 1
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    state.runner = web.AppRunner(app, access_log=None)
    await state.runner.setup()
    site = web.TCPSite(state.runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{state.runner.addresses[0][1]}/jwks.json"
    try:
        yield state
    finally:
        await state.stop()


def jwt_patch(url: str, **jwt_over: Any) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        cfg: dict[str, Any] = {"issuer": ISS, "audience": AUD, "jwks_url": url,
                               "leeway_seconds": 5, "jwks_min_refresh_seconds": 0,
                               "jwks_timeout_ms": 500}
        cfg.update(jwt_over)
        d["identity"] = {"order": ["jwt", "api_keys"], "api_keys": d["identity"]["api_keys"],
                         "jwt": {k: v for k, v in cfg.items() if v is not DROP}}
    return patch


async def bearer(p: Proxy, token: str, method: str = "GET", path: str = "/appointments",
                 **kw: Any) -> tuple[int, Any, dict[str, Any]]:
    status, hdrs, raw = await p.call(method, path, key=None,
                                     headers={"Authorization": f"Bearer {token}"}, **kw)
    return status, hdrs, json.loads(raw) if status >= 400 else {}


# ------------------------------------------------------------ the JWT table

JWT_TABLE: list[tuple[str, Callable[[], str], int]] = [
    ("valid RS256", lambda: mint("rs1"), 200),
    ("valid PS256", lambda: mint("ps1"), 200),
    ("valid ES256", lambda: mint("ec1"), 200),
    ("valid EdDSA", lambda: mint("ed1"), 200),
    ("aud list naming us", lambda: mint(aud=["other", AUD]), 200),
    ("expired inside leeway", lambda: mint(exp=int(time.time()) - 2), 200),
    ("expired", lambda: mint(exp=int(time.time()) - 3600), 401),
    ("not yet valid", lambda: mint(nbf=int(time.time()) + 3600), 401),
    ("wrong aud", lambda: mint(aud="someone-else"), 401),
    ("wrong iss", lambda: mint(iss="https://evil.example"), 401),
    ("no exp", lambda: mint(exp=DROP), 401),
    ("missing role claim", lambda: mint(role=DROP), 401),
    ("missing sub claim", lambda: mint(sub=DROP), 401),
    ("unknown kid (refresh does not find it)", lambda: mint("rs3"), 401),
    ("no kid with several keys", lambda: mint(header_kid=None), 401),
    ("alg none, empty signature", lambda: unsigned({"alg": "none", "kid": "rs1"}, claims()), 401),
    ("alg none, junk signature",
     lambda: unsigned({"alg": "none", "kid": "rs1"}, claims(), b"junk"), 401),
    ("RS public key used as HS secret", rs_public_as_hs_secret, 401),
    ("alg not pinned to the key (PS256 on an RS256 key)", lambda: mint("rs1", alg="PS256"), 401),
    ("signed by another key under a known kid", lambda: mint("other"), 401),
    ("tampered signature", tampered_signature, 401),
    ("tampered payload", tampered_payload, 401),
    ("crit header", lambda: unsigned({"alg": "RS256", "kid": "rs1", "crit": ["x"]}, claims(),
                                     b"x" * 256), 401),
    ("not a JWS", lambda: "abc.def", 401),
    ("JWE-shaped", lambda: "a.b.c.d.e", 401),
]


@pytest.mark.parametrize(("name", "make", "status"), JWT_TABLE, ids=[r[0] for r in JWT_TABLE])
async def test_jwt_table(make_proxy: Any, name: str, make: Callable[[], str],
                         status: int) -> None:
    async with run_jwks() as server, make_proxy(jwt_patch(server.url)) as p:
        got, hdrs, env = await bearer(p, make())
        assert got == status, env
        if status == 401:
            assert env["reason_codes"] == ["Auth_Invalid"]
            assert hdrs["WWW-Authenticate"] == 'Bearer realm="casf", error="invalid_token"'
            assert p.upstream.seen == []
        else:
            assert len(p.upstream.seen) == 1
            assert "Authorization" not in p.upstream.seen[0].headers  # consumed


async def test_jwt_principal_reaches_policy_and_audit(make_proxy: Any, tmp_path: Path) -> None:
    async with run_jwks() as server, make_proxy(jwt_patch(server.url)) as p:
        # nurse may not invoice (policy), doctor may read history
        status, _, env = await bearer(p, mint(role="nurse"), "POST", "/invoices",
                                      json={"patient_id": "p1", "amount_cents": 1}, rid="i1")
        assert (status, env["reason_codes"]) == (403, ["Role_NotPermitted"])
        status, _, _ = await bearer(p, mint(role="doctor", sub="dr-who"), "GET",
                                    "/patients/p1/history")
        assert status == 200
    db = sqlite3.connect(tmp_path / "audit.db")
    rows = db.execute("SELECT actor, extra FROM audit_events WHERE kind = 'decision' "
                      "AND decision = 'ALLOW' ORDER BY seq").fetchall()
    db.close()
    assert rows[-1][0] == "dr-who"
    assert "jwt:rs1" in rows[-1][1]  # the key id, never the token


async def test_invalid_jwt_never_falls_through_to_api_key(make_proxy: Any) -> None:
    async with run_jwks() as server, make_proxy(jwt_patch(server.url)) as p:
        status, hdrs, raw = await p.call("GET", "/appointments", key="receptionist",
                                         headers={"Authorization": f"Bearer {mint(exp=1)}"})
        assert status == 401
        assert json.loads(raw)["reason_codes"] == ["Auth_Invalid"]
        assert p.upstream.seen == []
        # and the other way round: api_keys first, a bad key with a good token
        assert "invalid_token" in hdrs["WWW-Authenticate"]


async def test_api_keys_first_in_order(make_proxy: Any) -> None:
    async with run_jwks() as server:
        patch = jwt_patch(server.url)

        def first_keys(d: dict[str, Any]) -> None:
            patch(d)
            d["identity"]["order"] = "api_keys,jwt"

        async with make_proxy(first_keys) as p:
            status, hdrs, _ = await p.call("GET", "/appointments", key="demo-nope",
                                           headers={"Authorization": f"Bearer {mint()}"})
            assert status == 401
            assert hdrs["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
            status, _, _ = await p.call("GET", "/appointments", key=None,
                                        headers={"Authorization": f"Bearer {mint()}"})
            assert status == 200


async def test_missing_credentials_lists_every_challenge(make_proxy: Any) -> None:
    async with run_jwks() as server, make_proxy(jwt_patch(server.url)) as p:
        status, hdrs, raw = await p.call("GET", "/appointments", key=None)
        assert status == 401
        assert json.loads(raw)["reason_codes"] == ["Auth_Missing"]
        assert hdrs["WWW-Authenticate"] == 'Bearer realm="casf", ApiKey header="X-API-Key"'
        status, _, raw = await p.call("GET", "/appointments", key=None,
                                      headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert (status, json.loads(raw)["reason_codes"]) == (401, ["Auth_Invalid"])


async def test_unknown_kid_refresh_finds_rotated_key(make_proxy: Any) -> None:
    async with run_jwks(("rs1",)) as server, make_proxy(jwt_patch(server.url)) as p:
        assert (await bearer(p, mint("rs1")))[0] == 200
        server.keys = public("rs1", "rs2")  # the IdP rotates
        hits = server.hits
        assert (await bearer(p, mint("rs2")))[0] == 200
        assert server.hits == hits + 1
        assert (await bearer(p, mint("rs3")))[0] == 401  # refresh does not find it
        assert server.hits == hits + 2


async def test_unknown_kid_refresh_is_rate_bounded(make_proxy: Any) -> None:
    async with run_jwks(("rs1",)) as server, \
            make_proxy(jwt_patch(server.url, jwks_min_refresh_seconds=60)) as p:
        hits = server.hits
        server.keys = public("rs1", "rs2")
        # within the bound since the start-up fetch: no fetch, the kid stays unknown
        results = await asyncio.gather(*(bearer(p, mint("rs3")) for _ in range(20)))
        assert {r[0] for r in results} == {401}
        assert server.hits == hits
        assert (await bearer(p, mint("rs2")))[0] == 401


async def test_concurrent_unknown_kids_share_one_fetch(make_proxy: Any) -> None:
    async with run_jwks(("rs1",)) as server, \
            make_proxy(jwt_patch(server.url, jwks_min_refresh_seconds=0.5)) as p:
        # the refresh bound (0.5 s) since the start-up fetch must pass: the time
        # itself is the behaviour, and a longer wait cannot fail the test
        await asyncio.sleep(0.6)
        server.keys = public("rs1", "rs2")
        hits = server.hits
        results = await asyncio.gather(*(bearer(p, mint("rs2", sub=f"u{i}"))
                                         for i in range(20)))
        assert {r[0] for r in results} == {200}
        assert server.hits == hits + 1


async def test_jwks_down_cached_keys_keep_working(make_proxy: Any) -> None:
    async with run_jwks() as server, make_proxy(jwt_patch(server.url)) as p:
        assert (await bearer(p, mint("rs1")))[0] == 200
        await server.stop()
        # a new token (not in the verification cache) with a cached key
        assert (await bearer(p, mint("ec1", sub="someone-new")))[0] == 200
        # an unknown kid: the refresh fails, the request is a 401, the proxy lives on
        status, _, env = await bearer(p, mint("rs3"))
        assert (status, env["reason_codes"]) == (401, ["Auth_Invalid"])
        assert (await bearer(p, mint("ed1")))[0] == 200
        text = await p.metrics()
        assert 'casf_identity_reload_total{result="error",source="jwks"}' in text


async def test_jwks_never_loaded_is_401_not_a_crash(make_proxy: Any) -> None:
    async with run_jwks() as server:
        url = server.url
    async with make_proxy(jwt_patch(url)) as p:  # the server is gone: nothing to fetch
        status, hdrs, env = await bearer(p, mint("rs1"))
        assert (status, env["reason_codes"]) == (401, ["Auth_Invalid"])
        assert "invalid_token" in hdrs["WWW-Authenticate"]
        assert (await p.call("GET", "/appointments"))[0] == 200  # API keys still work
        assert p.rt.identity is not None


async def test_jwks_file_and_example_token(make_proxy: Any) -> None:
    """The clinic example as shipped: dev JWKS file, tokens from mint_token.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mint_token", CLINIC / "mint_token.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    async with make_proxy() as p:
        status, _, _ = await bearer(p, mod.mint("doctor", "t1"), "GET", "/patients/p1/history")
        assert status == 200
        status, _, env = await bearer(p, mod.mint("receptionist", "t1"), "GET",
                                      "/patients/p1/history")
        assert (status, env["reason_codes"]) == (403, ["Role_NotPermitted"])
        status, _, env = await bearer(p, mod.mint("doctor", "t1", ttl=-3600), "GET",
                                      "/appointments")
        assert (status, env["reason_codes"]) == (401, ["Auth_Invalid"])
        assert (await p.call("GET", "/appointments", key="nurse"))[0] == 200


async def test_example_jwt_only_switch(make_proxy: Any) -> None:
    async with make_proxy(CASF_AUTH="jwt") as p:
        status, _, raw = await p.call("GET", "/appointments", key="nurse")
        assert (status, json.loads(raw)["reason_codes"]) == (401, ["Auth_Missing"])


# ------------------------------------------------------------ HS256


HS_SECRET = "x" * 16 + "-test-secret-of-48-bytes-long-" + "y" * 2


def hs_token(secret: bytes, **over: Any) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims(**over)).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def test_hs256_only_with_env_secret(make_proxy: Any) -> None:
    async with run_jwks() as server, make_proxy(
            jwt_patch(server.url, hs256_secret_env="TEST_JWT_SECRET"),
            TEST_JWT_SECRET=HS_SECRET) as p:
        assert (await bearer(p, hs_token(HS_SECRET.encode())))[0] == 200
        assert (await bearer(p, hs_token(b"another secret of enough length, 32+b")))[0] == 401
        assert (await bearer(p, rs_public_as_hs_secret()))[0] == 401
        assert (await bearer(p, mint("rs1")))[0] == 200
    assert HS_SECRET not in repr(p.cfg)


@pytest.mark.parametrize(("over", "env", "where"), [
    ({"algorithms": ["RS256", "HS256"]}, {}, "identity.jwt.algorithms"),
    ({"algorithms": ["none"]}, {}, "identity.jwt.algorithms"),
    ({"hs256_secret_env": "TEST_JWT_SECRET"}, {}, "identity.jwt.hs256_secret_env"),
    ({"hs256_secret_env": "TEST_JWT_SECRET"}, {"TEST_JWT_SECRET": "short"},
     "identity.jwt.hs256_secret_env"),
    ({"issuer": DROP}, {}, "identity.jwt.issuer"),
    ({"audience": DROP}, {}, "identity.jwt.audience"),
    ({"jwks_url": "http://idp.example/jwks"}, {}, "identity.jwt.jwks_url"),
    ({"jwks_url": DROP}, {}, "identity.jwt"),
    ({"claims": {"role": "a b"}}, {}, "identity.jwt.claims.role"),
])
def test_jwt_config_errors(tmp_path: Path, over: dict[str, Any], env: dict[str, str],
                           where: str) -> None:
    path = write_config(tmp_path, jwt_patch("http://127.0.0.1:1/jwks.json", **over))
    with pytest.raises(ConfigError) as info:
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path, **env))
    assert f": {where}:" in str(info.value), str(info.value)


def test_jwks_parsing_pins_and_skips() -> None:
    doc = {"keys": [
        *public("rs1", "ec1", "ed1"),
        {"kty": "oct", "k": b64(b"s" * 32), "kid": "sym"},
        {**public("rs2")[0], "use": "enc"},
        {**public("rs3")[0], "alg": "HS256"},
        {**public("ps1")[0], "alg": "PS256"},
        {**public("other")[0], "kid": "noalg"},
    ]}
    allowed = frozenset({"RS256", "PS256", "ES256", "EdDSA", "Ed25519"})
    got = parse_jwks(json.dumps(doc).encode(), allowed, "test")
    assert {k: sorted(v.algorithms) for k, v in got.items()} == {
        "rs1": ["RS256"], "ec1": ["ES256"], "ed1": ["Ed25519", "EdDSA"], "ps1": ["PS256"],
        "noalg": ["RS256"]}
    assert parse_jwks(json.dumps(doc).encode(), frozenset({"ES256"}), "t").keys() == {"ec1"}
    with pytest.raises(ValueError):
        parse_jwks(b"[]", allowed, "t")


async def test_verified_token_cache_expires_with_the_token(tmp_path: Path) -> None:
    path = write_config(tmp_path, jwt_patch("http://127.0.0.1:1/x",
                                            hs256_secret_env="TEST_JWT_SECRET",
                                            jwks_url=DROP, leeway_seconds=0, cache_size=2))
    cfg = load_config(path, clinic_env("http://127.0.0.1:1", tmp_path,
                                       TEST_JWT_SECRET=HS_SECRET))
    assert cfg.identity.jwt is not None
    verifier = JwtVerifier(cfg.identity.jwt, None)
    now = time.time()
    token = hs_token(HS_SECRET.encode(), exp=int(now) + 10).encode()
    first = await verifier.verify(token, now)
    assert isinstance(first, Principal)
    assert len(verifier.cache) == 1
    assert await verifier.verify(token, now + 5) is first  # from the cache
    late = await verifier.verify(token, now + 11)
    assert not isinstance(late, Principal) and late.reason == "expired"
    assert len(verifier.cache) == 0
    for i in range(5):  # bounded
        await verifier.verify(hs_token(HS_SECRET.encode(), sub=f"u{i}").encode(), now)
    assert len(verifier.cache) == 2

    cache = TokenCache(1)
    p = Principal("a", "r", None, "jwt", "jwt")
    cache.put(b"k", p, now + 1)
    assert cache.get(b"k", now) is p and cache.get(b"k", now + 1) is None


# ------------------------------------------------------------ API keys


def keys_yaml(entries: dict[str, tuple[str, str]]) -> str:
    return yaml.safe_dump({"keys": [
        {"id": kid, "sha256": sha(secret), "principal": {"id": f"user-{kid}", "role": role,
                                                         "tenant": "t1"}}
        for kid, (secret, role) in entries.items()]})


def keys_patch(keys_file: Path | None = None, keys_dir: Path | None = None,
               interval_ms: int = 1000) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        ak: dict[str, Any] = {"header": "X-API-Key", "reload_interval_ms": interval_ms}
        if keys_file is not None:
            ak["keys_file"] = str(keys_file)
        if keys_dir is not None:
            ak["keys_dir"] = str(keys_dir)
        d["identity"] = {"api_keys": ak}
    return patch


async def test_api_key_revoked_by_file_reload(make_proxy: MakeProxy, tmp_path: Path) -> None:
    kf = tmp_path / "keys.yaml"
    kf.write_text(keys_yaml({"k-nurse": ("s3cret-nurse-key", "nurse"),
                             "k-rec": ("s3cret-rec-key", "receptionist")}))
    async with make_proxy(keys_patch(kf, interval_ms=100)) as p:
        assert (await p.call("GET", "/appointments", key="s3cret-nurse-key"))[0] == 200
        assert (await p.call("GET", "/appointments", key="not-a-key"))[0] == 401
        kf.write_text(keys_yaml({"k-rec": ("s3cret-rec-key", "receptionist"),
                                 "k-new": ("s3cret-new-key", "nurse")}))

        async def revoked() -> bool:
            return (await p.call("GET", "/appointments", key="s3cret-nurse-key"))[0] == 401

        await wait_until(revoked, "the revoked key to be refused")  # no restart
        assert (await p.call("GET", "/appointments", key="s3cret-new-key"))[0] == 200
        assert (await p.call("GET", "/appointments", key="s3cret-rec-key"))[0] == 200
        # a broken file keeps the last good key set (once the watcher has read it):
        # the runtime's one file watcher reloads the config, which refuses the file
        failed = 'casf_config_reload_total{result="error"}'

        async def failures() -> float:
            m = re.search(re.escape(failed) + r" (\S+)$", await p.metrics(), re.M)
            return float(m.group(1)) if m else 0.0

        before = await failures()
        kf.write_text("keys: [ {id: broken")

        async def reload_failed() -> bool:
            return await failures() > before

        await wait_until(reload_failed, "the broken keys file to be read and refused")
        assert (await p.call("GET", "/appointments", key="s3cret-new-key"))[0] == 200


async def test_api_key_reload_endpoint(make_proxy: Any, tmp_path: Path) -> None:
    kf = tmp_path / "keys.yaml"
    kf.write_text(keys_yaml({"k1": ("first-key-value", "nurse")}))
    async with make_proxy(keys_patch(kf, interval_ms=60_000)) as p:
        assert (await p.call("GET", "/appointments", key="first-key-value"))[0] == 200
        kf.write_text(keys_yaml({"k2": ("second-key-value", "nurse")}))
        async with p.session.post(p.admin + "/admin/identity/reload") as r:
            assert r.status in (401, 404)
        async with p.session.post(p.admin + "/admin/identity/reload",
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            assert (await r.json())["reloaded"]["api_keys"] == 1
        assert (await p.call("GET", "/appointments", key="first-key-value"))[0] == 401
        assert (await p.call("GET", "/appointments", key="second-key-value"))[0] == 200


def write_secret_key(directory: Path, kid: str, secret: str, role: str) -> None:
    (directory / kid).write_text(yaml.safe_dump({
        "sha256": sha(secret), "principal": {"id": f"svc-{kid}", "role": role, "tenant": "t1"}}))


async def test_api_keys_from_secret_directory(make_proxy: MakeProxy, tmp_path: Path) -> None:
    d = tmp_path / "secret"
    d.mkdir()
    write_secret_key(d, "svc-nurse", "dir-key-nurse", "nurse")
    (d / "..data").mkdir()  # Kubernetes' own entries are skipped
    async with make_proxy(keys_patch(keys_dir=d, interval_ms=100)) as p:
        assert (await p.call("GET", "/appointments", key="dir-key-nurse"))[0] == 200
        write_secret_key(d, "svc-doctor", "dir-key-doctor", "doctor")

        async def added() -> bool:
            return (await p.call("GET", "/patients/p1/history", key="dir-key-doctor"))[0] == 200

        await wait_until(added, "the added key to be accepted")
        (d / "svc-nurse").unlink()

        async def removed() -> bool:
            return (await p.call("GET", "/appointments", key="dir-key-nurse"))[0] == 401

        await wait_until(removed, "the removed key to be refused")


def test_keys_dir_config_errors(tmp_path: Path) -> None:
    d = tmp_path / "secret"
    d.mkdir()
    (d / "bad id!").write_text("sha256: x")
    path = write_config(tmp_path, keys_patch(keys_dir=d))
    with pytest.raises(ConfigError, match="usable key id"):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))
    (d / "bad id!").unlink()
    write_secret_key(d, "a", "same", "nurse")
    write_secret_key(d, "b", "same", "nurse")
    with pytest.raises(ConfigError, match="duplicate key hash"):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))
    path = write_config(tmp_path, keys_patch(keys_dir=tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"identity\.api_keys\.keys_dir"):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))


async def test_keys_and_tokens_never_logged(make_proxy: Any, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kf = tmp_path / "keys.yaml"
    secret_key, wrong_key = "super-secret-key-value-1234", "wrong-secret-key-value-5678"
    kf.write_text(keys_yaml({"k-logged": (secret_key, "nurse")}))
    async with run_jwks() as server:
        patch = jwt_patch(server.url)

        def both(d: dict[str, Any]) -> None:
            patch(d)
            d["identity"]["api_keys"] = {"keys_file": str(kf), "reload_interval_ms": 100}

        async with make_proxy(both) as p:
            token, bad = mint(), mint(exp=1)
            assert (await p.call("GET", "/appointments", key=secret_key))[0] == 200
            assert (await p.call("GET", "/appointments", key=wrong_key))[0] == 401
            assert (await bearer(p, token))[0] == 200
            assert (await bearer(p, bad))[0] == 401
            kf.write_text(keys_yaml({"k-other": (wrong_key, "nurse")}))
            await p.rt.identity.reload() if p.rt.identity else None
    text = caplog.text
    assert "k-logged" in text  # the key id is logged ...
    for secret in (secret_key, wrong_key, token, bad, token.split(".")[2]):
        assert secret not in text  # ... never the key or the token
    audit = b"".join(f.read_bytes() for f in tmp_path.glob("audit.db*") if f.is_file())
    assert b"k-logged" in audit
    for secret in (secret_key, wrong_key, token, token.split(".")[2]):
        assert secret.encode() not in audit


# ------------------------------------------------------------ trusted headers


def trusted_patch(d: dict[str, Any]) -> None:
    d["identity"]["trusted_headers"] = {"enabled": True, "sources": ["127.0.0.1/32"]}
    d["identity"]["order"] = ["trusted_headers", "api_keys"]


async def call_from(p: Proxy, local: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0))
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.get(p.url + "/appointments", headers=headers) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if r.status >= 400 else {}


ASSERTED = {"X-Casf-Actor": "mesh-user", "X-Casf-Role": "nurse", "X-Casf-Tenant": "t1"}


async def test_trusted_headers_from_allowed_source(make_proxy: Any) -> None:
    async with make_proxy(trusted_patch, CASF_HOST="0.0.0.0") as p:
        status, _ = await call_from(p, "127.0.0.1", ASSERTED)
        assert status == 200
        seen = p.upstream.seen[0]
        assert not any(h in seen.headers for h in ASSERTED)  # never forwarded
        status, env = await call_from(p, "127.0.0.1", {"X-Casf-Actor": "mesh-user"})
        assert (status, env["reason_codes"]) == (401, ["Auth_Invalid"])  # no role


async def test_trusted_headers_from_other_source_are_ignored(make_proxy: Any) -> None:
    async with make_proxy(trusted_patch, CASF_HOST="0.0.0.0") as p:
        status, env = await call_from(p, "127.0.0.2", ASSERTED)
        assert (status, env["reason_codes"]) == (401, ["Auth_Missing"])
        assert p.upstream.seen == []
        # another method still applies; the asserted identity is not used nor forwarded
        status, _ = await call_from(p, "127.0.0.2", {**ASSERTED, "X-Casf-Role": "doctor",
                                                     "X-API-Key": "demo-receptionist"})
        assert status == 200
        assert not any(h in p.upstream.seen[0].headers for h in ASSERTED)


def test_trusted_headers_off_by_default(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["identity"]["trusted_headers"] = {"sources": ["127.0.0.1/32"]}  # not enabled

    cfg = load_config(write_config(tmp_path, patch), clinic_env("http://127.0.0.1:1", tmp_path))
    assert cfg.identity.trusted_headers is None
    assert "trusted_headers" not in cfg.identity.order


@pytest.mark.parametrize(("section", "match"), [
    ({"enabled": True}, "identity.trusted_headers.sources"),
    ({"enabled": True, "sources": ["0.0.0.0/0"]}, "would trust every address"),
    ({"enabled": True, "sources": ["nope"]}, "is not an IP network"),
    ({"enabled": True, "sources": ["10.0.0.0/8"], "headers": {"role": "X-Casf-Actor"}},
     "different headers"),
])
def test_trusted_headers_config_errors(tmp_path: Path, section: dict[str, Any],
                                       match: str) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["identity"]["trusted_headers"] = section

    path = write_config(tmp_path, patch)
    with pytest.raises(ConfigError, match=match):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))


def test_order_errors(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["identity"]["order"] = ["api_keys", "trusted_headers"]

    path = write_config(tmp_path, patch)
    with pytest.raises(ConfigError, match="'trusted_headers' is not configured"):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))
