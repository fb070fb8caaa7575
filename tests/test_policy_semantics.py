"""The in-process engine decides as OPA does where regorus alone would not.

OPA's compiler evaluates the operands of a negated expression (every nested
call, every reference passed to a call or used as a key) *before* the
``not``: when one is undefined the rule body is undefined, where regorus on
its own would make the ``not`` true. The bundle loader adds the guards OPA's
rewrite implies (proxy/rego_ast.py). The expected values below are OPA's
answers (OPA v1.20.2, ``data.t.p`` with each input); ``"undefined"`` means
OPA returned no value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import PolicyConfig
from proxy.policy_regorus import PolicyLoadError, RegorusEngine, load_modules, new_engine
from proxy.ports import PolicyOutcome
from proxy.rego_ast import rewrite_negations
from tests.conftest import CLINIC

ROOT = CLINIC.parent.parent

U = "undefined"

INPUTS: list[dict[str, Any]] = [
    {},
    {"x": "b", "missing": "b", "args": {"user": "bob"}, "roles": ["intern"], "items": [1],
     "s": "B", "q": "b", "k": "z", "a": [1], "b": [2], "m": {"a": 2}, "n": 1, "t": "ab",
     "y": "c", "name": "bob"},
    {"x": "a", "missing": "a", "args": {"user": "mallory"}, "roles": ["staff"],
     "items": [1, 2, 3], "s": "ab", "q": "a", "k": "a", "a": {"x": "x"}, "b": [1],
     "m": {"k": 1}, "n": 5, "t": "b", "y": "a", "name": "al"},
]

CASES: list[tuple[str, str, list[Any]]] = [
    ('not input.x in {"a"}',
     'p if not input.x in {"a"}',
     [U, True, U]),
    ('not obj[input.missing]',
     'obj := {"a": 1}\np if not obj[input.missing]',
     [U, True, U]),
    ('not startswith(input.missing, "a")',
     'p if not startswith(input.missing, "a")',
     [U, True, U]),
    ('not input.args.user in blocked',
     'blocked := {"mallory"}\nallow if not input.args.user in blocked',
     [U, True, U]),
    ('not "staff" in input.roles',
     'p if not "staff" in input.roles',
     [U, True, U]),
    ('not input.x != "a"',
     'p if not input.x != "a"',
     [U, U, True]),
    ('not count(input.items) > 2',
     'p if not count(input.items) > 2',
     [U, True, U]),
    ('not startswith(lower(input.s), "a")',
     'p if not startswith(lower(input.s), "a")',
     [U, True, U]),
    ('not f(input.x)',
     'f(x) if x == 1\np if not f(input.x)',
     [U, True, True]),
    ('not startswith(q, "a"), q a rule',
     'q := input.q\np if not startswith(q, "a")',
     [U, True, U]),
    ('not x in s, x imported',
     'import input.x\np if not x in {"a"}',
     [U, True, U]),
    ('not obj[input.k] == 1',
     'obj := {"a": 1}\np if not obj[input.k] == 1',
     [U, True, U]),
    ('not obj[input.a[input.k]]',
     'obj := {"x": 1}\np if not obj[input.a[input.k]]',
     [U, U, U]),
    ('not "k", 1 in input.m',
     'p if not "k", 1 in input.m',
     [U, True, U]),
    ('not input.n + 1 > 3',
     'p if not input.n + 1 > 3',
     [U, True, U]),
    ('not in a comprehension',
     'p if { xs := [x | some x in input.a; not x in input.b]; count(xs) > 0 }',
     [U, True, True]),
    ('not in every',
     'p if every x in input.a { not x in input.b }',
     [U, True, True]),
    ('not in a function body',
     'g(y) if not startswith(y.name, "a")\np if g(input)',
     [U, True, U]),
    ('not ... with',
     'p if { not startswith(input.s, "a") with input.s as input.t }',
     [U, U, True]),
    ('else body',
     'p := 1 if { input.a == 1 } else := 2 if { not startswith(input.s, "z") }',
     [U, 2, 2]),
    ('nested not in a moved call',
     'p if not count([x | some x in input.a; not x in input.b]) > 0',
     [True, U, U]),
    ('multi-line not',
     'p if {\n\tinput.a\n\tnot startswith(\n\t\tinput.s, "a")\n}',
     [U, True, U]),
    ('not input.x',
     'p if not input.x',
     [True, U, U]),
    ('not input.x == "a"',
     'p if not input.x == "a"',
     [True, True, U]),
    ('not input.x = input.y',
     'p if { not input.x = input.y }',
     [True, True, U]),
    ('not q, q a rule',
     'q := input.q\np if not q',
     [True, U, U]),
    ('not q == "b", q a rule',
     'q := input.q\np if not q == "b"',
     [True, U, True]),
    ('not local in set',
     'p if { some k, v in input.m; not v in {1} }',
     [U, True, U]),
]


def evaluate(tmp_path: Path, text: str, query: str, inp: Any, *, v0: bool = False) -> Any:
    f = tmp_path / "t.rego"
    f.write_text(text)
    engine = new_engine((f,), v0)
    try:
        engine.set_input_json(json.dumps(inp))
        raw = json.loads(engine.eval_query_as_json(query))
    finally:
        del engine
    if not raw.get("result"):
        return "undefined"
    return raw["result"][0]["expressions"][0]["value"]


@pytest.mark.parametrize(("name", "rules", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decides_as_opa(tmp_path: Path, name: str, rules: str, expected: list[Any]) -> None:
    text = "package t\nimport rego.v1\n" + rules + "\n"
    query = "data.t.allow" if "allow if" in rules else "data.t.p"
    got = [evaluate(tmp_path, text, query, inp) for inp in INPUTS]
    assert got == expected


@pytest.mark.parametrize("rule", [
    'p if not input.x in {"a"}',
    'p if not obj[input.missing]',
    'p if not startswith(input.missing, "a")',
])
def test_negation_over_a_missing_field_does_not_fire(tmp_path: Path, rule: str) -> None:
    text = f'package t\nimport rego.v1\nobj := {{"a": 1}}\n{rule}\n'
    assert evaluate(tmp_path, text, "data.t.p", {}) == "undefined"
    # present and not matching: the negation holds, as before
    assert evaluate(tmp_path, text, "data.t.p", {"x": "b", "missing": "b"}) is True
    assert evaluate(tmp_path, text, "data.t.p", {"x": "a", "missing": "a"}) == "undefined"


def test_same_in_rego_v0(tmp_path: Path) -> None:
    text = ('package t\nimport future.keywords.in\nobj := {"a": 1}\n'
            'p { not input.x in {"a"} }\nq { not obj[input.missing] }\n'
            'r { not startswith(input.missing, "a") }\n'
            'deny[msg] { not count(input.items) > 0; msg := "empty" }\n')
    assert evaluate(tmp_path, text, "data.t", {}, v0=True) == {"obj": {"a": 1}, "deny": []}
    assert evaluate(tmp_path, text, "data.t", {"x": "b", "missing": "b", "items": []},
                    v0=True) == {"obj": {"a": 1}, "deny": ["empty"], "p": True, "q": True,
                                 "r": True}


def test_allow_over_a_missing_attribute_denies(tmp_path: Path) -> None:
    """The reported bypass: a block list checked with `not ... in` and no attribute."""
    (tmp_path / "casf.rego").write_text(
        'package casf\nimport rego.v1\ndefault allow := false\nblocked := {"mallory"}\n'
        'allow if not input.args.user in blocked\n')
    cfg = PolicyConfig(bundle=tmp_path, files=(tmp_path / "casf.rego",), decision_cache_size=0)
    engine = RegorusEngine(cfg)
    try:
        assert engine.evaluate_sync({"args": {}}).outcome is PolicyOutcome.DENY
        assert engine.evaluate_sync({"args": {"user": "mallory"}}).outcome is PolicyOutcome.DENY
        assert engine.evaluate_sync({"args": {"user": "bob"}}).outcome is PolicyOutcome.ALLOW
    finally:
        engine.close()


def test_guards_keep_line_numbers(tmp_path: Path) -> None:
    text = ('package t\nimport rego.v1\n\np if {\n\tinput.a\n\tnot startswith(\n'
            '\t\tlower(input.s), "a")\n}\n\nq if not input.x in {"a"} # note\n')
    f = tmp_path / "t.rego"
    f.write_text(text)
    (module,) = load_modules((f,), False)
    out = rewrite_negations(module, frozenset({"p", "q"})).decode()
    assert out.count("\n") == text.count("\n")
    lines = out.splitlines()
    assert lines[5] == "\t_ = lower(input.s); not startswith("
    assert lines[9] == 'q if { _ = input.x; not input.x in {"a"} } # note'
    assert "_ =" not in "".join(lines[:5] + lines[6:9])


def test_policy_without_moved_operands_is_left_as_written(tmp_path: Path) -> None:
    text = 'package t\nimport rego.v1\np if not input.x\nq if not input.y == "a"\n'
    f = tmp_path / "t.rego"
    f.write_text(text)
    (module,) = load_modules((f,), False)
    assert rewrite_negations(module, frozenset({"p", "q"})) == text.encode()


@pytest.mark.parametrize(("rule", "line"), [
    ("p if not input.x[_]", 4),
    ('p if {\n\tinput.y\n\tnot startswith(input.x[_], "a")\n}', 6),
])
def test_wildcard_in_negation_is_refused_with_file_and_line(tmp_path: Path, rule: str,
                                                            line: int) -> None:
    f = tmp_path / "bad.rego"
    f.write_text(f"package t\nimport rego.v1\n\n{rule}\n")
    with pytest.raises(PolicyLoadError, match=rf"bad\.rego:{line}: `_` inside a negated"):
        new_engine((f,), False)


def test_wildcard_inside_a_comprehension_under_not_is_fine(tmp_path: Path) -> None:
    text = ('package t\nimport rego.v1\n'
            'p if not count([x | x := input.xs[_]; x > 1]) > 0\n')
    assert evaluate(tmp_path, text, "data.t.p", {"xs": [1]}) is True
    assert evaluate(tmp_path, text, "data.t.p", {"xs": [2]}) == "undefined"


CLINIC_EMPTY = {"allow": False, "needs_approval": False,
                "violations": ["BadRequest_MissingPatientId", "BadRequest_MissingTenantId"]}


@pytest.mark.parametrize("bundle", [CLINIC / "policies", ROOT / "policies"])
def test_shipped_policies_load_and_decide(bundle: Path) -> None:
    files = tuple(p for p in sorted(bundle.glob("*.rego")) if not p.name.endswith("_test.rego"))
    cfg = PolicyConfig(bundle=bundle, files=files, decision_cache_size=0)
    engine = RegorusEngine(cfg)
    engine.close()


def test_clinic_decision_on_an_empty_input_is_opas(tmp_path: Path) -> None:
    """OPA's answer for ``{}``: no role and no tool, so `not input.role in known_roles`
    and `not permitted[input.tool]` are undefined and add no violation."""
    files = tuple(p for p in sorted((CLINIC / "policies").glob("*.rego"))
                  if not p.name.endswith("_test.rego"))
    engine = new_engine(files, False, "data.casf")
    try:
        engine.set_input_json("{}")
        raw = json.loads(engine.eval_query_as_json("data.casf"))
    finally:
        del engine
    value = raw["result"][0]["expressions"][0]["value"]
    assert {k: value[k] for k in CLINIC_EMPTY} == CLINIC_EMPTY


REGO = Path(__file__).parent / "rego"


def policy_test(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "policy", "test", *args],
                          capture_output=True, text=True, timeout=60)


def test_rego_negation_tests_pass() -> None:
    res = policy_test(str(REGO / "negation"), "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS: 12/12" in res.stdout


def test_rego_negation_tests_pass_in_v0() -> None:
    res = policy_test(str(REGO / "negation_v0"), "--v0-compatible", "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS: 6/6" in res.stdout
    assert policy_test(str(REGO / "negation_v0")).returncode == 1  # v0 needs the flag


@pytest.mark.parametrize(("rule", "line"), [
    ("p := -input.n", 3),
    ("p if {\n\tx := input.n\n\ty := -x\n\ty < 0\n}", 5),
])
def test_unary_minus_on_an_expression_is_refused(tmp_path: Path, rule: str, line: int) -> None:
    """regorus fails every evaluation of `-x` (OPA computes it): refuse it at load."""
    f = tmp_path / "neg.rego"
    f.write_text(f"package t\nimport rego.v1\n{rule}\n")
    with pytest.raises(PolicyLoadError, match=rf"neg\.rego:{line}: unary minus .* `0 - x`"):
        new_engine((f,), False)


def test_negative_literals_load(tmp_path: Path) -> None:
    text = "package t\nimport rego.v1\np := [-1, -(2), 3 - -1, 0 - input.n]\n"
    assert evaluate(tmp_path, text, "data.t.p", {"n": 4}) == [-1, -2, 4, -4]
