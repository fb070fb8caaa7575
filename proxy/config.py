"""Configuration: one YAML file parsed once into frozen, typed models.

Errors never surface as tracebacks: every problem is a :class:`ConfigError`
naming the file, the key path (``routes[3].match.path``) and the fix.
``${VAR}`` and ``${VAR:-default}`` are expanded from the environment snapshot
before parsing (in string scalars only, so YAML structure cannot be injected).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from proxy.routing import OverlapError, RouteTable, Template, TemplateError
from proxy.settings import Environment


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the message shown to operators."""

    def __init__(self, file: str, path: str, problem: str, fix: str = "") -> None:
        where = f"{file}: {path}" if path else file
        text = f"{where}: {problem}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
        self.file = file
        self.path = path


class Mode(StrEnum):
    ALLOW = "ALLOW"
    STEP_UP = "STEP_UP"
    READ_ONLY = "READ_ONLY"
    KILL_SWITCH = "KILL_SWITCH"


Effect = Literal["read", "write"]
FailMode = Literal["open", "closed"]
AttrSource = Literal["path", "query", "header", "body", "principal"]

# ----------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    connect_timeout_s: float = 1.0
    timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    pool_size: int = 100
    forward_credentials: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 1_048_576
    body_read_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class PrincipalSpec:
    id: str
    role: str
    tenant: str | None


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    key_id: str
    sha256: str
    principal: PrincipalSpec


@dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    header: str
    keys_file: Path
    keys: tuple[ApiKeyEntry, ...]


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    api_keys: ApiKeysConfig | None


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    request_id_headers: tuple[str, ...] = ("Idempotency-Key", "X-Request-Id")
    ttl_s: float = 86_400.0
    max_stored_body_bytes: int = 65_536
    lease_s: float | None = None  # None: upstream timeout + 5 s


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    name: str
    tools: frozenset[str]
    key: str
    limit: int
    window_s: float
    cost: int = 1


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How to use Redis when ``REDIS_URL`` is set (the URL itself is never in the file)."""

    cluster: bool = False
    timeout_s: float = 0.2
    pool_size: int = 64
    key_prefix: str = "casf"
    mode_refresh_s: float = 0.25


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    bundle: Path
    files: tuple[Path, ...]
    query: str = "data.casf"
    rego_v0: bool = False
    policy_hash: str = ""


@dataclass(frozen=True, slots=True)
class AuditConfig:
    sqlite_path: Path
    chain_id: str
    batch_max: int = 256
    batch_wait_s: float = 0.0
    timeout_s: float = 2.0
    redact: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    target: str  # dotted path into the policy input, e.g. "subject.patient_id"
    source: AttrSource
    name: str  # path param / query name / header name / JSON pointer / principal field


@dataclass(frozen=True, slots=True)
class RouteConfig:
    index: int
    method: str
    path: str
    tool: str
    effect: Effect
    attributes: tuple[AttributeSpec, ...]
    required: tuple[str, ...]
    enforce: bool
    fail_mode: FailMode
    allow_in_kill_switch: bool
    resource_tenant: str | None

    @property
    def reads_body(self) -> bool:
        return any(a.source == "body" for a in self.attributes)


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    traffic: Listener
    admin: Listener
    upstream: UpstreamConfig
    limits: LimitsConfig
    identity: IdentityConfig
    mode_default: Mode
    replay: ReplayConfig
    rate_limits: tuple[RateLimitRule, ...]
    redis: RedisConfig
    policy: PolicyConfig
    audit: AuditConfig
    routes: tuple[RouteConfig, ...]
    passthrough: tuple[str, ...]
    enforce_default: bool
    table: RouteTable[RouteConfig] = field(compare=False, repr=False)
    digest: str = ""

    @property
    def replay_lease_s(self) -> float:
        if self.replay.lease_s is not None:
            return self.replay.lease_s
        return self.upstream.timeout_s + 5.0


# ----------------------------------------------------------------- parsing

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Walks the parsed YAML, tracking the key path for error messages."""

    def __init__(self, file: str, env: Environment) -> None:
        self.file = file
        self.env = env

    def fail(self, path: str, problem: str, fix: str = "") -> NoReturn:
        raise ConfigError(self.file, path, problem, fix)

    def expand(self, value: str, path: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = self.env.get(name)
            if got is not None:
                return got
            if default is not None:
                return default
            self.fail(path, f"environment variable {name} is not set",
                      f"set {name} or write ${{{name}:-default}}")
        return _VAR.sub(sub, value)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def known(self, m: Mapping[str, Any], path: str, keys: set[str]) -> None:
        for k in m:
            if k not in keys:
                self.fail(f"{path}.{k}" if path else str(k), "unknown key",
                          "one of: " + ", ".join(sorted(keys)))

    def string(self, m: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
        p = f"{path}.{key}" if path else key
        if key not in m or m[key] is None:
            if default is None:
                self.fail(p, "is required")
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.fail(p, f"expected a string, got {type(v).__name__}")
        return self.expand(str(v), p)

    def opt_string(self, m: Mapping[str, Any], key: str, path: str) -> str | None:
        if m.get(key) is None:
            return None
        return self.string(m, key, path)

    def number(self, m: Mapping[str, Any], key: str, path: str, default: float,
               minimum: float = 0.0) -> float:
        p = f"{path}.{key}" if path else key
        if key not in m or m[key] is None:
            return default
        v = m[key]
        if isinstance(v, str):
            v = self.expand(v, p)
            try:
                v = float(v)
            except ValueError:
                self.fail(p, f"expected a number, got {v!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(p, f"expected a number, got {type(v).__name__}")
        if v < minimum:
            self.fail(p, f"must be >= {minimum}")
        return float(v)

    def integer(self, m: Mapping[str, Any], key: str, path: str, default: int,
                minimum: int = 0) -> int:
        v = self.number(m, key, path, float(default), float(minimum))
        if v != int(v):
            self.fail(f"{path}.{key}", "expected a whole number")
        return int(v)

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        p = f"{path}.{key}" if path else key
        v = m.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            v = self.expand(v, p).lower()
            if v in ("true", "1", "yes"):
                return True
            if v in ("false", "0", "no"):
                return False
        if not isinstance(v, bool):
            self.fail(p, "expected true or false")
        return v

    def seq(self, m: Mapping[str, Any], key: str, path: str) -> list[Any]:
        v = m.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(f"{path}.{key}" if path else key, "expected a list")
        return v

    def listener(self, m: Mapping[str, Any], key: str, default: str) -> Listener:
        text = self.string(m, key, "listen", default)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
            self.fail(f"listen.{key}", f"{text!r} is not HOST:PORT", "e.g. 0.0.0.0:8080")
        return Listener(host.strip("[]") or "0.0.0.0", int(port))


_TOP_KEYS = {"listen", "upstream", "limits", "identity", "mode", "replay", "rate_limits",
             "redis", "policy", "audit", "routes", "unmatched", "defaults"}
_ROUTE_KEYS = {"method", "path", "tool", "effect", "attributes", "required", "enforce",
               "fail_mode", "allow_in_kill_switch", "resource_tenant"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
_TARGET = re.compile(r"^(subject|args|context)\.[A-Za-z_][A-Za-z0-9_]*$")
_PRINCIPAL_FIELDS = {"id", "role", "tenant"}


def load_config(path: str | Path, env: Environment) -> Config:
    """Read, expand and validate ``path``; raise :class:`ConfigError` on any problem."""
    src = Path(path)
    file = str(src)
    try:
        text = src.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}",
                          "pass an existing file with -c/--config or CASF_CONFIG") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from exc
    r = _Reader(file, env)
    top = r.mapping(data, "")
    r.known(top, "", _TOP_KEYS)
    base = src.resolve().parent
    return _build(r, top, src, base, env)


def _build(r: _Reader, top: Mapping[str, Any], src: Path, base: Path,
           env: Environment) -> Config:
    listen = r.mapping(top.get("listen"), "listen")
    r.known(listen, "listen", {"traffic", "admin"})
    traffic = r.listener(listen, "traffic", "0.0.0.0:8080")
    admin = r.listener(listen, "admin", "127.0.0.1:9901")

    up = r.mapping(top.get("upstream"), "upstream")
    r.known(up, "upstream", {"url", "connect_timeout_ms", "timeout_ms", "read_timeout_ms",
                             "pool_size", "forward_credentials"})
    url = r.string(up, "url", "upstream")
    if not re.match(r"^https?://[^/]+", url):
        r.fail("upstream.url", f"{url!r} is not an http(s) URL", "e.g. http://127.0.0.1:3000")
    upstream = UpstreamConfig(
        url=url.rstrip("/"),
        connect_timeout_s=r.number(up, "connect_timeout_ms", "upstream", 1000, 1) / 1000,
        timeout_s=r.number(up, "timeout_ms", "upstream", 10_000, 1) / 1000,
        read_timeout_s=r.number(up, "read_timeout_ms", "upstream", 60_000, 1) / 1000,
        pool_size=r.integer(up, "pool_size", "upstream", 100, 1),
        forward_credentials=r.boolean(up, "forward_credentials", "upstream", False),
    )

    lim = r.mapping(top.get("limits"), "limits")
    r.known(lim, "limits", {"max_body_bytes", "body_read_timeout_ms"})
    limits = LimitsConfig(
        max_body_bytes=r.integer(lim, "max_body_bytes", "limits", 1_048_576, 0),
        body_read_timeout_s=r.number(lim, "body_read_timeout_ms", "limits", 10_000, 1) / 1000,
    )

    identity = _identity(r, r.mapping(top.get("identity"), "identity"), base, env)

    mode_m = r.mapping(top.get("mode"), "mode")
    r.known(mode_m, "mode", {"default"})
    mode_text = r.string(mode_m, "default", "mode", "ALLOW")
    if mode_text not in Mode.__members__:
        r.fail("mode.default", f"{mode_text!r} is not a mode", "one of: " + ", ".join(Mode))
    mode_default = Mode(mode_text)

    rp = r.mapping(top.get("replay"), "replay")
    r.known(rp, "replay", {"request_id_headers", "ttl_seconds", "max_stored_body_bytes",
                           "lease_seconds"})
    headers = tuple(str(h) for h in r.seq(rp, "request_id_headers", "replay")) or (
        "Idempotency-Key", "X-Request-Id")
    lease = rp.get("lease_seconds")
    replay = ReplayConfig(
        request_id_headers=headers,
        ttl_s=r.number(rp, "ttl_seconds", "replay", 86_400, 1),
        max_stored_body_bytes=r.integer(rp, "max_stored_body_bytes", "replay", 65_536, 0),
        lease_s=None if lease is None else r.number(rp, "lease_seconds", "replay", 15, 1),
    )

    rules: list[RateLimitRule] = []
    for i, raw in enumerate(r.seq(top, "rate_limits", "")):
        p = f"rate_limits[{i}]"
        m = r.mapping(raw, p)
        r.known(m, p, {"name", "tools", "key", "limit", "window_seconds", "cost"})
        key = r.string(m, "key", p)
        for ref in re.findall(r"\{([^}]*)\}", key):
            if not re.match(r"^(tool|role|mode|effect|(subject|args|context|principal)\.\w+)$",
                            ref):
                r.fail(f"{p}.key", f"{{{ref}}} is not a policy input field",
                       "use e.g. {subject.patient_id}, {principal.id}, {tool}")
        tools = frozenset(str(t) for t in r.seq(m, "tools", p))
        if not tools:
            r.fail(f"{p}.tools", "is required", "list the tool names this limit applies to")
        rules.append(RateLimitRule(
            name=r.string(m, "name", p, f"rule{i}"), tools=tools, key=key,
            limit=r.integer(m, "limit", p, 0, 1),
            window_s=r.number(m, "window_seconds", p, 0, 0.001),
            cost=r.integer(m, "cost", p, 1, 1)))

    rd = r.mapping(top.get("redis"), "redis")
    r.known(rd, "redis", {"cluster", "timeout_ms", "pool_size", "key_prefix",
                          "mode_refresh_ms"})
    prefix = r.string(rd, "key_prefix", "redis", "casf")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", prefix):
        r.fail("redis.key_prefix", f"{prefix!r} has characters other than A-Z a-z 0-9 _ . : -")
    redis_cfg = RedisConfig(
        cluster=r.boolean(rd, "cluster", "redis", False),
        timeout_s=r.number(rd, "timeout_ms", "redis", 200, 1) / 1000,
        pool_size=r.integer(rd, "pool_size", "redis", 64, 1),
        key_prefix=prefix,
        mode_refresh_s=r.number(rd, "mode_refresh_ms", "redis", 250, 10) / 1000,
    )

    policy = _policy(r, r.mapping(top.get("policy"), "policy"), base)

    au = r.mapping(top.get("audit"), "audit")
    r.known(au, "audit", {"sqlite_path", "chain_id", "batch_max", "batch_wait_ms",
                          "timeout_ms", "redact"})
    redact: dict[str, str] = {}
    for target, action in r.mapping(au.get("redact"), "audit.redact").items():
        if not _TARGET.match(str(target)):
            r.fail(f"audit.redact.{target}", "must name subject.X, args.X or context.X")
        if action not in ("hash", "drop"):
            r.fail(f"audit.redact.{target}", f"{action!r} is not a redaction", "hash or drop")
        redact[str(target)] = str(action)
    sqlite_path = Path(r.string(au, "sqlite_path", "audit", "casf-audit.db"))
    audit = AuditConfig(
        sqlite_path=sqlite_path if sqlite_path.is_absolute() else base / sqlite_path,
        chain_id=r.string(au, "chain_id", "audit", env.get("HOSTNAME") or "casf-0"),
        batch_max=r.integer(au, "batch_max", "audit", 256, 1),
        batch_wait_s=r.number(au, "batch_wait_ms", "audit", 0, 0) / 1000,
        timeout_s=r.number(au, "timeout_ms", "audit", 2000, 1) / 1000,
        redact=redact,
    )

    defaults = r.mapping(top.get("defaults"), "defaults")
    r.known(defaults, "defaults", {"enforce"})
    enforce_default = r.boolean(defaults, "enforce", "defaults", True)

    routes = tuple(_route(r, i, raw, enforce_default)
                   for i, raw in enumerate(r.seq(top, "routes", "")))
    if not routes:
        r.fail("routes", "no routes are configured", "map at least one method + path to a tool")
    try:
        table = RouteTable.build((rt.method, Template.parse(rt.path), rt) for rt in routes)
    except OverlapError as exc:
        r.fail(f"routes[{exc.second}].path", str(exc),
               "make the templates disjoint (a literal segment always wins nowhere: "
               "overlaps are rejected)")

    um = r.mapping(top.get("unmatched"), "unmatched")
    r.known(um, "unmatched", {"action", "passthrough"})
    action = r.string(um, "action", "unmatched", "deny")
    if action != "deny":
        r.fail("unmatched.action", f"{action!r} is not supported",
               "only 'deny'; list forwarded prefixes under unmatched.passthrough")
    passthrough: list[str] = []
    for i, pfx in enumerate(r.seq(um, "passthrough", "unmatched")):
        text = str(pfx)
        if not text.startswith("/"):
            r.fail(f"unmatched.passthrough[{i}]", f"{text!r} must start with '/'")
        passthrough.append(text)

    digest = hashlib.sha256(src.read_bytes() + policy.policy_hash.encode()).hexdigest()
    return Config(
        source=src, traffic=traffic, admin=admin, upstream=upstream, limits=limits,
        identity=identity, mode_default=mode_default, replay=replay,
        rate_limits=tuple(rules), redis=redis_cfg, policy=policy, audit=audit, routes=routes,
        passthrough=tuple(passthrough), enforce_default=enforce_default, table=table,
        digest=digest,
    )


def _route(r: _Reader, i: int, raw: Any, enforce_default: bool) -> RouteConfig:
    p = f"routes[{i}]"
    m = r.mapping(raw, p)
    r.known(m, p, _ROUTE_KEYS)
    method = r.string(m, "method", p).upper()
    if method not in _METHODS:
        r.fail(f"{p}.method", f"{method!r} is not supported",
               "one of: " + ", ".join(sorted(_METHODS)))
    path = r.string(m, "path", p)
    try:
        Template.parse(path)
    except TemplateError as exc:
        r.fail(f"{p}.path", f"{path!r}: {exc}", "e.g. /patients/{patient_id}/history")
    effect = r.string(m, "effect", p)
    if effect not in ("read", "write"):
        r.fail(f"{p}.effect", f"{effect!r} is not an effect", "read or write")
    params = set(re.findall(r"\{([A-Za-z_]\w*)\}", path))
    attrs: list[AttributeSpec] = []
    am = r.mapping(m.get("attributes"), f"{p}.attributes")
    for target, spec in am.items():
        ap = f"{p}.attributes.{target}"
        if not _TARGET.match(str(target)):
            r.fail(ap, "attribute target must be subject.X, args.X or context.X")
        sm = r.mapping(spec, ap)
        r.known(sm, ap, {"from", "name", "pointer"})
        source = r.string(sm, "from", ap)
        if source not in ("path", "query", "header", "body", "principal"):
            r.fail(f"{ap}.from", f"{source!r} is not a source",
                   "one of: path, query, header, body, principal")
        if source == "body":
            name = r.string(sm, "pointer", ap)
            if not name.startswith("/"):
                r.fail(f"{ap}.pointer", f"{name!r} is not a JSON pointer", "e.g. /patient_id")
        else:
            name = r.string(sm, "name", ap)
        if source == "path" and name not in params:
            r.fail(f"{ap}.name", f"path parameter {{{name}}} is not in {path!r}")
        if source == "principal" and name not in _PRINCIPAL_FIELDS:
            r.fail(f"{ap}.name", f"{name!r} is not a principal field", "id, role or tenant")
        attrs.append(AttributeSpec(str(target), source, name))  # type: ignore[arg-type]
    targets = {a.target for a in attrs}
    required = tuple(str(x) for x in r.seq(m, "required", p))
    for j, req in enumerate(required):
        if req not in targets:
            r.fail(f"{p}.required[{j}]", f"{req!r} is not one of this route's attributes")
    resource_tenant = r.opt_string(m, "resource_tenant", p)
    if resource_tenant is not None and resource_tenant not in targets:
        r.fail(f"{p}.resource_tenant", f"{resource_tenant!r} is not one of this route's attributes")
    fail_mode = r.string(m, "fail_mode", p, "closed" if effect == "write" else "open")
    if fail_mode not in ("open", "closed"):
        r.fail(f"{p}.fail_mode", f"{fail_mode!r}", "open or closed")
    return RouteConfig(
        index=i, method=method, path=path, tool=r.string(m, "tool", p),
        effect=effect,  # type: ignore[arg-type]
        attributes=tuple(attrs), required=required,
        enforce=r.boolean(m, "enforce", p, enforce_default),
        fail_mode=fail_mode,  # type: ignore[arg-type]
        allow_in_kill_switch=r.boolean(m, "allow_in_kill_switch", p, False),
        resource_tenant=resource_tenant,
    )


def _identity(r: _Reader, m: Mapping[str, Any], base: Path, env: Environment) -> IdentityConfig:
    r.known(m, "identity", {"api_keys"})
    ak = m.get("api_keys")
    if ak is None:
        r.fail("identity.api_keys", "no authenticator is configured",
               "configure identity.api_keys with a keys_file")
    akm = r.mapping(ak, "identity.api_keys")
    r.known(akm, "identity.api_keys", {"header", "keys_file"})
    header = r.string(akm, "header", "identity.api_keys", "X-API-Key")
    keys_path = Path(r.string(akm, "keys_file", "identity.api_keys"))
    if not keys_path.is_absolute():
        keys_path = base / keys_path
    return IdentityConfig(ApiKeysConfig(header, keys_path, load_keys(keys_path, env)))


def load_keys(path: Path, env: Environment) -> tuple[ApiKeyEntry, ...]:
    """Parse a keys file: ``keys: [{id, sha256, principal: {id, role, tenant}}]``."""
    file = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read keys file: {exc.strerror}",
                          "check identity.api_keys.keys_file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from exc
    r = _Reader(file, env)
    top = r.mapping(data, "")
    r.known(top, "", {"keys"})
    out: list[ApiKeyEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(r.seq(top, "keys", "")):
        p = f"keys[{i}]"
        m = r.mapping(raw, p)
        r.known(m, p, {"id", "sha256", "principal"})
        digest = r.string(m, "sha256", p).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            r.fail(f"{p}.sha256", "is not a hex SHA-256 digest",
                   "store sha256(key) in hex, never the key itself")
        if digest in seen:
            r.fail(f"{p}.sha256", "duplicate key hash")
        seen.add(digest)
        pm = r.mapping(m.get("principal"), f"{p}.principal")
        r.known(pm, f"{p}.principal", {"id", "role", "tenant"})
        out.append(ApiKeyEntry(
            key_id=r.string(m, "id", p), sha256=digest,
            principal=PrincipalSpec(r.string(pm, "id", f"{p}.principal"),
                                    r.string(pm, "role", f"{p}.principal"),
                                    r.opt_string(pm, "tenant", f"{p}.principal"))))
    return tuple(out)


def _policy(r: _Reader, m: Mapping[str, Any], base: Path) -> PolicyConfig:
    r.known(m, "policy", {"engine", "bundle", "query", "rego_v0"})
    engine = r.string(m, "engine", "policy", "regorus")
    if engine != "regorus":
        r.fail("policy.engine", f"{engine!r} is not supported", "regorus (in-process)")
    bundle = Path(r.string(m, "bundle", "policy"))
    if not bundle.is_absolute():
        bundle = base / bundle
    if not bundle.is_dir():
        r.fail("policy.bundle", f"{bundle} is not a directory", "point it at the Rego folder")
    files = tuple(sorted(p for p in bundle.rglob("*.rego") if not p.name.endswith("_test.rego")))
    if not files:
        r.fail("policy.bundle", f"no .rego files in {bundle}")
    query = r.string(m, "query", "policy", "data.casf")
    if not re.fullmatch(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+", query):
        r.fail("policy.query", f"{query!r} is not a data reference", "e.g. data.casf")
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(bundle).as_posix().encode()
        body = f.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(body).to_bytes(8, "big") + body)
    return PolicyConfig(bundle=bundle, files=files, query=query,
                        rego_v0=r.boolean(m, "rego_v0", "policy", False),
                        policy_hash="sha256:" + h.hexdigest())
