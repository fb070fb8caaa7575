"""The ``mcp:`` config section: MCP endpoints and their tool map (pure).

::

    mcp:
      - path: /mcp
        upstream_path: /mcp          # default: the same path
        tools:
          create_appointment:
            tool: cliniccloud.create_appointment
            effect: write
            attributes:
              subject.patient_id: {from: arguments, pointer: /patient_id}
            required: [subject.patient_id]
          list_appointments: {tool: cliniccloud.list_appointments, effect: read}
        unknown_tools: deny          # deny (default) | allow
        deny_as: jsonrpc_error       # jsonrpc_error (default) | tool_error
        methods: [resources/list, resources/read]   # or {resources/*: allow}
        list_query: data.casf.visible
        require_request_id: false

:func:`parse_mcp` turns the parsed YAML into frozen :class:`McpEndpoint` s or
raises :class:`McpConfigError` naming the key path. Attribute pointers are
JSON pointers (RFC 6901) into ``params.arguments``;
:meth:`McpAttribute.spec` gives the equivalent route attribute (a ``body``
pointer into the whole JSON-RPC message) for the attribute builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from proxy.config import AttributeSpec

Effect = Literal["read", "write"]
UnknownTools = Literal["deny", "allow"]
DenyAs = Literal["jsonrpc_error", "tool_error"]

#: Methods that pass whenever the caller is authenticated, in every mode:
#: a client must be able to connect and learn why it is refused.
LIFECYCLE_METHODS = frozenset({"initialize", "server/discover", "ping"})
#: Methods decided by the tool map, never by ``methods``.
TOOL_METHODS = frozenset({"tools/call", "tools/list"})

ARGUMENTS_POINTER = "/params/arguments"

_ENDPOINT_KEYS = {"path", "upstream_path", "tools", "unknown_tools", "deny_as", "methods",
                  "list_query", "require_request_id"}
_TOOL_KEYS = {"tool", "effect", "attributes", "required"}
_ATTR_KEYS = {"from", "pointer"}
_SOURCES = ("arguments",)
_TARGET = re.compile(r"^(subject|args|context)\.[A-Za-z_][A-Za-z0-9_]*$")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
_METHOD = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*(/\*)?$")
_QUERY = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOOL_NAME_MAX = 128


class McpConfigError(ValueError):
    """A problem in the ``mcp:`` section; ``path`` is the key path (``mcp[0].tools.x``)."""

    def __init__(self, path: str, problem: str, fix: str = "") -> None:
        text = f"{path}: {problem}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
        self.path = path
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True, slots=True)
class McpAttribute:
    """``target: {from: arguments, pointer: /x}``: the policy input field ``target``
    takes the value at ``pointer`` inside ``params.arguments``."""

    target: str  # dotted path into the policy input, e.g. "subject.patient_id"
    pointer: str  # RFC 6901 pointer into params.arguments, e.g. "/patient_id"

    def spec(self) -> AttributeSpec:
        """The same attribute as a route declares it: a ``body`` pointer into the
        whole JSON-RPC message (``/params/arguments`` + ``pointer``)."""
        return AttributeSpec(self.target, "body", ARGUMENTS_POINTER + self.pointer)


@dataclass(frozen=True, slots=True)
class McpTool:
    """What an MCP tool name runs as: the pipeline's tool, its effect, its attributes."""

    tool: str
    effect: Effect
    attributes: tuple[McpAttribute, ...] = ()
    required: tuple[str, ...] = ()

    def attribute_specs(self) -> tuple[AttributeSpec, ...]:
        return tuple(a.spec() for a in self.attributes)


