"""Config loads that must be refused: each one would open a hole at run time.

- a passthrough entry that covers a route's path (every other method on it
  would be forwarded unauthenticated);
- a route attribute read from a credential header (the credential would be
  in the policy input and in the audit record's ``attrs``);
- ``user:password@`` in the OPA or JWKS URL (URLs are written to log lines),
  and no URL password echoed in an error message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config
from tests.conftest import clinic_env, write_config
from tests.test_cli import cli

PASSWORD = "pw-IN-URL-6b1f"


def load(tmp_path: Path, patch: Any) -> Any:
    return load_config(write_config(tmp_path, patch), clinic_env("http://127.0.0.1:1", tmp_path))


# ------------------------------------------------------------ passthrough


# (entry, the clinic route it covers)
COVERING = [
    ("/sms", "routes[4] (POST /sms)"),
    ("/appointments/", "routes[2] (DELETE /appointments/{appointment_id})"),
    ("/patients/", "routes[3] (GET /patients/{patient_id}/history)"),
    ("/patients/p1/", "routes[3] (GET /patients/{patient_id}/history)"),
    ("/", "routes[0] (GET /appointments)"),
]


@pytest.mark.parametrize(("entry", "route"), COVERING, ids=[c[0] for c in COVERING])
def test_passthrough_covering_a_route_is_refused(tmp_path: Path, entry: str,
                                                 route: str) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["unmatched"]["passthrough"] = ["/public/", entry]

    with pytest.raises(ConfigError) as info:
        load(tmp_path, patch)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'casf.yaml'}: unmatched.passthrough[1]: "), text
    assert route in text and "unauthenticated" in text and "(fix: " in text


@pytest.mark.parametrize("entry", ["/public/", "/sms/", "/smsx", "/appointments/a1/",
                                   "/patients/p1/history/x/", "/patients"])
def test_passthrough_beside_the_routes_is_accepted(tmp_path: Path, entry: str) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["unmatched"]["passthrough"] = [entry]

    assert load(tmp_path, patch).passthrough == (entry,)


def test_validate_reports_a_covering_passthrough_as_a_config_error(tmp_path: Path) -> None:
    res = cli("validate", "-c", str(write_config(
        tmp_path, lambda d: d["unmatched"].update(passthrough=["/sms"]))))
    assert res.returncode == 2, res.stdout
    assert "unmatched.passthrough[0]" in res.stderr and "routes[4]" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------ credential attributes


def trusted(d: dict[str, Any]) -> None:
    d["identity"]["trusted_headers"] = {"enabled": True, "sources": ["127.0.0.1/32"],
                                        "headers": {"role": "X-Mesh-Role"}}


def custom_key_header(d: dict[str, Any]) -> None:
    d["identity"]["api_keys"]["header"] = "X-Clinic-Key"
    d["identity"]["order"] = "jwt"  # configured but not used: still a credential


def custom_jwt_header(d: dict[str, Any]) -> None:
    d["identity"]["jwt"]["header"] = "X-Id-Token"


# (header read by the attribute, config change)
CREDENTIALS = [
    ("X-API-Key", None),
    ("x_api_key", None),
    ("Authorization", None),
    ("Proxy-Authorization", None),
    ("Cookie", None),
    ("X-Clinic-Key", custom_key_header),
    ("X-Id-Token", custom_jwt_header),
    ("X-Mesh-Role", trusted),
    ("X-Casf-Actor", trusted),
]


@pytest.mark.parametrize(("header", "setup"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_attribute_from_a_credential_header_is_refused(tmp_path: Path, header: str,
                                                       setup: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        if setup is not None:
            setup(d)
        d["routes"][1]["attributes"]["args.caller"] = {"from": "header", "name": header}
        d["audit"]["redact"]["args.caller"] = "hash"  # redaction does not make it allowed

    with pytest.raises(ConfigError) as info:
        load(tmp_path, patch)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'casf.yaml'}: routes[1].attributes.args.caller.name: "
                           ), text
    assert "carries a credential" in text and "from: principal" in text


def test_attribute_from_an_ordinary_header_is_accepted(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"][1]["attributes"]["args.channel"] = {"from": "header", "name": "X-Channel"}

    cfg = load(tmp_path, patch)
    assert [a.name for a in cfg.routes[1].attributes if a.source == "header"] == ["X-Channel"]


# ------------------------------------------------------------ credentials in URLs


def opa(url: str) -> Any:
    def patch(d: dict[str, Any]) -> None:
        d["policy"]["engine"] = "opa"
        d["policy"]["opa"] = {"url": url}
    return patch


def jwks(url: str) -> Any:
    def patch(d: dict[str, Any]) -> None:
        d["identity"]["jwt"].pop("jwks_file")
        d["identity"]["jwt"]["jwks_url"] = url
    return patch


URLS = [
    ("opa user and password", opa(f"http://casf:{PASSWORD}@127.0.0.1:8181"), "policy.opa.url"),
    ("opa token as user", opa(f"https://{PASSWORD}@opa.internal"), "policy.opa.url"),
    ("jwks user and password", jwks(f"https://casf:{PASSWORD}@idp.example/jwks.json"),
     "identity.jwt.jwks_url"),
    ("jwks on loopback", jwks(f"http://u:{PASSWORD}@127.0.0.1:1/jwks.json"),
     "identity.jwt.jwks_url"),
]


@pytest.mark.parametrize(("name", "patch", "key"), URLS, ids=[u[0] for u in URLS])
def test_dependency_url_with_credentials_is_refused(tmp_path: Path, name: str, patch: Any,
                                                    key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, patch)
    text = str(info.value)
    assert f": {key}: contains credentials" in text, text
    assert "header from a secret" in text
    assert PASSWORD not in text


@pytest.mark.parametrize(("patch", "key"), [
    (lambda d: d["upstream"].update(url=f"ftp://casf:{PASSWORD}@127.0.0.1:3000"), "upstream.url"),
    (opa(f"ftp://casf:{PASSWORD}@127.0.0.1:8181"), "policy.opa.url"),
], ids=["upstream", "opa"])
def test_url_errors_never_echo_a_password(tmp_path: Path, patch: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, patch)
    assert f": {key}: " in str(info.value)
    assert PASSWORD not in str(info.value)
