"""The one definition of "running in CI", and the one way to require a tool.

Locally, a test that needs something this machine lacks (redis-server,
PostgreSQL, promtool, kubectl, wrk, nginx, a browser, an optional Python
package) is skipped with a message saying what to install. In CI it fails
instead: CI must never pass by silently running less. CI is detected from the
``CI`` environment variable, set to ``true``, ``1`` or ``yes`` in any case
(GitHub Actions and GitLab set ``true``, others ``1``; ``.ci/run`` sets it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import NoReturn

import pytest

# How to get each tool the tests need (Debian/Ubuntu packages where apt has one;
# scripts/system-deps.sh installs those).
INSTALL = {
    "redis-server": "apt-get install redis-server",
    "redis-cli": "apt-get install redis-tools",
    "initdb": "apt-get install postgresql",
    "pg_ctl": "apt-get install postgresql",
    "promtool": "apt-get install prometheus",
    "wrk": "apt-get install wrk",
    "nginx": "apt-get install nginx",
    "chromium": "apt-get install chromium",
    "kubectl": "https://kubernetes.io/docs/tasks/tools/ (no apt package)",
    "kustomize": "kubectl (its kustomize subcommand), or https://kubectl.docs.kubernetes.io/",
}


def in_ci() -> bool:
    """True when the tests run in CI: ``CI`` is true, 1 or yes (case-insensitive)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(message: str) -> NoReturn:
    """This test cannot run here: skip it locally, fail it in CI."""
    if in_ci():
        pytest.fail(f"{message} (required in CI: CI={os.environ.get('CI')})", pytrace=False)
    pytest.skip(message)


def require_binary(name: str, *alternatives: str) -> str:
    """The path of ``name`` (or the first of ``alternatives``) on PATH.

    Missing: the test is skipped locally and fails in CI, with the install hint.
    """
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path is not None:
            return path
    names = " or ".join((name, *alternatives))
    hint = INSTALL.get(name)
    skip_or_fail(f"{names} not found on PATH" + (f" (install: {hint})" if hint else ""))


def require_module(name: str, install: str) -> None:
    """An optional Python package the test needs (``install`` says how to get it)."""
    if importlib.util.find_spec(name) is None:
        skip_or_fail(f"Python package {name} is not installed ({install})")
