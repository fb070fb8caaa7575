"""Hot reload (docs/operations.md): file watch, ConfigMap symlink swap, SIGHUP.

Everything runs on real sockets: the proxy in-process (its watcher polls the
files every 100 ms here) or as a real ``casf-proxy run`` process for SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import (
    CLINIC,
    KEYS,
    Proxy,
    Upstream,
    clinic_env,
    run_upstream,
    start_proxy,
    write_config,
)
from tests.servers import ProxyProcess
from tests.waiting import wait_until

APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
RECEPTIONIST_READS = ('"cliniccloud.list_appointments": '
                      '{"receptionist", "nurse", "doctor", "custodian"}')
NO_RECEPTIONIST = '"cliniccloud.list_appointments": {"nurse", "doctor", "custodian"}'


def write(path: Path, text: str) -> None:
    """Replace a file atomically (write + rename), as editors and kubelet do: the
    watcher never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """Writable copies of the clinic policies and keys (the test edits them)."""
    policies = tmp_path / "policies"
    shutil.copytree(CLINIC / "policies", policies)
    keys = tmp_path / "keys.yaml"
    shutil.copy(CLINIC / "keys.yaml", keys)
    return policies, keys


def local_files(policies: Path, keys: Path, *, watch: bool = True
                ) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        d["policy"]["bundle"] = str(policies)
        d["identity"]["api_keys"]["keys_file"] = str(keys)
        d["reload"] = {"watch": watch, "interval_ms": 100}
        d["shutdown"] = {"delay_ms": 0, "drain_timeout_ms": 2000}
    return patch


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def config_hashes(text: str) -> dict[str, float]:
    return {h: float(v) for h, v in
            re.findall(r'^casf_config_info\{hash="([0-9a-f]+)"\} ([0-9.e+-]+)$', text, re.M)}


async def get_metrics(session: aiohttp.ClientSession, admin: str) -> str:
    async with session.get(admin + "/metrics") as r:
        return await r.text()


class Load:
    """Clients calling the proxy in a loop until stopped; every outcome is kept."""

    def __init__(self, proxy: Proxy, concurrency: int = 6) -> None:
        self.proxy = proxy
        self.concurrency = concurrency
        self.results: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._n = 0

    async def _client(self, i: int) -> None:
        while not self._stop.is_set():
            self._n += 1
            try:
                if i % 2:
                    status, _, _ = await self.proxy.call("GET", "/appointments", key="nurse")
                    self.results.append(("read", status))
                else:
                    status, _, _ = await self.proxy.call("POST", "/appointments", key="doctor",
                                                         json=APPT, rid=f"load-{self._n}")
                    self.results.append(("write", status))
            except Exception as exc:  # every failure is reported
                self.errors.append(exc)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def more(self, n: int) -> None:
        """Wait until ``n`` more requests have completed (the load keeps running)."""
        want = len(self.results) + len(self.errors) + n
        await wait_until(lambda: len(self.results) + len(self.errors) >= want,
                         f"{n} more requests of the load to complete")

    def failures(self) -> list[Any]:
        ok = {"read": 200, "write": 201}
        return self.errors + [r for r in self.results if r[1] != ok[r[0]]]


def audit_rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def test_valid_change_applied_under_load_without_a_failed_request(
        tmp_path: Path, upstream: Upstream) -> None:
    policies, keys = copy_bundle(tmp_path)
    path = write_config(tmp_path, local_files(policies, keys))
    async with start_proxy(path, clinic_env(upstream.url, tmp_path), upstream) as p:
        old_hash, old_policy = p.rt.cfg.digest, p.rt.pipeline.policy_hash
        assert (await p.call("GET", "/appointments"))[0] == 200  # receptionist may read
        load = Load(p)
        load.start()
        await load.more(20)
        # a slow request in flight across the switch finishes under the old config:
        # the upstream holds it until the new config is in force
        held = upstream.hold_next(lambda seen: "ab" * 16 in seen.headers.get("traceparent", ""))
        slow = asyncio.ensure_future(p.call("GET", "/appointments", key="doctor",
                                            headers={"traceparent": "00-" + "ab" * 16 + "-"
                                                     + "cd" * 8 + "-01"}))
        await held.wait_arrived()
        rego = policies / "casf.rego"
        text = rego.read_text()
        assert RECEPTIONIST_READS in text
        write(rego, text.replace(RECEPTIONIST_READS, NO_RECEPTIONIST))

        async def reloaded() -> bool:
            return p.rt.pipeline.policy_hash != old_policy

        await wait_until(reloaded, "the new policy to be in force")
        assert not slow.done()
        held.release()
        status, _, _ = await slow
        assert status == 200
        await load.more(20)  # more load under the new config
        await load.stop()
        assert not load.failures(), load.failures()[:5]
        assert len(load.results) > 20
        # the new policy is in force: receptionists may no longer list appointments
        status, _, raw = await p.call("GET", "/appointments")
        assert status == 403 and json.loads(raw)["reason_codes"] == ["Role_NotPermitted"]
        assert json.loads(raw)["policy_hash"] == p.rt.pipeline.policy_hash
        text_m = await p.metrics()
        assert metric(text_m, "casf_config_reload_total", result="success") == 1
        assert metric(text_m, "casf_config_reload_total", result="error") == 0
        assert config_hashes(text_m) == {p.rt.cfg.digest: 1.0}
        assert p.rt.cfg.digest != old_hash
    db = tmp_path / "audit.db"
    # the slow request: decision and outcome both under the policy it started with
    slow_hashes = audit_rows(db, "SELECT kind, policy_hash FROM audit_events WHERE trace_id = ?",
                             "ab" * 16)
    assert sorted(slow_hashes) == [("decision", old_policy), ("outcome", old_policy)]
    hashes = {h for (h,) in audit_rows(db, "SELECT DISTINCT policy_hash FROM audit_events")}
    assert hashes == {old_policy, p.rt.pipeline.policy_hash}


