"""In-process Rego through regorus (the default policy engine)."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import regorus

from proxy.config import PolicyConfig
from proxy.ports import PolicyOutcome, PolicyResult
from proxy.reasons import Reason
from proxy.rego_ast import Module, RegoSyntaxError, parse_module, query_problem, rewrite_negations


class PolicyLoadError(Exception):
    """A policy file does not compile; the message names the file and line."""


class PolicyQueryError(PolicyLoadError):
    """The policy compiles but ``policy.query`` can never produce a decision from it."""


def rego_error(exc: BaseException) -> str:
    """Regorus errors carry a Rust backtrace; keep the useful first part."""
    return str(exc).split("Stack backtrace:", 1)[0].strip()


def load_modules(files: tuple[Any, ...], rego_v0: bool) -> list[Module]:
    """Parse every file; raises :class:`PolicyLoadError` naming the file and line."""
    modules = []
    for item in files:
        # a (path, bytes) pair is a file as read (and hashed) by the config loader
        f = item[0] if isinstance(item, tuple) else item
        try:
            text = (item[1].decode("utf-8") if isinstance(item, tuple)
                    else Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyLoadError(f"{f}: cannot read: {exc}") from exc
        try:
            modules.append(parse_module(str(f), text, rego_v0))
        except RuntimeError as exc:
            raise PolicyLoadError(f"{f}: {rego_error(exc)}") from exc
        except RegoSyntaxError as exc:
            raise PolicyLoadError(str(exc)) from exc
    return modules


def document_problem(modules: list[Module], query: str) -> str | None:
    """Why ``query`` (a further document such as an MCP ``list_query``) names no rule
    of these modules, or None: it must be a rule, or a path inside a rule's value."""
    want = tuple(query.split(".")[1:])
    if any(want[:len(p)] == p for p in (m.package + r for m in modules for r in m.rules)):
        return None
    packages = ", ".join(sorted({"data." + ".".join(m.package) for m in modules})) or "none"
    return (f"{query} names no rule of the policy (its packages: {packages}); define it, "
            "e.g. `default visible := false` in the package it names")


def new_engine(files: tuple[Any, ...], rego_v0: bool, query: str | None = None,
               documents: tuple[str, ...] = ()) -> Any:
    """An engine holding ``files``, evaluating as OPA does (docs/policy-engine.md).

    Negated expressions are given the guards OPA's compiler would add
    (:func:`proxy.rego_ast.rewrite_negations`). With ``query``, a bundle that
    cannot answer it (no such document, or no ``allow`` in it) is refused with
    :class:`PolicyQueryError`; so is one that defines no rule for one of
    ``documents``.
    """
    modules = load_modules(files, rego_v0)
    if query is not None:
        problem = query_problem(modules, query)
        if problem is not None:
            raise PolicyQueryError(problem)
    for doc in documents:
        problem = document_problem(modules, doc)
        if problem is not None:
            raise PolicyQueryError(problem)
    rules: dict[tuple[str, ...], set[str]] = {}
    for m in modules:
        rules.setdefault(m.package, set()).update(r[0] for r in m.rules)
    engine = regorus.Engine()
    if rego_v0:
        engine.set_rego_v0(True)
    for m in modules:
        try:
            source = rewrite_negations(m, frozenset(rules[m.package]))
        except RegoSyntaxError as exc:
            raise PolicyLoadError(str(exc)) from exc
        try:
            engine.add_policy(m.file, source.decode())
        except RuntimeError as exc:  # the original parsed: the guards are at fault
            raise PolicyLoadError(
                f"{m.file}: cannot add OPA's guards to a negated expression "
                f"({rego_error(exc)}); move each operand of `not` into a variable first, "
                "e.g. `x := input.x` and then `not x in s`") from exc
    return engine


def parse_result(raw: Any) -> PolicyResult:
    """Strictly parse a query result: anything unexpected is a deny.

    Expected: ``{"allow": bool, "violations"?: [str], "needs_approval"?: bool}``.
    """
    bad = PolicyResult(PolicyOutcome.DENY, error=Reason.POLICY_BAD_RESULT)
    try:
        results = raw["result"]
        if not isinstance(results, list) or len(results) != 1:
            return bad
        exprs = results[0]["expressions"]
        if not isinstance(exprs, list) or len(exprs) != 1:
            return bad
        value = exprs[0]["value"]
    except (KeyError, TypeError, IndexError):
        return bad
    return parse_decision(value)


