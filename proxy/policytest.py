"""``casf-proxy policy test``: run Rego ``test_*`` rules the way ``opa test`` does.

Every ``.rego`` file under the directory is loaded into one engine; each rule
whose name starts with ``test_`` is evaluated and passes when it is defined
and true. Rules are found from the sources (``package`` line and rule heads),
as OPA does not need them to be listed anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from proxy.config import rego_files
from proxy.policy_regorus import PolicyLoadError, new_engine, rego_error

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^\s*(test_\w+)\s*(?=if\b|\{|:=|=|$)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TestResult:
    file: str
    rule: str
    passed: bool
    error: str | None = None


def discover(files: list[Path]) -> list[tuple[str, str, str]]:
    """(file, package, rule) for every distinct test rule, in source order."""
    seen: set[tuple[str, str]] = set()
    found: list[tuple[str, str, str]] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        for m in _TEST_RULE.finditer(text):
            key = (pkg.group(1), m.group(1))
            if key not in seen:
                seen.add(key)
                found.append((str(f), pkg.group(1), m.group(1)))
    return found


def run_tests(directory: Path, *, rego_v0: bool) -> list[TestResult]:
    """Load and run; raises :class:`PolicyLoadError` when a file does not compile."""
    files = rego_files(directory)
    if not files:
        raise PolicyLoadError(f"{directory}: no .rego files")
    engine = new_engine(tuple(files), rego_v0)
    results: list[TestResult] = []
    for file, package, rule in discover(files):
        try:
            value = engine.eval_rule(f"data.{package}.{rule}")
        except RuntimeError as exc:
            results.append(TestResult(file, f"data.{package}.{rule}", False, rego_error(exc)))
            continue
        results.append(TestResult(file, f"data.{package}.{rule}", value is True))
    return results