async def test_invalid_change_is_rejected_and_the_old_config_keeps_serving(
        tmp_path: Path, upstream: Upstream, caplog: Any) -> None:
    policies, keys = copy_bundle(tmp_path)
    path = write_config(tmp_path, local_files(policies, keys))
    async with start_proxy(path, clinic_env(upstream.url, tmp_path), upstream) as p:
        digest, policy_hash = p.rt.cfg.digest, p.rt.pipeline.policy_hash
        load = Load(p, concurrency=4)
        load.start()
        # one file changes per step, and every state on the way is invalid:
        # 1. a policy that does not compile
        rego = policies / "casf.rego"
        good_rego, good_keys, good_cfg = rego.read_text(), keys.read_text(), path.read_text()
        write(rego, good_rego + "\nallow if {\n")

        async def errors(n: int) -> bool:  # the load runs: read /metrics as it is
            text = await get_metrics(p.session, p.admin)
            return metric(text, "casf_config_reload_total", result="error") >= n

        await wait_until(lambda: errors(1), "the first failed reload")
        assert p.rt.pipeline.policy_hash == policy_hash
        # 2. a keys file that does not parse (keys are read before the policy)
        write(keys, "keys: [{id: broken}]\n")
        await wait_until(lambda: errors(2), "the second failed reload")
        # 3. a config key that does not exist (checked before both)
        data = yaml.safe_load(good_cfg)
        data["upstream"]["timeout_milliseconds"] = 5
        write(path, yaml.safe_dump(data))
        await wait_until(lambda: errors(3), "the third failed reload")
        await load.more(20)  # the last-known-good config keeps serving the load
        await load.stop()
        assert not load.failures(), load.failures()[:5]
        # the last-known-good config still serves, receptionist key included
        assert (await p.call("GET", "/appointments"))[0] == 200
        assert (p.rt.cfg.digest, p.rt.pipeline.policy_hash) == (digest, policy_hash)
        text = await p.metrics()
        assert metric(text, "casf_config_reload_total", result="error") == 3
        assert metric(text, "casf_config_reload_total", result="success") == 0
        assert config_hashes(text) == {digest: 1.0}
        # one log line per failure, naming what is wrong
        failed = [r.getMessage() for r in caplog.records if "config reload" in r.getMessage()
                  and r.levelname == "ERROR"]
        assert len(failed) == 3, failed
        assert "casf.rego" in failed[0] and "policy does not compile" in failed[0]
        assert "keys.yaml: keys[0].sha256: is required" in failed[1]
        assert "upstream.timeout_milliseconds: unknown key" in failed[2]
        # fixing the files: the config is again the one in force, so nothing is
        # reloaded (a reload that changes nothing is not a reload)
        write(path, good_cfg)
        write(rego, good_rego)
        write(keys, good_keys)

        async def succeeded() -> bool:
            text = await p.metrics()
            assert metric(text, "casf_config_reload_total", result="success") == 0
            return metric(text, "casf_config_reload_total", result="unchanged") >= 1

        await wait_until(succeeded, "a successful reload once the files are fixed")
        assert p.rt.pipeline.policy_hash == policy_hash
        assert (await p.call("GET", "/appointments"))[0] == 200


def kubelet_write(mount: Path, files: dict[str, bytes], stamp: str) -> None:
    """Publish ``files`` the way the kubelet updates a ConfigMap/projected volume:
    a new hidden timestamped directory, an atomic swap of the ``..data`` symlink,
    top-level symlinks into ``..data``, then removal of the old directory."""
    new = mount / stamp
    for rel, content in files.items():
        target = new / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    tmp = mount / "..data_tmp"
    os.symlink(stamp, tmp)
    os.rename(tmp, mount / "..data")  # the atomic swap
    for top in {rel.split("/", 1)[0] for rel in files}:
        link = mount / top
        if not link.is_symlink():
            os.symlink(f"..data/{top}", link)
    if old is not None:
        shutil.rmtree(mount / old)


