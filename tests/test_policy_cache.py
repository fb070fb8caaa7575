"""The in-process engine's decision cache: only for pure policies, bounded,
and never changes a decision."""

from __future__ import annotations

from pathlib import Path

from proxy.config import PolicyConfig
from proxy.policy_regorus import RegorusEngine
from proxy.ports import PolicyOutcome

PURE = """package casf
import rego.v1
default allow := false
allow if input.role == "doctor"
violations contains "Role_NotPermitted" if input.role != "doctor"
"""

IMPURE = PURE + """
stamp := time.now_ns()
"""


def engine(tmp_path: Path, source: str, size: int = 10_000) -> RegorusEngine:
    f = tmp_path / "p.rego"
    f.write_text(source)
    return RegorusEngine(PolicyConfig(bundle=tmp_path, files=(f,), decision_cache_size=size))


def test_pure_policy_is_cached_and_decisions_do_not_leak(tmp_path: Path) -> None:
    e = engine(tmp_path, PURE, size=2)
    assert e.caching
    for _ in range(3):
        assert e.evaluate_sync({"role": "doctor"}).outcome is PolicyOutcome.ALLOW
        denied = e.evaluate_sync({"role": "nurse"})
        assert denied.outcome is PolicyOutcome.DENY
        assert denied.violations == ("Role_NotPermitted",)
    e.evaluate_sync({"role": "billing"})
    assert len(e._cache) == 2  # bounded: the least recently used input was dropped


def test_time_dependent_policy_is_never_cached(tmp_path: Path) -> None:
    e = engine(tmp_path, IMPURE)
    assert not e.caching
    assert e.evaluate_sync({"role": "doctor"}).outcome is PolicyOutcome.ALLOW
    assert len(e._cache) == 0


def test_token_verification_with_the_clock_is_never_cached(tmp_path: Path) -> None:
    source = PURE + """
valid if io.jwt.decode_verify(input.token, {"secret": "s"})[0]
"""
    assert not engine(tmp_path, source).caching


def test_cache_can_be_turned_off(tmp_path: Path) -> None:
    e = engine(tmp_path, PURE, size=0)
    assert not e.caching
    e.evaluate_sync({"role": "doctor"})
    assert len(e._cache) == 0
