"""Route table: method + path template → tool and effect (pure).

Templates are compiled once into a segment trie per method, so a lookup
costs one dict probe per path segment whatever the number of routes.
Overlapping templates (two routes that can match one request) are rejected
when the table is built, so matching never depends on declaration order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote

T = TypeVar("T")

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


# unmatched.passthrough forwards only these methods (docs/configuration.md#unmatched):
# a passthrough request is not authenticated, so nothing that can change state
PASSTHROUGH_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TemplateError(ValueError):
    """A path template is not well formed."""


class OverlapError(ValueError):
    """Two routes could match the same request."""

    def __init__(self, first: int, second: int, method: str, example: str) -> None:
        super().__init__(
            f"routes[{first}] and routes[{second}] overlap for {method} {example}"
        )
        self.first = first
        self.second = second


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed path template such as ``/patients/{patient_id}/history``."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_param, literal-or-name)
    trailing_slash: bool

    @classmethod
    def parse(cls, text: str) -> Template:
        if not text.startswith("/"):
            raise TemplateError("must start with '/'")
        raw = text.split("/")[1:]
        trailing = len(raw) > 1 and raw[-1] == ""
        if trailing:
            raw = raw[:-1]
        if raw == [""]:
            raw = []
        parts: list[tuple[bool, str]] = []
        names: set[str] = set()
        for seg in raw:
            if seg == "":
                raise TemplateError("empty segment ('//')")
            m = _PARAM.match(seg)
            if m:
                if m.group(1) in names:
                    raise TemplateError(f"parameter {{{m.group(1)}}} appears twice")
                names.add(m.group(1))
                parts.append((True, m.group(1)))
            elif "{" in seg or "}" in seg:
                raise TemplateError(f"segment {seg!r}: a parameter must fill a whole segment")
            elif seg in (".", "..") or "%" in seg:
                raise TemplateError(f"segment {seg!r} is not a normalised literal")
            else:
                parts.append((False, seg))
        return cls(text, tuple(parts), trailing)


@dataclass(slots=True)
class _Node(Generic[T]):
    literals: dict[str, _Node[T]] = field(default_factory=dict)
    param: _Node[T] | None = None
    leaf: _Leaf[T] | None = None
    leaf_slash: _Leaf[T] | None = None


@dataclass(frozen=True, slots=True)
class _Leaf(Generic[T]):
    index: int
    value: T
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    value: T
    params: Mapping[str, str]


class RouteTable(Generic[T]):
    """Immutable after construction; build it with :meth:`build`."""

    def __init__(self) -> None:
        self._roots: dict[str, _Node[T]] = {}

    @classmethod
    def build(cls, entries: Iterable[tuple[str, Template, T]]) -> RouteTable[T]:
        """Build from ``(method, template, value)``; raises :class:`OverlapError`."""
        table: RouteTable[T] = cls()
        for index, (method, template, value) in enumerate(entries):
            table._insert(index, method.upper(), template, value)
        return table

    def _insert(self, index: int, method: str, template: Template, value: T) -> None:
        root = self._roots.setdefault(method, _Node())
        clash = _find_overlap(root, template.parts, template.trailing_slash)
        if clash is not None:
            raise OverlapError(clash, index, method, template.text)
        node = root
        names: list[str] = []
        for is_param, text in template.parts:
            if is_param:
                if node.param is None:
                    node.param = _Node()
                node = node.param
                names.append(text)
            else:
                node = node.literals.setdefault(text, _Node())
        leaf = _Leaf(index, value, tuple(names))
        if template.trailing_slash:
            node.leaf_slash = leaf
        else:
            node.leaf = leaf

    def match(self, method: str, path: str) -> Match[T] | None:
        """Match a *normalised* path; ``None`` when no route applies."""
        root = self._roots.get(method)
        if root is None:
            return None
        trailing = len(path) > 1 and path.endswith("/")
        inner = path[1:-1] if trailing else path[1:]
        segments = inner.split("/") if inner else []
        return _walk(root, segments, 0, trailing, [])

    def methods(self) -> frozenset[str]:
        return frozenset(self._roots)


def _walk(
    node: _Node[T], segments: list[str], i: int, trailing: bool, captured: list[str]
) -> Match[T] | None:
    if i == len(segments):
        leaf = node.leaf_slash if trailing else node.leaf
        if leaf is None:
            return None
        params = {k: unquote(v, errors="strict") for k, v in zip(leaf.names, captured, strict=True)}
        return Match(leaf.value, params)
    seg = segments[i]
    child = node.literals.get(seg)
    if child is not None:
        found = _walk(child, segments, i + 1, trailing, captured)
        if found is not None:
            return found
    if node.param is not None and seg:
        captured.append(seg)
        found = _walk(node.param, segments, i + 1, trailing, captured)
        if found is not None:
            return found
        captured.pop()
    return None


def _find_overlap(
    node: _Node[T], parts: tuple[tuple[bool, str], ...], trailing: bool, i: int = 0
) -> int | None:
    """Index of an existing route that can match a path this template matches."""
    if i == len(parts):
        leaf = node.leaf_slash if trailing else node.leaf
        return leaf.index if leaf is not None else None
    is_param, text = parts[i]
    candidates: list[_Node[T]] = []
    if is_param:
        candidates.extend(node.literals.values())
    else:
        child = node.literals.get(text)
        if child is not None:
            candidates.append(child)
    if node.param is not None:
        candidates.append(node.param)
    for child in candidates:
        found = _find_overlap(child, parts, trailing, i + 1)
        if found is not None:
            return found
    return None


def passthrough_covers(entry: str, template: Template) -> bool:
    """Whether the passthrough ``entry`` matches a path that ``template`` also matches.

    An entry ending in ``/`` matches itself and every path under it; any other
    entry matches exactly itself (``DecisionCore.passthrough``). The config loader
    refuses a covering entry: passthrough applies when no route matched, so
    every other method on a routed path would be forwarded unauthenticated.
    """
    parts, trailing = template.parts, template.trailing_slash
    if not entry.endswith("/"):
        segments = entry[1:].split("/") if entry != "/" else []
        return (not trailing and len(parts) == len(segments)
                and all(_part_matches(part, seg) for part, seg in zip(parts, segments,
                                                                       strict=True)))
    prefix = entry[1:-1].split("/") if entry != "/" else []
    if len(parts) < len(prefix) or not all(
            _part_matches(part, seg) for part, seg in zip(parts, prefix, strict=False)):
        return False
    if len(parts) > len(prefix):
        return True  # every path of the template lies under the entry
    return trailing or not prefix  # the path equals the entry ("/a/" or "/")


def _part_matches(part: tuple[bool, str], segment: str) -> bool:
    is_param, text = part
    return bool(segment) if is_param else text == segment