async def test_configmap_symlink_swap_is_picked_up(tmp_path: Path, upstream: Upstream) -> None:
    mount = tmp_path / "etc-casf"
    mount.mkdir()
    data = yaml.safe_load((CLINIC / "casf.yaml").read_text())
    data["identity"]["jwt"]["jwks_file"] = str(CLINIC / "dev-keys" / "jwks.json")
    data["reload"] = {"interval_ms": 100}
    rego = (CLINIC / "policies" / "casf.rego").read_bytes()
    files = {"casf.yaml": yaml.safe_dump(data).encode(),
             "keys.yaml": (CLINIC / "keys.yaml").read_bytes(),
             "policies/casf.rego": rego}
    kubelet_write(mount, files, "..2026_01_01_00_00_00.000000001")
    env = clinic_env(upstream.url, tmp_path)
    async with start_proxy(mount / "casf.yaml", env, upstream) as p:
        old_policy = p.rt.pipeline.policy_hash
        assert (await p.call("GET", "/appointments"))[0] == 200
        files["policies/casf.rego"] = rego.replace(RECEPTIONIST_READS.encode(),
                                                   NO_RECEPTIONIST.encode())
        kubelet_write(mount, files, "..2026_01_01_00_01_00.000000002")

        async def swapped() -> bool:
            return p.rt.pipeline.policy_hash != old_policy

        await wait_until(swapped, "the swapped policy to be in force")
        assert (await p.call("GET", "/appointments"))[0] == 403
        assert (await p.call("GET", "/appointments", key="nurse"))[0] == 200
        # a second swap (config only: a new route is mapped) is picked up as well
        data["routes"].append({"method": "GET", "path": "/clinics", "tool": "cliniccloud.x",
                               "effect": "read"})
        files["casf.yaml"] = yaml.safe_dump(data).encode()
        before = p.rt.cfg.digest
        kubelet_write(mount, files, "..2026_01_01_00_02_00.000000003")

        async def config_swapped() -> bool:
            return p.rt.cfg.digest != before

        await wait_until(config_swapped, "the swapped config to be in force")
        status, _, raw = await p.call("GET", "/clinics", key="nurse")
        assert status == 403 and json.loads(raw)["reason_codes"] == ["Tool_Unknown"]
        assert metric(await p.metrics(), "casf_config_reload_total", result="success") == 2


async def test_sighup_reloads_a_running_process(tmp_path: Path) -> None:
    policies, keys = copy_bundle(tmp_path)
    async with run_upstream() as up:
        path = write_config(tmp_path, local_files(policies, keys, watch=False))
        env = dict(clinic_env(up.url, tmp_path).variables)
        proc = ProxyProcess(path, env, tmp_path / "proxy.log")
        proc.start()
        assert proc.proc is not None
        try:
            async with aiohttp.ClientSession() as s:
                async def status(key: str) -> int:
                    async with s.get(proc.url + "/appointments",
                                     headers={"X-API-Key": KEYS[key]}) as r:
                        return r.status

                async def healthz() -> dict[str, Any]:
                    async with s.get(proc.admin + "/healthz") as r:
                        body: dict[str, Any] = await r.json()
                        return body

                assert await status("receptionist") == 200
                before: str = (await healthz())["config_hash"]
                cycles = metric(await get_metrics(s, proc.admin),
                                "casf_config_watch_cycles_total")
                rego = policies / "casf.rego"
                write(rego, rego.read_text().replace(RECEPTIONIST_READS, NO_RECEPTIONIST))

                # watch: false: nothing happens by itself, however long the watcher
                # runs. Two completed cycles after the write: at least one whole poll
                # began after it (the log check at the end: every reload of this
                # process was a SIGHUP, none a file change)
                async def polled_twice() -> bool:
                    return metric(await get_metrics(s, proc.admin),
                                  "casf_config_watch_cycles_total") >= cycles + 2

                polled: bool = await wait_until(polled_twice,
                                                "two file-watch cycles after the write")
                assert polled
                assert (await healthz())["config_hash"] == before
                assert await status("receptionist") == 200
                proc.proc.send_signal(signal.SIGHUP)

                async def changed() -> bool:
                    now: str = (await healthz())["config_hash"]
                    return now != before

                await wait_until(changed, "the SIGHUP reload to change the config hash")
                assert await status("receptionist") == 403
                text = await get_metrics(s, proc.admin)
                assert metric(text, "casf_config_reload_total", result="success") == 1
                assert list(config_hashes(text)) == [(await healthz())["config_hash"]]
                # a restart-only setting is reported, not applied
                data = yaml.safe_load(path.read_text())
                data["redis"] = {"timeout_ms": 50}
                write(path, yaml.safe_dump(data))
                proc.proc.send_signal(signal.SIGHUP)

                async def twice() -> bool:
                    return metric(await get_metrics(s, proc.admin), "casf_config_reload_total",
                                  result="success") == 2

                await wait_until(twice, "the second SIGHUP reload")
        finally:
            assert proc.stop() == 0
    lines = [json.loads(line) for line in (tmp_path / "proxy.log").read_text().splitlines()
             if line.strip()]
    reloads = [ln for ln in lines if ln.get("event") == "config_reload"]
    assert [ln["result"] for ln in reloads if "result" in ln] == ["success", "success"]
    assert any(ln.get("restart_required") == ["redis"] for ln in reloads)
    assert all("SIGHUP" in ln["msg"] for ln in reloads), [ln["msg"] for ln in reloads]
