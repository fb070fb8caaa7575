"""Schemathesis against a live casf-proxy: every answer fits the published spec.

One ``casf-proxy run`` process (the clinic config, in front of the clinic
backend) serves the decision listener and the admin listener. Each
listener's ``GET /openapi.json`` must equal the document the code builds
(:func:`proxy.doors.schema.decision_api_spec`,
:func:`proxy.doors.admin_schema.admin_api_spec`), and schemathesis generates
requests from that document (valid and invalid ones, a bounded, derandomized
number per operation) and checks every answer: no 5xx, a status the spec
lists, its content type, its body schema and its declared headers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from proxy.doors.admin_schema import admin_api_spec
from proxy.doors.schema import decision_api_spec
from tests.conftest import ADMIN_TOKEN, write_config
from tests.servers import free_port
from tests.waiting import poll_until

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance,
          negative_data_rejection, missing_required_header, unsupported_method]
BOUNDED = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

DECISIONS = schemathesis.openapi.from_dict(decision_api_spec())



def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """casf-proxy and the clinic backend as processes; the two listeners' base URLs."""
    tmp = tmp_path_factory.mktemp("fuzz")

    def patch(d: dict[str, Any]) -> None:
        d["reload"]["watch"] = False
        # a commit delayed by a loaded machine is a 503 by design; here it would be noise
        d["audit"]["timeout_ms"] = 15000

    cfg = write_config(tmp, patch)
    backend, traffic, admin, decisions = free_port(), free_port(), free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp),
           "CLINIC_UPSTREAM": f"http://127.0.0.1:{backend}", "CASF_PORT": str(traffic),
           "CASF_ADMIN_PORT": str(admin), "CASF_DECISIONS_PORT": str(decisions),
           "CASF_AUDIT_PATH": str(tmp / "audit.db"), "CASF_ADMIN_TOKEN": ADMIN_TOKEN,
           "CASF_AUTH": "api_keys", "CASF_SHUTDOWN_DELAY_MS": "0"}
    log = (tmp / "proxy.log").open("w")
    procs = [subprocess.Popen([sys.executable, "examples/clinic/backend.py", "--port",
                               str(backend)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)]
    try:
        for port in (backend, decisions, admin):
            poll_until(lambda port=port: _accepts(port),  # type: ignore[misc]
                       f"port {port} to open (log: {tmp / 'proxy.log'})", timeout=30)
        yield {"decisions": f"http://127.0.0.1:{decisions}",
               "admin": f"http://127.0.0.1:{admin}", "log": str(tmp / "proxy.log")}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
        log.close()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        return json.loads(resp.read())


def test_decision_listener_serves_the_spec_the_code_builds(live: dict[str, str]) -> None:
    assert _get_json(live["decisions"] + "/openapi.json") == decision_api_spec()


def test_admin_listener_serves_the_spec_the_code_builds(live: dict[str, str]) -> None:
    spec = _get_json(live["admin"] + "/openapi.json")
    assert spec == admin_api_spec(approvals="/approvals" in spec["paths"])


@DECISIONS.parametrize()
@BOUNDED
def test_decision_listener_answers_fit_the_spec(case: Case[Any],
                                                live: dict[str, str]) -> None:
    case.call_and_validate(base_url=live["decisions"], checks=CHECKS, timeout=10)


@DECISIONS.parametrize()
@BOUNDED
def test_decision_listener_answers_fit_the_spec_as_a_known_caller(
        case: Case[Any], live: dict[str, str]) -> None:
    """With a valid key the requests get past authentication to the decision itself."""
    case.call_and_validate(base_url=live["decisions"], checks=CHECKS, timeout=10,
                           headers={"X-API-Key": "demo-receptionist"})


@pytest.mark.parametrize("value", [b"\xe9", b"\xe2\x82\xac"])
def test_non_ascii_header_value_is_refused_not_a_server_error(
        live: dict[str, str], value: bytes) -> None:
    port = int(live["decisions"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /authz/forward HTTP/1.1\r\nHost: a\r\nX-API-Key: demo-nurse\r\n"
                  b"X-Original-URI: /appointments\r\nX-Note: " + value +
                  b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer


@pytest.mark.parametrize("path", ["/appointments%0A", "/%0D%0Aappointments"])
def test_encoded_line_break_in_envoy_path_is_decided(live: dict[str, str], path: str) -> None:
    """Envoy sends the original path as it came, percent-encoding included: the door must
    decide it (and record the decision) like any other, not answer the router's 404."""
    req = urllib.request.Request(live["decisions"] + "/authz/envoy" + path,
                                 headers={"X-API-Key": "demo-receptionist"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    assert status != 404, body
    assert json.loads(body)["request_id"] is not None  # decided, so recorded


def _fuzz_admin(live: dict[str, str], headers: dict[str, str], examples: int) -> int:
    """Every operation of the live admin document (it names the approvals routes only
    where they are mounted), valid and invalid inputs; the number of operations."""
    schema = schemathesis.openapi.from_url(live["admin"] + "/openapi.json")
    count = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(BOUNDED, max_examples=examples)
            def run(case: Case[Any]) -> None:
                case.call_and_validate(base_url=live["admin"], checks=CHECKS, timeout=10,
                                       headers=headers)

            try:
                run()
            except Unsatisfiable:  # nothing invalid to make for an operation without input
                assert mode is GenerationMode.NEGATIVE
        count += 1
    return count


def test_admin_listener_answers_fit_the_spec(live: dict[str, str]) -> None:
    assert _fuzz_admin(live, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, 15) >= 7


def test_admin_listener_answers_fit_the_spec_without_the_token(live: dict[str, str]) -> None:
    """Whatever credential schemathesis makes up: 401 envelopes, or the public routes."""
    assert _fuzz_admin(live, {}, 3) >= 7