def parse_decision(value: Any) -> PolicyResult:
    """The decision document itself, strictly: the same rules for both engines.

    ``{"allow": bool, "violations"?: [str], "needs_approval"?: bool,
    "allowed_outputs"?: [str]}`` (sets arrive as lists); anything else is a deny
    with ``Policy_BadResult``.
    """
    bad = PolicyResult(PolicyOutcome.DENY, error=Reason.POLICY_BAD_RESULT)
    if not isinstance(value, dict):
        return bad
    allow = value.get("allow")
    if not isinstance(allow, bool):
        return bad
    violations = value.get("violations", [])
    if not isinstance(violations, list) or not all(isinstance(v, str) for v in violations):
        return bad
    approval = value.get("needs_approval", False)
    if not isinstance(approval, bool):
        return bad
    outputs = value.get("allowed_outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return bad
    codes = tuple(sorted(set(violations)))
    if approval:
        return PolicyResult(PolicyOutcome.NEEDS_APPROVAL, codes)
    if allow and not codes:
        return PolicyResult(PolicyOutcome.ALLOW, allowed_outputs=tuple(sorted(set(outputs))))
    return PolicyResult(PolicyOutcome.DENY, codes)


# builtins whose result is not a function of the input and the policy alone
_IMPURE = re.compile(rb"\b(time\.now_ns|rand\.intn|uuid\.rfc4122|http\.send|opa\.runtime|"
                     rb"net\.lookup_ip_addr|io\.jwt\.decode_verify|"
                     rb"crypto\.x509\.parse_and_verify_certificates\w*)\s*\(")


def is_pure(files: tuple[Any, ...]) -> bool:
    """True when no policy file calls a builtin that depends on time, chance or I/O."""
    return not any(_IMPURE.search(f[1] if isinstance(f, tuple) else Path(f).read_bytes())
                   for f in files)


class RegorusEngine:
    """Evaluates ``policy.query`` over the policy input, in-process.

    A loaded bundle is immutable (a reload builds a new engine), so for a pure
    policy the decision is a function of the input document: decisions are
    kept in a bounded LRU keyed by the serialised input
    (``policy.decision_cache_size``). A policy that calls time, random, UUID,
    HTTP or runtime builtins is never cached.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        self._engine = new_engine(cfg.sources or cfg.files, cfg.rego_v0, cfg.query,
                                  cfg.documents)
        self._query = cfg.query
        self._hash = cfg.policy_hash
        self._cache: OrderedDict[bytes, PolicyResult] = OrderedDict()
        self._cache_max = cfg.decision_cache_size if is_pure(cfg.sources or cfg.files) else 0

    @property
    def policy_hash(self) -> str:
        return self._hash

    @property
    def caching(self) -> bool:
        return self._cache_max > 0

    def evaluate_sync(self, policy_input: Mapping[str, Any]) -> PolicyResult:
        try:
            doc = orjson.dumps(policy_input)
        except TypeError:
            return PolicyResult(PolicyOutcome.DENY, error=Reason.POLICY_EVAL_ERROR)
        cache = self._cache
        # keyed by the input's SHA-256: orjson's output buffer is ~4 KB whatever
        # the document's size, so keeping it would make a full cache ~40 MB
        key = hashlib.sha256(doc).digest()
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        try:
            self._engine.set_input_json(doc.decode())
            raw = orjson.loads(self._engine.eval_query_as_json(self._query))
        except Exception:
            return PolicyResult(PolicyOutcome.DENY, error=Reason.POLICY_EVAL_ERROR)
        result = parse_result(raw)
        if self._cache_max:
            cache[key] = result
            if len(cache) > self._cache_max:
                cache.popitem(last=False)
        return result

    async def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyResult:
        return self.evaluate_sync(policy_input)

    async def query_true(self, query: str, policy_input: Mapping[str, Any]) -> bool:
        """Whether ``query`` is ``true`` for ``policy_input`` (undefined, any other value
        or an evaluation error: false)."""
        try:
            self._engine.set_input_json(orjson.dumps(policy_input).decode())
            raw = orjson.loads(self._engine.eval_query_as_json(query))
            return bool(raw["result"][0]["expressions"][0]["value"] is True)
        except Exception:
            return False

    def close(self) -> None:
        """Drop the engine now, on the event loop's thread.

        regorus engines must be freed on the thread that made them; left to the
        cyclic GC they may be collected in a worker thread (and leak with an
        "unsendable" error). Evaluating after ``close`` is an eval error (deny).
        """
        self._engine = None
