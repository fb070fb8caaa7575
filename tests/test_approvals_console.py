"""The console over HTTP (no browser): sign-in, cookies, CSRF, headers, filters, tenants.

The browser walk-through is tests/test_console_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.model import Status
from tests.approvals_support import Env, approvals_env, key, with_console

CFG = ApprovalsConfig(approver_roles=("custodian",))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with approvals_env(tmp_path, cfg=CFG, trusted=True, build=with_console()) as e:
        yield e


async def sign_in(env: Env, who: str, jar: aiohttp.CookieJar | None = None
                  ) -> aiohttp.ClientSession:
    http = aiohttp.ClientSession(cookie_jar=jar or aiohttp.CookieJar(unsafe=True))
    async with http.get(env.url + "/console/login") as resp:
        page = await resp.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    async with http.post(env.url + "/console/login",
                         data={"csrf": csrf.group(1), "api_key": key(who)},
                         allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == "/console/"
    return http


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None
    return m.group(1)


async def test_unsigned_is_sent_to_sign_in(env: Env) -> None:
    async with env.http.get(env.url + "/console/", allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/console/login"
    async with env.http.get(env.url + "/console", allow_redirects=False) as resp:
        assert resp.status == 308 and resp.headers["Location"] == "/console/"


async def test_sign_in_cookie_and_headers(env: Env) -> None:
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.get(env.url + "/console/login") as resp:
            page = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "style-src 'self'" in csp
        assert "<script" not in page and "style=" not in page
        async with http.post(env.url + "/console/login",
                             data={"csrf": csrf_of(page), "api_key": key("custodian2")},
                             allow_redirects=False) as resp:
            cookie = resp.headers.getall("Set-Cookie")
        session = next(c for c in cookie if c.startswith("casf_console="))
        assert "HttpOnly" in session and "SameSite=Strict" in session
        assert "Path=/console/" in session and "Max-Age=900" in session
        async with http.get(env.url + "/console/") as resp:
            assert resp.status == 200
            page = await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"
            assert resp.headers["X-Frame-Options"] == "DENY"
        assert "user-custodian2" in page and "STEP_UP" in page
        async with http.get(env.url + "/console/static/console.css") as resp:
            assert resp.status == 200 and resp.content_type == "text/css"
    finally:
        await http.close()


@pytest.mark.parametrize(("who", "problem"), [("nurse", "role"), ("nobody", "bad_key")])
async def test_sign_in_refusals(env: Env, who: str, problem: str) -> None:
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.get(env.url + "/console/login") as resp:
            page = await resp.text()
        async with http.post(env.url + "/console/login",
                             data={"csrf": csrf_of(page), "api_key": key(who)},
                             allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"/console/login?problem={problem}"
            assert "casf_console=" not in " ".join(resp.headers.getall("Set-Cookie", []))
    finally:
        await http.close()


async def test_sign_in_without_login_token_is_403(env: Env) -> None:
    async with env.http.post(env.url + "/console/login",
                             data={"api_key": key("custodian2")}) as resp:
        assert resp.status == 403
        assert (await resp.json())["reason_codes"] == ["Console_CsrfInvalid"]


@pytest.mark.parametrize("token", [None, "", "wrong"])
async def test_post_without_valid_csrf_is_403_and_changes_nothing(env: Env,
                                                                  token: str | None) -> None:
    aid = (await env.seed()).approval.id
    http = await sign_in(env, "custodian2")
    try:
        data = {"comment": "ok"} if token is None else {"csrf": token, "comment": "ok"}
        for path in (f"/console/approvals/{aid}/approve", "/console/logout",
                     "/console/chain/verify"):
            async with http.post(env.url + path, data=data, allow_redirects=False) as resp:
                assert resp.status == 403
                body = await resp.json()
                assert body["reason_codes"] == ["Console_CsrfInvalid"]
                assert body["decision"] == "DENY"
        got = await env.approvals.lookup("user-custodian\0r-1")
        assert got is not None and got.status is Status.PENDING
        # the session is still good (sign-out was refused too)
        async with http.get(env.url + "/console/", allow_redirects=False) as resp:
            assert resp.status == 200
    finally:
        await http.close()


async def test_another_sessions_csrf_token_is_refused(env: Env) -> None:
    aid = (await env.seed()).approval.id
    one = await sign_in(env, "custodian2")
    two = await sign_in(env, "custodian2")
    try:
        async with one.get(env.url + "/console/") as resp:
            token_one = csrf_of(await resp.text())
        async with two.post(env.url + f"/console/approvals/{aid}/approve",
                            data={"csrf": token_one}, allow_redirects=False) as resp:
            assert resp.status == 403
    finally:
        await one.close()
        await two.close()


async def test_approve_deny_and_four_eyes_in_the_console(env: Env) -> None:
    mine = (await env.seed()).approval.id
    theirs = (await env.seed("custodian2", "r-9")).approval.id
    http = await sign_in(env, "custodian2")
    try:
        async with http.get(env.url + "/console/") as resp:
            page = await resp.text()
        assert mine in page and theirs in page
        csrf = csrf_of(page)
        async with http.post(env.url + f"/console/approvals/{theirs}/approve",
                             data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/?problem=self"
        async with http.post(env.url + f"/console/approvals/{mine}/deny",
                             data={"csrf": csrf, "comment": "wrong patient"},
                             allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/?notice=denied"
        async with http.post(env.url + f"/console/approvals/{mine}/approve",
                             data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/?problem=not_pending"
        async with http.post(env.url + f"/console/approvals/{mine}/approve",
                             data={"csrf": csrf, "comment": "x" * 501},
                             allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/?problem=comment"
        got = await env.approvals.lookup("user-custodian\0r-1")
        assert got is not None and got.status is Status.DENIED
        assert got.comment == "wrong patient" and got.decided_by == "user-custodian2"
        async with http.get(env.url + "/console/decisions?kind=approval") as resp:
            page = await resp.text()
        assert "denied" in page and "created" in page
    finally:
        await http.close()


async def test_other_tenants_approvals_and_records_are_not_shown(env: Env) -> None:
    aid = (await env.seed()).approval.id
    http = await sign_in(env, "t2-custodian")
    try:
        async with http.get(env.url + "/console/") as resp:
            page = await resp.text()
        assert aid not in page and "Nothing is waiting" in page
        async with http.get(env.url + "/console/decisions") as resp:
            page = await resp.text()
        assert aid[:14] not in page and "No records match" in page
        async with http.post(env.url + f"/console/approvals/{aid}/approve",
                             data={"csrf": csrf_of(page)}, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/?problem=not_found"
        assert (await env.approvals.lookup("user-custodian\0r-1")).status is Status.PENDING  # type: ignore[union-attr]
    finally:
        await http.close()


async def test_trusted_headers_sign_in_by_themselves(env: Env) -> None:
    headers = {"X-Casf-Actor": "sso-custodian", "X-Casf-Role": "custodian",
               "X-Casf-Tenant": "t1"}
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.get(env.url + "/console/", headers=headers,
                            allow_redirects=False) as resp:
            assert resp.status == 200
            assert "sso-custodian" in await resp.text()
            assert any(c.startswith("casf_console=")
                       for c in resp.headers.getall("Set-Cookie"))
        nurse = {**headers, "X-Casf-Actor": "sso-nurse", "X-Casf-Role": "nurse"}
        async with http.get(env.url + "/console/", headers=nurse,
                            allow_redirects=False) as resp:
            assert resp.status == 403
            assert "sso-nurse" not in await resp.text()
    finally:
        await http.close()


async def test_expired_session_signs_in_again(tmp_path: Path) -> None:
    now = [1000.0]
    build = with_console(ttl_s=300, session_clock=lambda: now[0])
    async with approvals_env(tmp_path, cfg=CFG, build=build) as env:
        http = await sign_in(env, "custodian2")
        try:
            now[0] += 299
            async with http.get(env.url + "/console/", allow_redirects=False) as resp:
                assert resp.status == 200
            now[0] += 1
            async with http.get(env.url + "/console/", allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"] == "/console/login?notice=expired"
            async with http.get(env.url + "/console/login?notice=expired") as resp:
                assert "Your session has ended" in await resp.text()
        finally:
            await http.close()


async def test_decision_filters_and_paging(env: Env) -> None:
    for i in range(60):
        await env.seed(request_id=f"r-{i}")
    http = await sign_in(env, "custodian2")
    try:
        async with http.get(env.url + "/console/decisions?kind=approval") as resp:
            page = await resp.text()
        assert page.count("<tr>") == 1 + 50 and "Older" in page and "Newer" not in page
        async with http.get(env.url + "/console/decisions?kind=approval&offset=50") as resp:
            page = await resp.text()
        assert page.count("<tr>") == 1 + 10 and "Newer" in page and "Older" not in page
        async with http.get(env.url + "/console/decisions?reason=Approval_Required"
                            "&tool=cliniccloud.cancel_appointment&decision=ALLOW") as resp:
            assert resp.status == 200 and (await resp.text()).count("<tr>") == 51
        async with http.get(env.url + "/console/decisions?reason=Nope") as resp:
            assert "No records match" in await resp.text()
        async with http.get(env.url + "/console/decisions?since=2999-01-01T00:00") as resp:
            assert "No records match" in await resp.text()
        async with http.get(env.url + "/console/decisions?until=2999-01-01T00:00&kind=approval"
                            ) as resp:
            assert (await resp.text()).count("<tr>") == 51
        for bad in ("since=yesterday", "decision=MAYBE", "kind=other"):
            async with http.get(env.url + f"/console/decisions?{bad}") as resp:
                assert resp.status == 400, bad
    finally:
        await http.close()


async def test_chain_status_page(env: Env) -> None:
    await env.seed()
    http = await sign_in(env, "custodian2")
    try:
        async with http.get(env.url + "/console/chain") as resp:
            page = await resp.text()
        assert "Intact" in page and "chain-a" in page and "STEP_UP" in page
        async with http.post(env.url + "/console/chain/verify", data={"csrf": csrf_of(page)},
                             allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/console/chain?notice=verified"
    finally:
        await http.close()
