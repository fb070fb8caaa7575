"""The approval console in a real browser: headless Chromium driven by Playwright.

Uses the system Chromium (``apt-get install chromium``; Playwright cannot
download browsers here). Without it the test is skipped locally and fails
under ``CI=true``. Screenshots of every page go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.model import Status
from tests.approvals_support import Env, approvals_env, key, with_console

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CFG = ApprovalsConfig(approver_roles=("custodian",))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium not found (install the system package: apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + "; CI=true: the browser test must run")
    pytest.skip(message)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    path = chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with approvals_env(tmp_path, cfg=CFG, build=with_console(lambda: "STEP_UP")) as e:
        yield e


async def test_sign_in_approve_and_see_the_decision(browser: Any, env: Env) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    seeded = (await env.seed(attrs={"subject": {"patient_id": "p1"},
                                    "args": {"appointment_id": "a-17",
                                             "message": "sha256:9f2c4e"},
                                    "context": {"tenant_id": "t1"}})).approval
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    csp_problems: list[str] = []
    page.on("console", lambda msg: csp_problems.append(msg.text)
            if "Content Security Policy" in msg.text else None)

    # sign in with an API key
    await page.goto(env.url + "/console/")
    assert page.url.endswith("/console/login")
    await page.screenshot(path=str(ARTIFACTS / "console-sign-in.png"), full_page=True)
    await page.fill("#api_key", key("custodian2"))
    await page.click("button[type=submit]")
    await page.wait_for_url(env.url + "/console/")

    # the seeded approval is listed with its redacted attributes and reason code
    row = page.locator(f"tr[data-approval-id='{seeded.id}']")
    await row.wait_for()
    text = await row.inner_text()
    assert "cliniccloud.cancel_appointment" in text and "user-custodian" in text
    assert "Approval_Required" in text and "subject.patient_id" in text
    assert "sha256:9f2c4e" in text and "pending" in text
    header = await page.locator("header").inner_text()
    assert "STEP_UP" in header and "user-custodian2" in header
    await page.screenshot(path=str(ARTIFACTS / "console-pending.png"), full_page=True)

    # approve it with a comment: it leaves the list
    await row.locator("textarea").fill("confirmed with the patient by phone")
    await row.locator("button.approve").click()
    await page.wait_for_url(env.url + "/console/?notice=approved")
    await page.locator("#no-pending").wait_for()
    assert await page.locator(f"tr[data-approval-id='{seeded.id}']").count() == 0
    assert "Approved" in await page.locator(".banner.ok").inner_text()
    await page.screenshot(path=str(ARTIFACTS / "console-approved.png"), full_page=True)
    got = await env.approvals.lookup("user-custodian\0r-1")
    assert got is not None and got.status is Status.APPROVED
    assert got.comment == "confirmed with the patient by phone"

    # the decision is in the recent list, read back from the audit trail
    await page.click("nav >> text=Recent decisions")
    await page.wait_for_url(env.url + "/console/decisions")
    table = await page.locator("#decisions").inner_text()
    assert "approved" in table and "created" in table and "user-custodian2" in table
    await page.select_option("select[name=kind]", "approval")
    await page.fill("input[name=reason]", "Approval_Required")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url("**/console/decisions?*")
    assert "approved" in await page.locator("#decisions").inner_text()
    await page.screenshot(path=str(ARTIFACTS / "console-decisions.png"), full_page=True)

    # the chain verifies
    await page.click("nav >> text=Audit chain")
    await page.wait_for_url(env.url + "/console/chain")
    assert "Intact" in await page.locator("#chain-verdict").inner_text()
    assert "chain-a" in await page.locator("#chains").inner_text()
    await page.screenshot(path=str(ARTIFACTS / "console-chain.png"), full_page=True)

    # a POST with the browser's session cookie but without the CSRF token is refused
    second = (await env.seed(request_id="r-2")).approval
    refused = await context.request.post(env.url + f"/console/approvals/{second.id}/approve",
                                         form={"comment": "forged"}, max_redirects=0)
    assert refused.status == 403
    assert (await refused.json())["reason_codes"] == ["Console_CsrfInvalid"]
    still = await env.approvals.lookup("user-custodian\0r-2")
    assert still is not None and still.status is Status.PENDING

    assert csp_problems == []  # nothing on the pages needed more than the policy allows
    await context.close()
