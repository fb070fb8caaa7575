"""What the in-process engine needs from a policy's syntax tree.

regorus parses a module and hands back its AST as JSON
(``Engine.get_ast_as_json``), with byte offsets for every node. Two things
are read from it here:

* the documents a bundle defines (packages and rule paths), so a
  ``policy.query`` that names nothing the bundle defines, or a decision
  document without ``allow``, is refused at load (:func:`query_problem`);

* negated expressions whose operands OPA evaluates *outside* the ``not``
  (:func:`rewrite_negations`). OPA's compiler moves every nested call and
  every reference used as an operand out of a negated expression before
  evaluating it (``not startswith(input.x, "a")`` runs as
  ``__local0__ = input.x; not startswith(__local0__, "a")``), so when such
  an operand is undefined the whole rule body is undefined. regorus keeps
  them inside the ``not``, where undefined makes the ``not`` true. The
  rewrite inserts, before each such ``not``, one guard ``_ = <operand>``
  per operand OPA would have moved, which fails exactly when OPA's moved
  expression fails. The operands are chosen by the same rules as OPA's
  ``RewriteExprTerms`` and ``RewriteDynamicTerms`` stages (see
  docs/policy-engine.md); anything outside them is left as written.

Only the text is changed: guards go on the line of the ``not`` they guard,
so line numbers stay those of the file on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import regorus

# nodes that are calls once OPA has parsed them (operators are builtins)
_CALLS = ("Call", "BoolExpr", "ArithExpr", "BinExpr", "Membership", "UnaryExpr")
_REFS = ("RefDot", "RefBrack")
_COMPOSITES = ("Array", "Set", "Object")
_COMPREHENSIONS = ("ArrayCompr", "SetCompr", "ObjectCompr")


class RegoSyntaxError(Exception):
    """The policy cannot be handled as OPA would; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Module:
    """One parsed policy file."""

    file: str
    source: bytes
    ast: dict[str, Any]
    package: tuple[str, ...]
    rules: tuple[tuple[str, ...], ...]  # static head paths, relative to the package
    aliases: frozenset[str]  # names that imports bind in this file


def parse_module(file: str, text: str, rego_v0: bool) -> Module:
    """Parse one file with regorus; raises ``RuntimeError`` when it does not parse."""
    engine = regorus.Engine()
    if rego_v0:
        engine.set_rego_v0(True)
    engine.add_policy(file, text)
    doc = orjson.loads(engine.get_ast_as_json())
    del engine
    ast = doc[0]["ast"]
    source = text.encode()
    for node in _nodes(ast, "UnaryExpr"):
        if _only(node["expr"])[0] != "Number":
            raise RegoSyntaxError(
                f"{file}:{node['span']['line']}: unary minus on an expression "
                "(`-x`) is an evaluation error in the in-process engine, on every "
                "request; write `0 - x`")
    package = _ref_path(ast["package"]["refr"])
    if package is None or not package:
        raise RegoSyntaxError(f"{file}: the package line is not a plain name")
    rules: list[tuple[str, ...]] = []
    for rule in ast.get("rules", []):
        path = _rule_path(rule)
        if path:
            rules.append(path)
    aliases: set[str] = set()
    for imp in ast.get("imports", []):
        imported = _ref_path(imp["refr"])
        if imported is None or imported[0] in ("rego", "future"):
            continue
        alias = imp.get("as")
        if isinstance(alias, dict):
            aliases.add(source[alias["start"]:alias["end"]].decode())
        else:
            aliases.add(imported[-1])
    return Module(file, source, ast, tuple(package), tuple(rules), frozenset(aliases))