@dataclass(frozen=True, slots=True)
class McpEndpoint:
    """One MCP endpoint: the path clients POST to and how its messages are decided."""

    index: int
    path: str
    upstream_path: str
    tools: Mapping[str, McpTool]
    unknown_tools: UnknownTools = "deny"
    deny_as: DenyAs = "jsonrpc_error"
    methods: frozenset[str] = frozenset()  # exact names, or "prefix/*"
    list_query: str | None = None
    require_request_id: bool = False

    def tool_for(self, name: str) -> McpTool | None:
        """The mapping of MCP tool ``name``, or None when it is not mapped."""
        return self.tools.get(name)

    def resolve(self, name: str) -> McpTool | None:
        """What a ``tools/call`` of ``name`` runs as: its mapping; with
        ``unknown_tools: allow`` an unmapped name runs as the tool of that
        name with effect ``write`` (nothing says it only reads, so writes'
        rules apply: fail closed, READ_ONLY denies it); else None
        (``Route_NotMapped``)."""
        mapped = self.tools.get(name)
        if mapped is not None or self.unknown_tools != "allow":
            return mapped
        return McpTool(tool=name, effect="write")

    def lists(self, name: str) -> bool:
        """Whether ``tools/list`` may show ``name`` at all (before ``list_query``)."""
        return name in self.tools or self.unknown_tools == "allow"

    def method_allowed(self, method: str) -> bool:
        """Whether a method other than tools/*, lifecycle and notifications is allowed."""
        if method in self.methods:
            return True
        return any(m.endswith("/*") and method.startswith(m[:-1]) for m in self.methods)


def _fail(path: str, problem: str, fix: str = "") -> NoReturn:
    raise McpConfigError(path, problem, fix)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _known(m: Mapping[str, Any], path: str, keys: set[str]) -> None:
    for k in m:
        if k not in keys:
            _fail(f"{path}.{k}", "unknown key", "one of: " + ", ".join(sorted(keys)))


