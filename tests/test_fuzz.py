"""Fuzzing (docs/threat-model.md).

* hypothesis drives random requests (methods, paths, queries, headers, bodies,
  as raw bytes) through the real proxy against the recording upstream, which
  checks on arrival that an ALLOW decision with the request's id is already
  committed in the SQLite audit chain: "forwarded ⇒ ALLOW decision committed
  before the upstream saw it". The chain is verified with ``casf-proxy audit
  verify`` afterwards;
* hypothesis checks that a JSON body the proxy accepts reads the same to the
  policy, a first-wins and a last-wins decoder;
* atheris (coverage-guided, libFuzzer) runs tests/atheris_target.py for a
  bounded time (``CASF_FUZZ_SECONDS``, default 20) on the path normaliser,
  strict JSON and the header checks. Skipped when atheris is not installed,
  a failure in CI (tests/ci.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.strictjson import JsonRejected, loads_strict
from tests.ci import require_module
from tests.conftest import ROOT, Proxy, clinic_env, start_proxy, write_config
from tests.rawhttp import CheckingUpstream, audit_rows, exchange, request, run_checking_upstream

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = int(os.environ.get("CASF_FUZZ_EXAMPLES", "800"))
FUZZ_SECONDS = int(os.environ.get("CASF_FUZZ_SECONDS", "20"))
STATUSES: list[Any] = []
_FRESH = iter(range(10**9))
COUNTS = {"requests": 0, "forwarded": 0, "json_bodies": 0}


# ------------------------------------------------------------------ the proxy


@dataclass
class Env:
    proxy: Proxy
    upstream: CheckingUpstream
    audit: Path
    config: Path
    tmp: Path


def fuzz_patch(d: dict[str, Any]) -> None:
    d["limits"]["body_read_timeout_ms"] = 2000
    for route in d["routes"]:
        if route["method"] == "GET" and route["path"] == "/appointments":
            route["attributes"]["context.resource_tenant"] = {"from": "header",
                                                              "name": "X-Tenant"}
            route["resource_tenant"] = "context.resource_tenant"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("fuzz")
    up = CheckingUpstream(audit_path=tmp / "audit.db")
    async with run_checking_upstream(up):
        cfg = write_config(tmp, fuzz_patch)
        async with start_proxy(cfg, clinic_env(up.url, tmp), up) as proxy:
            yield Env(proxy, up, tmp / "audit.db", cfg, tmp)


# ------------------------------------------------------------------ strategies

SEGMENTS = st.sampled_from([
    "appointments", "patients", "p1", "p2", "history", "sms", "invoices", "admin", "a-1",
    "..", ".", "", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "%252e", "%25", "a%20b", "%C0%AE",
    "%C3%A9", "%00", "%FF", "x;y=1", "APPOINTMENTS", "History", "%41", "%7e", "~", "p1.",
    "\\", "%3b", "*",
])
QUERY_NAMES = st.sampled_from(["patient_id", "PATIENT_ID", "patient.id", "patient_id[]",
                               "patient%5Fid", "_method", "x", ""])
QUERY_VALUES = st.sampled_from(["p1", "p2", "", "%E9", "%00", "a+b", "%C3%A9", "DELETE",
                                "%2e%2e", "1"])


VALID = [("GET", "/appointments", b"demo-receptionist"),
         ("GET", "/appointments?patient_id=p1", b"demo-nurse"),
         ("GET", "/patients/p1/history", b"demo-doctor"),
         ("POST", "/appointments", b"demo-receptionist"),
         ("DELETE", "/appointments/a-1", b"demo-doctor"), ("POST", "/sms", b"demo-nurse"),
         ("POST", "/invoices", b"demo-billing")]
FRESH = b"@FRESH-ID@"  # replaced by a unique id per example


@st.composite
def targets(draw: st.DrawFn, base: str | None = None) -> str:
    if base is not None:  # a mapped route, sometimes with one hostile segment spliced in
        segs = base.split("?")[0].split("/")[1:]
        if draw(st.integers(0, 4)) == 0:
            segs.insert(draw(st.integers(0, len(segs))), draw(SEGMENTS))
        path = "/" + "/".join(segs)
        if "?" in base and draw(st.booleans()):
            return path + "?" + base.split("?", 1)[1]
    else:
        path = "/" + "/".join(draw(st.lists(SEGMENTS, max_size=5)))
    if draw(st.booleans()) and draw(st.booleans()):
        path = "/" + path
    pairs = draw(st.lists(st.tuples(QUERY_NAMES, QUERY_VALUES), max_size=3))
    if pairs:
        sep = draw(st.sampled_from(["&", ";"]))
        path += "?" + sep.join(f"{k}={v}" for k, v in pairs)
    return path


JSON_KEYS = st.sampled_from(["patient_id", "PATIENT_ID", "slot", "tenant_id", "amount_cents",
                             "message", "notes", "\\u0070atient_id", "x"])
SCALARS = st.one_of(
    st.sampled_from(["p1", "p2", "t1", "t2", "", "s"]), st.booleans(), st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


def _value_text(value: Any) -> str:
    return json.dumps(value)


@st.composite
def json_texts(draw: st.DrawFn) -> bytes:
    """JSON objects written by hand, so keys repeat and nest as the strategy likes."""
    def obj(depth: int) -> str:
        n = draw(st.integers(min_value=0, max_value=4))
        items = []
        for _ in range(n):
            key = draw(JSON_KEYS)
            if depth < 3 and draw(st.integers(0, 5)) == 0:
                value = obj(depth + 1)
            elif draw(st.integers(0, 7)) == 0:
                value = "[" + ",".join(_value_text(draw(SCALARS)) for _ in range(2)) + "]"
            else:
                value = _value_text(draw(SCALARS))
            items.append(f'"{key}":{value}')
        return "{" + ",".join(items) + "}"

    text = obj(0)
    if draw(st.integers(0, 15)) == 0:
        text = "[" * 70 + text + "]" * 70
    return text.encode()


BODIES = st.one_of(st.just(b""), json_texts(), st.binary(max_size=64),
                   st.sampled_from([b"patient_id=p1&_method=DELETE", b'{"patient_id":"p1"}',
                                    b"\xef\xbb\xbf{}", b"[1e400]", b"{}{}"]))
KEYS = st.sampled_from([None, b"demo-receptionist", b"demo-nurse", b"demo-doctor",
                        b"demo-billing", b"demo-custodian", b"demo-t2-receptionist",
                        b"demo-wrong", b"demo-doctor\xff", b""])
EXTRA_HEADERS = st.lists(st.tuples(
    st.sampled_from([b"X-HTTP-Method-Override", b"X-Original-URL", b"Connection", b"X-Tenant",
                     b"X_Tenant", b"Content-Encoding", b"X-Forwarded-For", b"Forwarded",
                     b"X-Casf-Role", b"X_API_Key", b"X-Note", b"X-Request-Id", b"Expect",
                     b"traceparent", b"Idempotency-Key"]),
    st.one_of(st.sampled_from([b"DELETE", b"/admin", b"X-API-Key", b"t1", b"t2", b"gzip",
                               b"identity", b"10.0.0.1", b"doctor", b"100-continue",
                               b"close, X-Tenant"]),
              st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b))),
    max_size=3)


VALID_BODIES = st.fixed_dictionaries(
    {"patient_id": st.sampled_from(["p1", "p2", "p3", "p4"])},
    optional={"slot": st.text(max_size=10), "message": st.text(max_size=10),
              "amount_cents": st.integers(0, 10_000), "tenant_id": st.sampled_from(["t1", "t2"]),
              "notes": st.text(max_size=20)}).map(lambda d: json.dumps(d).encode())


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    plausible = draw(st.integers(0, 3)) > 0  # mostly: a mapped route, mostly well-formed
    right_key: bytes | None = None
    if plausible:
        method, base, right_key = draw(st.sampled_from(VALID))
        target = draw(targets(base))
    else:
        method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "DELETE", "PUT", "HEAD",
                                       "OPTIONS", "PATCH"]))
        target = draw(targets())
    headers: list[tuple[str | bytes, str | bytes]] = []
    key = right_key if plausible and draw(st.integers(0, 5)) else draw(KEYS)
    if key is not None:
        headers.append((b"X-API-Key", key))
    if (plausible and method != "GET") or draw(st.booleans()):
        rid = draw(st.one_of(st.from_regex(r"\A[a-z0-9-]{6,20}\Z"),
                             st.text(alphabet=st.characters(min_codepoint=32,
                                                            max_codepoint=126), max_size=20)))
        fresh = plausible and draw(st.integers(0, 4)) > 0
        headers.append((b"Idempotency-Key", FRESH if fresh else rid.encode()))
    ctype = b"application/json" if plausible and draw(st.integers(0, 5)) else draw(
        st.sampled_from([b"application/json", b"text/plain",
                         b"application/x-www-form-urlencoded", None]))
    if ctype is not None:
        headers.append((b"Content-Type", ctype))
    if not plausible or draw(st.integers(0, 4)) == 0:
        headers += draw(EXTRA_HEADERS)
    body = b""
    if method in ("POST", "PUT", "PATCH", "DELETE"):
        body = draw(VALID_BODIES) if plausible and draw(st.integers(0, 3)) else draw(BODIES)
    return method, request(method, target, headers, body)


# ------------------------------------------------------------------ properties


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(req=raw_requests())
@MODULE_LOOP
async def test_forwarded_implies_committed_allow(env: Env, req: tuple[str, bytes]) -> None:
    method, raw = req
    raw = raw.replace(FRESH, f"fresh-{next(_FRESH)}".encode())
    up = env.upstream
    before = len(up.seen)
    got = await exchange(env.proxy.serving.traffic_port, raw, timeout=10,
                         head=method == "HEAD")
    COUNTS["requests"] += 1
    assert got, f"no answer to {raw[:200]!r}"  # never hangs, never drops the connection
    resp = got[0]
    STATUSES.append((resp.status, tuple(resp.reasons[:1])))
    new = up.seen[before:]
    assert up.violations == [], up.violations
    assert len(new) <= 1
    if new:
        COUNTS["forwarded"] += 1
        # it went through the pipeline's normalised, decided form
        seen = new[0]
        assert seen.method == method
        assert "//" not in seen.path_qs.split("?")[0]
        assert "X-API-Key" not in seen.headers and "X_API_Key" not in seen.headers
        assert "X-HTTP-Method-Override" not in seen.headers
    elif method != "HEAD" and resp.headers.get("Idempotent-Replayed") != "true":
        env_body = resp.envelope()  # not forwarded ⇒ the envelope, never an upstream body
        assert env_body["decision"] in ("DENY", "NEEDS_APPROVAL"), env_body
        assert resp.status >= 400


@MODULE_LOOP
async def test_fuzzed_chain_verifies(env: Env) -> None:
    """After the property run: the chain is intact and covers every forward."""
    up = env.upstream
    assert COUNTS["requests"] > 0
    assert up.checked == len(up.seen) and up.violations == []
    rows = audit_rows(env.audit)
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "-c",
                          str(env.config)], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env={**os.environ, **clinic_env(
                             up.url, env.tmp).variables})
    assert res.returncode == 0, res.stdout + res.stderr
    allowed = {r["request_id"] for r in rows if r["kind"] == "decision"
               and r["decision"] == "ALLOW"}
    assert {s.headers["X-Request-Id"] for s in up.seen} <= allowed
    print(f"\nfuzz (hypothesis, proxy): {COUNTS['requests']} requests, "
          f"{COUNTS['forwarded']} forwarded, {up.checked} checked at the upstream, "
          f"{len(rows)} audit records verified")
    print("  statuses:", Counter(STATUSES).most_common(12))


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


@settings(max_examples=1500, deadline=None, database=None)
@given(body=st.one_of(json_texts(), st.binary(max_size=40)))
def test_accepted_json_reads_the_same_to_every_decoder(body: bytes) -> None:
    COUNTS["json_bodies"] += 1
    try:
        doc = loads_strict(body)
    except JsonRejected:
        return
    assert json.loads(body, object_pairs_hook=_first_wins) == doc
    assert json.loads(body) == doc


# ------------------------------------------------------------------ atheris


def test_atheris_parser_and_json(tmp_path: Path) -> None:
    require_module("atheris", "pip install atheris, in the dev extras: the coverage-guided "
                   "fuzz run")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [b"\x00/patients/p1/../%2e/history?patient_id=p1&x=%C3%A9",
             b"\x00//appointments/./a%2Fb;x", b'\x01{"patient_id":"p1","a":[1,{"b":2.5}]}',
             b'\x01{"a":1,"A":2}', b"\x02X-Note: x\nContent-Encoding: gzip\n_method=x",
             b"\x02Transfer-Encoding: chunked, gzip\n"]
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    target = ROOT / "tests" / "atheris_target.py"
    res = subprocess.run(
        [sys.executable, str(target), f"-max_total_time={FUZZ_SECONDS}", "-print_final_stats=1",
         f"-dict={ROOT / 'tests' / 'atheris_target.dict'}",
         f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=2048", str(corpus)],
        capture_output=True, text=True, cwd=ROOT, timeout=FUZZ_SECONDS + 120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = res.stdout + res.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-",
                                                                         "timeout-", "oom-"))]
    assert res.returncode == 0 and not crashes, out[-4000:]
    runs = re.search(r"Done (\d+) runs in (\d+) second", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    assert runs is not None, out[-2000:]
    print(f"\nfuzz (atheris): {runs.group(1)} inputs in {runs.group(2)} s, "
          f"final cov/ft {cov[-1] if cov else '?'}, corpus {len(list(corpus.iterdir()))}")
    assert int(runs.group(1)) > 1000