def _nodes(node: Any, kind: str) -> Iterator[dict[str, Any]]:
    """Every ``kind`` node's body below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == kind and isinstance(value, dict):
                yield value
            yield from _nodes(value, kind)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value, kind)


def _ref_path(node: dict[str, Any]) -> list[str] | None:
    """``a.b["c"]`` as ``["a", "b", "c"]``; None when a part is not a constant."""
    kind, body = _only(node)
    if kind == "Var":
        return [str(body["value"])]
    if kind == "RefDot":
        head = _ref_path(body["refr"])
        return None if head is None else [*head, str(body["field"][1])]
    if kind == "RefBrack":
        head = _ref_path(body["refr"])
        ikind, index = _only(body["index"])
        if head is None or ikind not in ("String", "RawString"):
            return None
        return [*head, str(index["value"])]
    return None


def _static_prefix(node: dict[str, Any]) -> list[str]:
    """The constant leading part of a rule head reference (``a.b[x]`` → ``a.b``)."""
    kind, body = _only(node)
    if kind == "Var":
        return [str(body["value"])]
    if kind in _REFS:
        head = _static_prefix(body["refr"])
        if len(head) != _depth(body["refr"]):
            return head
        if kind == "RefDot":
            return [*head, str(body["field"][1])]
        ikind, index = _only(body["index"])
        if ikind in ("String", "RawString"):
            return [*head, str(index["value"])]
        return head
    return []


def _depth(node: dict[str, Any]) -> int:
    kind, body = _only(node)
    return 1 + _depth(body["refr"]) if kind in _REFS else 1


def _rule_path(rule: dict[str, Any]) -> tuple[str, ...]:
    kind, body = _only(rule)
    if kind == "Default":
        return tuple(_static_prefix(body["refr"]))
    if kind == "Spec":
        _, head = _only(body["head"])
        return tuple(_static_prefix(head["refr"]))
    return ()


def _only(node: Any) -> tuple[str, dict[str, Any]]:
    """A tagged AST node ``{"Kind": {...}}`` as (kind, body)."""
    if not isinstance(node, dict) or len(node) != 1:
        return "", {}
    ((kind, body),) = node.items()
    return str(kind), body if isinstance(body, dict) else {}


# ------------------------------------------------------------ the query's document


def query_problem(modules: list[Module], query: str) -> str | None:
    """Why ``query`` cannot produce a decision from these modules, or None.

    The query must name a document the bundle defines (a package, a rule, or
    a path inside a rule's value) and, unless it points into a rule's value
    (which only evaluation can see into), that document must have ``allow``.
    """
    want = tuple(query.split(".")[1:])
    paths = {m.package + r for m in modules for r in m.rules}
    packages = sorted({"data." + ".".join(m.package) for m in modules})
    defined = ", ".join(packages) or "none"
    into_value = any(want[:len(p)] == p for p in paths if len(p) <= len(want))
    under = any(p[:len(want)] == want for p in paths | {m.package for m in modules})
    if not into_value and not under:
        return (f"policy.query {query} names nothing the policy defines (its packages: "
                f"{defined}); set policy.query to the decision's package, or change the "
                "policy's package line")
    if into_value:
        return None
    allow = (*want, "allow")
    if not any(p[:len(allow)] == allow for p in paths):
        return (f"policy.query {query} has no allow rule, so no request could ever be "
                f"allowed (packages: {defined}); define allow in {query}, e.g. "
                "`default allow := false`")
    return None


# ------------------------------------------------------------ negation


@dataclass(slots=True)
class _Edit:
    start: int
    end: int
    text: bytes


@dataclass(slots=True)
class _Rewriter:
    module: Module
    globals_: frozenset[str]
    edits: list[_Edit] = field(default_factory=list)

    def line(self, offset: int) -> int:
        return self.module.source.count(b"\n", 0, offset) + 1

    def text(self, node: dict[str, Any]) -> bytes:
        """A node's source, with the edits already made inside it (nested queries)."""
        start, end = _extent(node)
        out = self.module.source[start:end]
        inner = [e for e in self.edits if start <= e.start and e.end <= end]
        for edit in sorted(inner, key=lambda e: (e.start, e.end), reverse=True):
            out = out[:edit.start - start] + edit.text + out[edit.end - start:]
        return out

    # -- which operands OPA moves out of a negated expression

    def is_global(self, node: dict[str, Any]) -> bool:
        kind, body = _only(node)
        return kind == "Var" and body.get("value") in self.globals_

    def expand(self, node: dict[str, Any], out: list[dict[str, Any]]) -> None:
        """OPA's RewriteExprTerms: nested calls (and composite ref subjects) move out."""
        kind, body = _only(node)
        if kind in _CALLS:
            for operand in _operands(kind, body):
                self.expand(operand, out)
            out.append(node)
        elif kind in _REFS:
            subject, indexes = _ref_parts(node)
            for index in indexes:
                self.expand(index, out)
            self.expand(subject, out)
            skind, _ = _only(subject)
            if skind in _COMPOSITES:
                self.dynamics_one(subject, out)
        elif kind in _COMPOSITES:
            for item in _items(kind, body):
                self.expand(item, out)

    def dynamics_one(self, node: dict[str, Any], out: list[dict[str, Any]]) -> None:
        """OPA's rewriteDynamicsOne: every reference operand is evaluated first."""
        kind, body = _only(node)
        if kind in _CALLS:
            return  # already moved out by expand
        if kind in _REFS:
            for index in _ref_parts(node)[1]:
                self.dynamics_one(index, out)
            out.append(node)
        elif self.is_global(node):
            out.append(node)
        elif kind in _COMPOSITES:
            for item in _items(kind, body):
                self.dynamics_one(item, out)

    def dynamics_in_term(self, node: dict[str, Any], out: list[dict[str, Any]]) -> None:
        """OPA's rewriteDynamicsInTerm: a reference stays, its index terms do not."""
        kind, _ = _only(node)
        if kind in _REFS:
            for index in _ref_parts(node)[1]:
                self.dynamics_one(index, out)
        elif kind in _COMPREHENSIONS or kind in _CALLS or self.is_global(node):
            return
        else:
            self.dynamics_one(node, out)

    def moved_operands(self, expr: dict[str, Any]) -> list[dict[str, Any]]:
        kind, body = _only(expr)
        out: list[dict[str, Any]] = []
        is_eq = (kind == "AssignExpr" and body.get("op") == "Eq") or (
            kind == "BoolExpr" and body.get("op") == "Eq")  # `==` becomes `=`
        if is_eq:
            for side in (body["lhs"], body["rhs"]):
                self.expand(side, out)
            for side in (body["lhs"], body["rhs"]):
                self.dynamics_in_term(side, out)
        elif kind in _CALLS:
            operands = _operands(kind, body)
            for operand in operands:
                self.expand(operand, out)
            for operand in operands:
                self.dynamics_one(operand, out)
        else:
            self.expand(expr, out)
            self.dynamics_in_term(expr, out)
        return out

    # -- the edits

    def query(self, query: dict[str, Any]) -> None:
        stmts = query.get("stmts", [])
        for stmt in stmts:
            kind, neg = _only(stmt.get("literal"))
            if kind != "NotExpr":
                continue
            if _has_wildcard(neg["expr"]):
                raise RegoSyntaxError(
                    f"{self.module.file}:{self.line(stmt['span']['start'])}: `_` inside a "
                    "negated expression is unsafe in OPA (rego_unsafe_var_error); bind the "
                    "value first, e.g. `some x in xs` and then `not f(x)`")
            moved = self.moved_operands(neg["expr"])
            if not moved:
                continue
            self.guard(query, stmts, stmt, neg, moved)

    def guard(self, query: dict[str, Any], stmts: list[dict[str, Any]],
              stmt: dict[str, Any], neg: dict[str, Any], moved: list[dict[str, Any]]) -> None:
        src = self.module.source
        # spans end before a closing quote: measure what the nodes really cover
        start, end = _extent(stmt)
        mods = src[_extent(neg)[1]:end]  # ` with input as ...`, if any
        seen: set[tuple[int, int]] = set()
        guards = b""
        for node in moved:
            key = _extent(node)
            if key in seen:
                continue
            seen.add(key)
            text = self.text(node)
            if b"#" not in text and b"`" not in text:  # keep the guard on one line
                text = text.replace(b"\r", b" ").replace(b"\n", b" ")
            guards += b"_ = " + text + mods + b"; "
        closing = src[_extent(stmts[-1])[1]:query["span"]["end"]]
        if len(stmts) == 1 and not closing.strip():  # `p if not ...`: no braces to add to
            self.edits.append(_Edit(start, start, b"{ " + guards))
            self.edits.append(_Edit(end, end, b" }"))
        else:
            self.edits.append(_Edit(start, start, guards))

    def apply(self) -> bytes:
        out = self.module.source
        for edit in sorted(self.edits, key=lambda e: (e.start, e.end), reverse=True):
            out = out[:edit.start] + edit.text + out[edit.end:]
        return out


def _operands(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "Call":
        return list(body.get("params", []))
    if kind == "Membership":
        key = body.get("key")
        return [n for n in (key, body["value"], body["collection"]) if n is not None]
    if kind == "UnaryExpr":
        return [body["expr"]]
    return [body["lhs"], body["rhs"]]


def _items(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "Object":
        return [part for fld in body.get("fields", []) for part in fld[1:]]
    return list(body.get("items", []))


def _ref_parts(node: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A reference's subject and its bracketed index terms, outermost last."""
    indexes: list[dict[str, Any]] = []
    kind, body = _only(node)
    while kind in _REFS:
        if kind == "RefBrack":
            indexes.append(body["index"])
        node = body["refr"]
        kind, body = _only(node)
    indexes.reverse()
    return node, indexes


def _has_wildcard(node: Any) -> bool:
    """A ``_`` in the expression itself (a comprehension's own body may bind one)."""
    if isinstance(node, dict):
        if "Var" in node and isinstance(node["Var"], dict) and node["Var"].get("value") == "_":
            return True
        return any(_has_wildcard(v) for k, v in node.items() if k not in _COMPREHENSIONS)
    if isinstance(node, list):
        return any(_has_wildcard(v) for v in node)
    return False


def _spans(node: Any) -> Iterator[tuple[int, int]]:
    if isinstance(node, dict):
        span = node.get("span")
        if isinstance(span, dict):
            yield span["start"], span["end"]
        for key, value in node.items():
            if key in ("String", "RawString") and isinstance(value, dict):
                span = value["span"]
                yield span["start"] - 1, span["end"] + 1  # the quotes are outside the span
            elif key != "span":
                yield from _spans(value)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict) and set(value) == {"line", "col", "start", "end"}:
                yield value["start"], value["end"]
            else:
                yield from _spans(value)


def _extent(node: dict[str, Any]) -> tuple[int, int]:
    """The bytes a node covers: its own span widened by its children's."""
    spans = list(_spans(node))
    return min(s for s, _ in spans), max(e for _, e in spans)


def _queries(node: Any) -> Iterator[dict[str, Any]]:
    """Every query (rule body, comprehension, ``every`` body) below ``node``, innermost
    first (so a guard that copies an operand copies its already guarded insides)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _queries(value)
        if isinstance(node.get("stmts"), list):
            yield node
    elif isinstance(node, list):
        for value in node:
            yield from _queries(value)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def rewrite_negations(module: Module, package_rules: frozenset[str]) -> bytes:
    """The module's source with OPA's evaluation order made explicit (see above).

    ``package_rules`` are the first names of every rule in the module's
    package, across all files: a bare name that is one of them (or an import
    alias, ``input`` or ``data``) is a reference, as in OPA.
    """
    names = package_rules | module.aliases | {"input", "data"}
    rw = _Rewriter(module, frozenset(n for n in names if _NAME.fullmatch(n)))
    for query in _queries(module.ast.get("rules", [])):
        rw.query(query)
    return rw.apply() if rw.edits else module.source