class _Strings:
    def __init__(self, expand: Callable[[str, str], str] | None) -> None:
        self.expand = expand

    def get(self, m: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
        p = f"{path}.{key}"
        v = m.get(key)
        if v is None:
            if default is None:
                _fail(p, "is required")
            return default
        if not isinstance(v, str):
            _fail(p, f"expected a string, got {type(v).__name__}")
        return self.expand(v, p) if self.expand is not None else v

    def boolean(self, m: Mapping[str, Any], key: str, path: str) -> bool:
        v = m.get(key)
        if v is None:
            return False
        if isinstance(v, str):
            text = self.get(m, key, path).lower()
            if text in ("true", "false"):
                return text == "true"
        if not isinstance(v, bool):
            _fail(f"{path}.{key}", "expected true or false")
        return v


def parse_mcp(raw: object, path: str = "mcp",
              expand: Callable[[str, str], str] | None = None) -> tuple[McpEndpoint, ...]:
    """Validate the ``mcp:`` section (a list of endpoints; absent → none).

    ``expand(value, key_path)`` expands ``${VAR}`` in string values the way
    the rest of the config does; without it strings are taken as written.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        _fail(path, f"expected a list of endpoints, got {type(raw).__name__}",
              "mcp: [{path: /mcp, tools: {...}}]")
    s = _Strings(expand)
    endpoints: list[McpEndpoint] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        ep = _endpoint(s, i, item, f"{path}[{i}]")
        if ep.path in seen:
            _fail(f"{path}[{i}].path",
                  f"{ep.path!r} is already the path of {path}[{seen[ep.path]}]")
        seen[ep.path] = i
        endpoints.append(ep)
    return tuple(endpoints)


def _endpoint(s: _Strings, i: int, raw: Any, p: str) -> McpEndpoint:
    m = _mapping(raw, p)
    _known(m, p, _ENDPOINT_KEYS)
    ep_path = _http_path(s.get(m, "path", p), f"{p}.path")
    upstream_path = _http_path(s.get(m, "upstream_path", p, ep_path), f"{p}.upstream_path")
    tools: dict[str, McpTool] = {}
    for name, spec in _mapping(m.get("tools"), f"{p}.tools").items():
        tp = f"{p}.tools.{name}"
        if not isinstance(name, str) or not name or len(name) > _TOOL_NAME_MAX \
                or _CONTROL.search(name):
            _fail(tp, f"{name!r} is not an MCP tool name",
                  f"1 to {_TOOL_NAME_MAX} characters, no control characters")
        tools[name] = _tool(s, spec, tp)
    unknown = s.get(m, "unknown_tools", p, "deny")
    if unknown not in ("deny", "allow"):
        _fail(f"{p}.unknown_tools", f"{unknown!r} is not one of deny, allow")
    deny_as = s.get(m, "deny_as", p, "jsonrpc_error")
    if deny_as not in ("jsonrpc_error", "tool_error"):
        _fail(f"{p}.deny_as", f"{deny_as!r} is not one of jsonrpc_error, tool_error")
    list_query = m.get("list_query")
    if list_query is not None:
        list_query = s.get(m, "list_query", p)
        if not _QUERY.fullmatch(list_query):
            _fail(f"{p}.list_query", f"{list_query!r} is not a Rego query",
                  "a rule reference such as data.casf.visible")
    return McpEndpoint(
        index=i, path=ep_path, upstream_path=upstream_path,
        tools=MappingProxyType(tools),
        unknown_tools=unknown,  # type: ignore[arg-type]
        deny_as=deny_as,  # type: ignore[arg-type]
        methods=_methods(s, m.get("methods"), f"{p}.methods"),
        list_query=list_query,
        require_request_id=s.boolean(m, "require_request_id", p),
    )


def _http_path(value: str, p: str) -> str:
    if not _PATH.fullmatch(value) or "//" in value or "/./" in value or "/../" in value \
            or value.endswith(("/.", "/..")) or "{" in value:
        _fail(p, f"{value!r} is not a plain absolute path", "e.g. /mcp")
    return value


def _methods(s: _Strings, raw: Any, p: str) -> frozenset[str]:
    if raw is None:
        return frozenset()
    names: list[tuple[str, str]] = []
    if isinstance(raw, list):
        for j, v in enumerate(raw):
            if not isinstance(v, str):
                _fail(f"{p}[{j}]", f"expected a method name, got {type(v).__name__}")
            names.append((v, f"{p}[{j}]"))
    elif isinstance(raw, dict):
        for k, v in raw.items():
            if v not in ("allow", "deny"):
                _fail(f"{p}.{k}", f"{v!r} is not one of allow, deny")
            if v == "allow":
                names.append((str(k), f"{p}.{k}"))
    else:
        _fail(p, f"expected a list of method names, got {type(raw).__name__}",
              "methods: [resources/list, resources/read]")
    out: set[str] = set()
    for name, where in names:
        if not _METHOD.fullmatch(name):
            _fail(where, f"{name!r} is not a JSON-RPC method name",
                  "e.g. resources/read, or resources/* for every resources method")
        if name in TOOL_METHODS or name.startswith("tools/"):
            _fail(where, f"{name!r} is decided by the tool map, not by methods",
                  "map the tool under tools, or set unknown_tools: allow")
        if name in LIFECYCLE_METHODS or name.startswith("notifications/"):
            _fail(where, f"{name!r} always passes for an authenticated caller",
                  "remove it from methods")
        out.add(name)
    return frozenset(out)


def _tool(s: _Strings, raw: Any, tp: str) -> McpTool:
    m = _mapping(raw, tp)
    _known(m, tp, _TOOL_KEYS)
    tool = s.get(m, "tool", tp)
    if not tool.strip() or _CONTROL.search(tool):
        _fail(f"{tp}.tool", f"{tool!r} is not a tool name", "e.g. cliniccloud.create_appointment")
    effect = s.get(m, "effect", tp)
    if effect not in ("read", "write"):
        _fail(f"{tp}.effect", f"{effect!r} is not an effect", "read or write")
    attrs: list[McpAttribute] = []
    for target, spec in _mapping(m.get("attributes"), f"{tp}.attributes").items():
        ap = f"{tp}.attributes.{target}"
        if not isinstance(target, str) or not _TARGET.fullmatch(target):
            _fail(ap, "attribute target must be subject.X, args.X or context.X")
        sm = _mapping(spec, ap)
        _known(sm, ap, _ATTR_KEYS)
        source = s.get(sm, "from", ap)
        if source not in _SOURCES:
            _fail(f"{ap}.from", f'unknown source "{source}" ({", ".join(_SOURCES)})',
                  "{from: arguments, pointer: /patient_id}")
        pointer = s.get(sm, "pointer", ap)
        if not pointer.startswith("/") or re.search(r"~(?![01])", pointer):
            _fail(f"{ap}.pointer", f"{pointer!r} is not a JSON pointer into the arguments",
                  "e.g. /patient_id")
        attrs.append(McpAttribute(target, pointer))
    targets = {a.target for a in attrs}
    raw_required = m.get("required")
    if raw_required is not None and not isinstance(raw_required, list):
        _fail(f"{tp}.required", "expected a list")
    required = tuple(str(x) for x in raw_required or ())
    for j, req in enumerate(required):
        if req not in targets:
            _fail(f"{tp}.required[{j}]", f"{req!r} is not one of this tool's attributes")
    return McpTool(tool=tool, effect=effect,  # type: ignore[arg-type]
                   attributes=tuple(attrs), required=required)
