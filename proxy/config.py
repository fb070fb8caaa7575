"""Configuration: one YAML file parsed once into frozen, typed models.

Errors never surface as tracebacks: every problem is a :class:`ConfigError`
naming the file, the key path (``routes[3].match.path``) and the fix.
``${VAR}`` and ``${VAR:-default}`` are expanded from the environment snapshot
before parsing (in string scalars only, so YAML structure cannot be injected).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import yaml

from proxy.approvals.config import ApprovalsConfig, ApprovalsConfigError, parse_approvals
from proxy.logs import redact_url
from proxy.routing import OverlapError, RouteTable, Template, TemplateError, passthrough_covers
from proxy.settings import Environment
from proxy.telemetry import TelemetryConfig

if TYPE_CHECKING:  # proxy.mcp.config builds on AttributeSpec: imported where it is parsed
    from proxy.mcp.config import McpEndpoint


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
    pool_timeout_s: float = 10.0  # waiting for a free pool connection


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 1_048_576
    body_read_timeout_s: float = 10.0
    header_timeout_s: float = 10.0  # first byte of a request to its last header line
    # WebSocket routes (proxy/doors/websocket.py): the largest message either side
    # may send, the longest time without a message, and a session's whole length
    websocket_max_message_bytes: int = 1_048_576
    websocket_idle_timeout_s: float = 300.0
    websocket_max_duration_s: float = 3600.0


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
    """API keys from a keys file and/or a mounted Secret directory (docs/identity.md).

    ``keys`` is what was read at load; the authenticator re-reads both sources
    when they change (checked every ``reload_interval_s``) or on a reload call.
    """

    header: str
    keys_file: Path | None
    keys: tuple[ApiKeyEntry, ...]
    keys_dir: Path | None = None
    reload_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class JwtClaimNames:
    """Which claims carry the actor, role and tenant (dotted paths allowed)."""

    actor: str = "sub"
    role: str = "role"
    tenant: str = "tenant"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Bearer JWTs verified against a JWKS (file or URL) and/or an HS256 secret.

    ``algorithms`` is the allow list (never ``none``); each JWKS key is further
    pinned to the one algorithm its type allows. ``hs256_secret`` comes only
    from the environment variable named by ``hs256_secret_env``.
    """

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    header: str = "Authorization"
    leeway_s: float = 30.0
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_timeout_s: float = 2.0
    jwks_refresh_s: float = 300.0
    jwks_min_refresh_s: float = 10.0
    hs256_secret: bytes | None = field(default=None, repr=False)
    hs256_kid: str | None = None
    claims: JwtClaimNames = JwtClaimNames()
    require_tenant: bool = False
    cache_size: int = 10_000
    max_token_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class TrustedHeadersConfig:
    """Identity asserted by headers, honoured only from ``sources`` (off by default)."""

    sources: tuple[IPv4Network | IPv6Network, ...]
    actor_header: str = "X-Casf-Actor"
    role_header: str = "X-Casf-Role"
    tenant_header: str = "X-Casf-Tenant"


AUTH_METHODS = ("jwt", "api_keys", "trusted_headers")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """The authenticators, tried in ``order``; the first that recognises a credential decides."""

    api_keys: ApiKeysConfig | None
    jwt: JwtConfig | None = None
    trusted_headers: TrustedHeadersConfig | None = None
    order: tuple[str, ...] = ("api_keys",)
    # every header a configured authenticator reads, normalised (see credential_header_key)
    credential_headers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    request_id_headers: tuple[str, ...] = ("Idempotency-Key", "X-Request-Id")
    ttl_s: float = 86_400.0
    max_stored_body_bytes: int = 65_536
    lease_s: float | None = None  # None: upstream timeout + 5 s
    memory_max_bytes: int = 16 << 20  # embedded store only (docs/state.md)


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    name: str
    tools: frozenset[str]
    key: str
    limit: int
    window_s: float
    cost: int = 1
    # a violation this rule reports next to RateLimit_Exceeded (and next to
    # FAIL_CLOSED when its store is unreachable), e.g. casf-core's Inv_NoSmsBurst
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """Cost quotas of one calendar period each (``None``: no quota for that period)."""

    daily: int | None
    monthly: int | None


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """A per-tenant cost quota over a set of tools (docs/configuration.md, budgets).

    Every tenant has its own counters; ``tenants`` overrides the default limits
    for named tenants. Periods are UTC calendar days and months.
    """

    name: str
    costs: Mapping[str, int]  # tool -> cost of one request
    limits: BudgetLimits
    tenants: Mapping[str, BudgetLimits]
    warn_at: float

    def limits_for(self, tenant: str | None) -> BudgetLimits:
        return self.tenants.get(tenant, self.limits) if tenant is not None else self.limits


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How to use Redis when ``REDIS_URL`` is set (the URL itself is never in the file)."""

    cluster: bool = False
    timeout_s: float = 0.2
    pool_size: int = 64
    key_prefix: str = "casf"
    mode_refresh_s: float = 0.25


@dataclass(frozen=True, slots=True)
class OpaConfig:
    """An external OPA server asked through its Data API (``POST /v1/data/<path>``)."""

    url: str
    path: str  # "casf/decision" → POST {url}/v1/data/casf/decision
    timeout_s: float = 0.35
    pool_size: int = 32


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    bundle: Path | None
    files: tuple[Path, ...]
    query: str = "data.casf"
    rego_v0: bool = False
    policy_hash: str = ""
    engine: Literal["regorus", "opa"] = "regorus"
    opa: OpaConfig | None = None
    decision_cache_size: int = 10_000  # in-process engine only; 0 disables
    # the policy files' bytes as read once at load: policy_hash is over these, and
    # the in-process engine compiles these, never a second read of the files
    sources: tuple[tuple[Path, bytes], ...] = field(default=(), compare=False, repr=False)
    # further documents the bundle must define (``mcp[].list_query``), checked when loaded
    documents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditConfig:
    sqlite_path: Path
    chain_id: str
    batch_max: int = 256
    batch_wait_s: float = 0.0
    timeout_s: float = 2.0
    redact: Mapping[str, str] = field(default_factory=dict)
    # false: chain_id was not configured; on PostgreSQL each process then takes
    # the first free worker chain "{HOSTNAME}-{n}" (docs/audit.md, chains)
    chain_id_set: bool = True
    queue_max: int = 10_000  # records waiting for the writer; beyond: 503 Audit_Unavailable
    spool_dir: Path | None = None  # None: <sqlite file name>.spool next to sqlite_path


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """SIGTERM/SIGINT: readiness turns 503 at once, the traffic listener keeps
    accepting for ``delay_s``, then in-flight requests get ``drain_timeout_s``
    to finish (docs/operations.md, graceful shutdown)."""

    delay_s: float = 5.0
    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """Hot reload: SIGHUP always; with ``watch`` the config file, the key
    sources and the policy files are polled every ``interval_s`` as well."""

    watch: bool = True
    interval_s: float = 1.0


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
    websocket: bool = False  # an Upgrade to WebSocket is the only request it accepts

    @property
    def reads_body(self) -> bool:
        return any(a.source == "body" for a in self.attributes)


@dataclass(frozen=True, slots=True)
class DecisionsConfig:
    """The decision listener's front doors (docs/decision-api.md).

    ``tools`` maps every tool a decision door may be asked about to the route
    whose settings decide it: the first route naming the tool, or a
    ``decisions.tools`` entry (no path of its own). ``trusted_callers`` are
    principal ids whose ``/verify`` bodies may assert role, subject and context.
    """

    trusted_callers: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()  # roles a /verify body may name (empty: any)
    tools: Mapping[str, RouteConfig] = field(default_factory=lambda: MappingProxyType({}))
    max_body_bytes: int = 65_536


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
    budgets: tuple[BudgetRule, ...]
    redis: RedisConfig
    policy: PolicyConfig
    audit: AuditConfig
    routes: tuple[RouteConfig, ...]
    passthrough: tuple[str, ...]
    enforce_default: bool
    table: RouteTable[RouteConfig] = field(compare=False, repr=False)
    digest: str = ""
    shutdown: ShutdownConfig = ShutdownConfig()
    reload: ReloadConfig = ReloadConfig()
    decisions_listener: Listener | None = None
    decisions: DecisionsConfig = DecisionsConfig()
    approvals: ApprovalsConfig | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    mode_state_path: Path | None = None  # mode.state_path (None only in hand-built configs)
    mcp: tuple[McpEndpoint, ...] = ()  # MCP endpoints on the traffic listener (docs/mcp.md)

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
             "budgets", "redis", "policy", "audit", "routes", "unmatched", "defaults",
             "shutdown", "reload", "decisions", "approvals", "telemetry", "mcp"}
_ROUTE_KEYS = {"method", "path", "tool", "effect", "attributes", "required", "enforce",
               "fail_mode", "allow_in_kill_switch", "resource_tenant", "websocket"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
_TARGET = re.compile(r"^(subject|args|context)\.[A-Za-z_][A-Za-z0-9_]*$")
_PRINCIPAL_FIELDS = {"id", "role", "tenant"}


def spool_dir_for(sqlite_path: Path) -> Path:
    """The default audit spool of an audit file: one per file (a chain id is unique
    only within its store), beside it."""
    return sqlite_path.parent / f"{sqlite_path.name}.spool"


def rego_files(directory: Path) -> list[Path]:
    """The ``.rego`` files under ``directory``, sorted, skipping hidden entries.

    A Kubernetes ConfigMap volume holds its files twice: as symlinks at the
    top and inside a hidden ``..<timestamp>`` directory; only the first count.
    """
    return sorted(p for p in directory.rglob("*.rego")
                  if not any(part.startswith(".") for part in p.relative_to(directory).parts))


def load_config(path: str | Path, env: Environment) -> Config:
    """Read, expand and validate ``path``; raise :class:`ConfigError` on any problem."""
    src = Path(path)
    file = str(src)
    try:
        raw = src.read_bytes()  # read once: parsed and hashed from the same bytes
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}",
                          "pass an existing file with -c/--config or CASF_CONFIG") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", "not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from exc
    r = _Reader(file, env)
    top = r.mapping(data, "")
    r.known(top, "", _TOP_KEYS)
    base = src.resolve().parent
    return _build(r, top, src, base, env, raw)


def _build(r: _Reader, top: Mapping[str, Any], src: Path, base: Path,
           env: Environment, config_bytes: bytes) -> Config:
    listen = r.mapping(top.get("listen"), "listen")
    r.known(listen, "listen", {"traffic", "admin", "decisions"})
    traffic = r.listener(listen, "traffic", "0.0.0.0:8080")
    admin = r.listener(listen, "admin", "0.0.0.0:9901")
    decisions_listener = (r.listener(listen, "decisions", "")
                          if listen.get("decisions") not in (None, "") else None)

    up = r.mapping(top.get("upstream"), "upstream")
    r.known(up, "upstream", {"url", "connect_timeout_ms", "timeout_ms", "read_timeout_ms",
                             "pool_size", "pool_timeout_ms", "forward_credentials"})
    url = r.string(up, "url", "upstream")
    if not re.match(r"^https?://[^/]+", url):
        r.fail("upstream.url", f"{redact_url(url)!r} is not an http(s) URL",
               "e.g. http://127.0.0.1:3000")
    upstream = UpstreamConfig(
        url=url.rstrip("/"),
        connect_timeout_s=r.number(up, "connect_timeout_ms", "upstream", 1000, 1) / 1000,
        timeout_s=r.number(up, "timeout_ms", "upstream", 10_000, 1) / 1000,
        read_timeout_s=r.number(up, "read_timeout_ms", "upstream", 60_000, 1) / 1000,
        pool_size=r.integer(up, "pool_size", "upstream", 100, 1),
        # default: as long as the upstream may take to answer (a burst larger than
        # the pool waits, it is not refused)
        pool_timeout_s=r.number(up, "pool_timeout_ms", "upstream",
                                r.number(up, "timeout_ms", "upstream", 10_000, 1), 1) / 1000,
        forward_credentials=r.boolean(up, "forward_credentials", "upstream", False),
    )

    lim = r.mapping(top.get("limits"), "limits")
    r.known(lim, "limits", {"max_body_bytes", "body_read_timeout_ms", "header_timeout_ms",
                            "websocket_max_message_bytes", "websocket_idle_timeout_ms",
                            "websocket_max_duration_ms"})
    limits = LimitsConfig(
        max_body_bytes=r.integer(lim, "max_body_bytes", "limits", 1_048_576, 0),
        body_read_timeout_s=r.number(lim, "body_read_timeout_ms", "limits", 10_000, 1) / 1000,
        header_timeout_s=r.number(lim, "header_timeout_ms", "limits", 10_000, 1) / 1000,
        websocket_max_message_bytes=r.integer(lim, "websocket_max_message_bytes", "limits",
                                              1_048_576, 1),
        websocket_idle_timeout_s=r.number(lim, "websocket_idle_timeout_ms", "limits",
                                          300_000, 1) / 1000,
        websocket_max_duration_s=r.number(lim, "websocket_max_duration_ms", "limits",
                                          3_600_000, 1) / 1000,
    )

    identity = _identity(r, r.mapping(top.get("identity"), "identity"), base, env)

    mode_m = r.mapping(top.get("mode"), "mode")
    r.known(mode_m, "mode", {"default", "state_path"})
    mode_text = r.string(mode_m, "default", "mode", "ALLOW")
    if mode_text not in Mode.__members__:
        r.fail("mode.default", f"{mode_text!r} is not a mode", "one of: " + ", ".join(Mode))
    mode_default = Mode(mode_text)
    # where a mode set while Redis is unreachable is kept (docs/state.md); default:
    # casf-mode.json next to the embedded audit file, resolved below
    mode_state = r.opt_string(mode_m, "state_path", "mode")
    mode_state_path = None if mode_state is None else (
        Path(mode_state) if Path(mode_state).is_absolute() else base / mode_state)

    rp = r.mapping(top.get("replay"), "replay")
    r.known(rp, "replay", {"request_id_headers", "ttl_seconds", "max_stored_body_bytes",
                           "lease_seconds", "memory_max_mb"})
    headers = tuple(str(h) for h in r.seq(rp, "request_id_headers", "replay")) or (
        "Idempotency-Key", "X-Request-Id")
    lease = rp.get("lease_seconds")
    replay = ReplayConfig(
        request_id_headers=headers,
        ttl_s=r.number(rp, "ttl_seconds", "replay", 86_400, 1),
        max_stored_body_bytes=r.integer(rp, "max_stored_body_bytes", "replay", 65_536, 0),
        lease_s=None if lease is None else r.number(rp, "lease_seconds", "replay", 15, 1),
        memory_max_bytes=int(r.number(rp, "memory_max_mb", "replay", 16, 1) * (1 << 20)),
    )

    rules: list[RateLimitRule] = []
    for i, raw in enumerate(r.seq(top, "rate_limits", "")):
        p = f"rate_limits[{i}]"
        m = r.mapping(raw, p)
        r.known(m, p, {"name", "tools", "key", "limit", "window_seconds", "cost", "reason"})
        reason = m.get("reason")
        if reason is not None and not (isinstance(reason, str)
                                       and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", reason)):
            r.fail(f"{p}.reason", f"{reason!r} is not a reason code",
                   "letters, digits and _, e.g. Inv_NoSmsBurst")
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
            limit=r.integer(m, "limit", p, 0, 1) if "limit" in m else r.fail(
                f"{p}.limit", "is required", "the number of requests allowed per window"),
            window_s=r.number(m, "window_seconds", p, 0, 0.001) if "window_seconds" in m
            else r.fail(f"{p}.window_seconds", "is required", "the window length in seconds"),
            cost=r.integer(m, "cost", p, 1, 1), reason=reason))

    budgets = tuple(_budget(r, i, raw) for i, raw in enumerate(r.seq(top, "budgets", "")))
    names = [b.name for b in budgets] + [rule.name for rule in rules]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        r.fail("budgets" if dup in {b.name for b in budgets} else "rate_limits",
               f"the name {dup!r} is used twice", "give every rate limit and budget its own name")

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
                          "timeout_ms", "redact", "queue_max", "spool_dir"})
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
        chain_id=(r.string(au, "chain_id", "audit") if au.get("chain_id")
                  else env.get("HOSTNAME") or "casf-0"),
        batch_max=r.integer(au, "batch_max", "audit", 256, 1),
        batch_wait_s=r.number(au, "batch_wait_ms", "audit", 0, 0) / 1000,
        timeout_s=r.number(au, "timeout_ms", "audit", 2000, 1) / 1000,
        redact=redact,
        chain_id_set=bool(au.get("chain_id")),
        queue_max=r.integer(au, "queue_max", "audit", 10_000, 1),
        spool_dir=(base / r.string(au, "spool_dir", "audit") if au.get("spool_dir")
                   else spool_dir_for(base / sqlite_path)),
    )

    defaults = r.mapping(top.get("defaults"), "defaults")
    r.known(defaults, "defaults", {"enforce"})
    enforce_default = r.boolean(defaults, "enforce", "defaults", True)

    routes = tuple(_route(r, i, raw, enforce_default, identity.credential_headers)
                   for i, raw in enumerate(r.seq(top, "routes", "")))
    mcp = _mcp(r, top.get("mcp"), routes)
    if not routes and not mcp:
        r.fail("routes", "no routes are configured",
               "map at least one method + path to a tool (or an MCP endpoint under mcp)")
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
        for rt in routes:
            if passthrough_covers(text, Template.parse(rt.path)):
                r.fail(f"unmatched.passthrough[{i}]",
                       f"{text!r} covers routes[{rt.index}] ({rt.method} {rt.path}): every "
                       "other method on that path would be forwarded unauthenticated",
                       "remove the entry, or narrow it so that no route's path falls under it "
                       "(serve public files from a prefix of their own, e.g. /static/)")
        passthrough.append(text)
    _mcp_paths(r, mcp, table, passthrough)

    sd = r.mapping(top.get("shutdown"), "shutdown")
    r.known(sd, "shutdown", {"delay_ms", "drain_timeout_ms"})
    shutdown = ShutdownConfig(
        delay_s=r.number(sd, "delay_ms", "shutdown", 5000, 0) / 1000,
        drain_timeout_s=r.number(sd, "drain_timeout_ms", "shutdown", 10_000, 0) / 1000,
    )
    rl = r.mapping(top.get("reload"), "reload")
    r.known(rl, "reload", {"watch", "interval_ms"})
    reload = ReloadConfig(
        watch=r.boolean(rl, "watch", "reload", True),
        interval_s=r.number(rl, "interval_ms", "reload", 1000, 50) / 1000,
    )

    decisions = _decisions(r, top.get("decisions"), routes, enforce_default)
    try:
        approvals = parse_approvals(top.get("approvals"), "approvals", expand=r.expand)
    except ApprovalsConfigError as exc:
        r.fail(exc.path, exc.problem)
    telemetry = _telemetry(r, top.get("telemetry"), r.env.otel_exporter_otlp_endpoint)

    if mcp:  # the policy engine must define every list_query document (checked when it loads)
        policy = replace(policy, documents=tuple(sorted({ep.list_query for ep in mcp
                                                          if ep.list_query})))
    digest = _config_hash(config_bytes, policy.policy_hash, identity)
    return Config(
        source=src, traffic=traffic, admin=admin, upstream=upstream, limits=limits,
        identity=identity, mode_default=mode_default, replay=replay,
        rate_limits=tuple(rules), budgets=budgets, redis=redis_cfg, policy=policy, audit=audit,
        routes=routes,
        passthrough=tuple(passthrough), enforce_default=enforce_default, table=table,
        digest=digest, shutdown=shutdown, reload=reload,
        decisions_listener=decisions_listener, decisions=decisions, approvals=approvals,
        telemetry=telemetry,
        mode_state_path=mode_state_path or audit.sqlite_path.parent / "casf-mode.json",
        mcp=mcp,
    )


def _config_hash(config: bytes, policy_hash: str, identity: IdentityConfig) -> str:
    """sha256 over the config file and every file it names (keys, JWKS, policies).

    The policy files enter through ``policy_hash`` (over the bytes compiled);
    the key and JWKS files are hashed as they are now (a key rotation that
    rewrites them changes the hash, as it changes what is in force).
    """
    h = hashlib.sha256()

    def part(label: bytes, body: bytes) -> None:
        h.update(len(label).to_bytes(8, "big") + label + len(body).to_bytes(8, "big") + body)

    part(b"config", config)
    part(b"policy", policy_hash.encode())
    named: list[Path] = []
    ak = identity.api_keys
    if ak is not None:
        if ak.keys_file is not None:
            named.append(ak.keys_file)
        if ak.keys_dir is not None:
            with contextlib.suppress(OSError):
                named.extend(sorted(p for p in ak.keys_dir.iterdir()
                                    if p.is_file() and not p.name.startswith(".")))
    if identity.jwt is not None and identity.jwt.jwks_file is not None:
        named.append(identity.jwt.jwks_file)
    for path in named:
        try:
            part(str(path).encode(), path.read_bytes())
        except OSError:
            part(str(path).encode(), b"<unreadable>")
    return h.hexdigest()


def _telemetry(r: _Reader, raw: Any, env_endpoint: str | None) -> TelemetryConfig:
    """``telemetry:`` (OpenTelemetry traces); the env endpoint applies when the key is absent."""
    m = r.mapping(raw, "telemetry")
    r.known(m, "telemetry", {"otlp_endpoint", "service_name", "headers", "sample_ratio",
                             "max_queue_size", "max_export_batch_size", "schedule_delay_ms",
                             "export_timeout_ms", "shutdown_timeout_ms"})
    endpoint = r.opt_string(m, "otlp_endpoint", "telemetry") if "otlp_endpoint" in m \
        else env_endpoint
    hm = r.mapping(m.get("headers"), "telemetry.headers")
    headers = {str(k): r.string(hm, k, "telemetry.headers") for k in hm}
    try:
        return TelemetryConfig(
            otlp_endpoint=endpoint or None,
            service_name=r.string(m, "service_name", "telemetry", "casf-proxy"),
            sample_ratio=r.number(m, "sample_ratio", "telemetry", 1.0, 0),
            headers=headers,
            max_queue_size=r.integer(m, "max_queue_size", "telemetry", 2048, 1),
            max_export_batch_size=r.integer(m, "max_export_batch_size", "telemetry", 512, 1),
            schedule_delay_s=r.number(m, "schedule_delay_ms", "telemetry", 1000, 1) / 1000,
            export_timeout_s=r.number(m, "export_timeout_ms", "telemetry", 5000, 1) / 1000,
            shutdown_timeout_s=r.number(m, "shutdown_timeout_ms", "telemetry", 5000, 1) / 1000)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        r.fail(key, redact_url(problem))


def _mcp(r: _Reader, raw: Any, routes: tuple[RouteConfig, ...]) -> tuple[McpEndpoint, ...]:
    """The ``mcp:`` section (docs/mcp.md). A tool a route also maps must have the
    route's effect: the policy sees the same tool either way."""
    from proxy.mcp.config import McpConfigError, parse_mcp

    try:
        endpoints = parse_mcp(raw, "mcp", expand=r.expand)
    except McpConfigError as exc:
        raise ConfigError(r.file, exc.path, exc.problem, exc.fix) from None
    effects = {rt.tool: (rt.effect, rt.index) for rt in reversed(routes)}
    for ep in endpoints:
        for name, tool in ep.tools.items():
            known = effects.get(tool.tool)
            if known is not None and known[0] != tool.effect:
                r.fail(f"mcp[{ep.index}].tools.{name}.effect",
                       f"{tool.tool} is a {known[0]} in routes[{known[1]}]",
                       f"effect: {known[0]}, so that both are decided alike")
    return endpoints


def _mcp_paths(r: _Reader, mcp: tuple[McpEndpoint, ...], table: RouteTable[RouteConfig],
               passthrough: list[str]) -> None:
    """An MCP endpoint's path belongs to it alone: no route, no passthrough prefix."""
    for ep in mcp:
        p = f"mcp[{ep.index}].path"
        for method in sorted(table.methods()):
            match = table.match(method, ep.path)
            if match is not None:
                r.fail(p, f"{ep.path!r} is also the path of routes[{match.value.index}] "
                       f"({method} {match.value.path})",
                       "give the MCP endpoint a path of its own")
        for prefix in passthrough:
            if ep.path == prefix or (prefix.endswith("/") and ep.path.startswith(prefix)):
                r.fail(p, f"{ep.path!r} falls under unmatched.passthrough {prefix!r}",
                       "give the MCP endpoint a path outside the passthrough prefixes")


def _decisions(r: _Reader, raw: Any, routes: tuple[RouteConfig, ...],
               enforce_default: bool) -> DecisionsConfig:
    m = r.mapping(raw, "decisions")
    r.known(m, "decisions", {"verify", "tools", "max_body_bytes"})
    vm = r.mapping(m.get("verify"), "decisions.verify")
    r.known(vm, "decisions.verify", {"trusted_callers", "roles"})
    trusted = frozenset(str(c) for c in r.seq(vm, "trusted_callers", "decisions.verify"))
    roles = frozenset(str(c) for c in r.seq(vm, "roles", "decisions.verify"))
    tools: dict[str, RouteConfig] = {}
    for route in routes:
        tools.setdefault(route.tool, route)
    tm = r.mapping(m.get("tools"), "decisions.tools")
    for i, (name, spec) in enumerate(tm.items()):
        p = f"decisions.tools.{name}"
        if name in tools:
            r.fail(p, f"the tool {name!r} is already a route's tool",
                   "decision doors decide it with that route's settings; remove the entry")
        sm = r.mapping(spec, p)
        r.known(sm, p, {"effect", "required", "fail_mode", "enforce", "allow_in_kill_switch"})
        effect = r.string(sm, "effect", p)
        if effect not in ("read", "write"):
            r.fail(f"{p}.effect", f"{effect!r} is not an effect", "read or write")
        required = tuple(str(x) for x in r.seq(sm, "required", p))
        for j, req in enumerate(required):
            if not _TARGET.match(req):
                r.fail(f"{p}.required[{j}]", f"{req!r} is not subject.X, args.X or context.X")
        fail_mode = r.string(sm, "fail_mode", p, "closed" if effect == "write" else "open")
        if fail_mode not in ("open", "closed"):
            r.fail(f"{p}.fail_mode", f"{fail_mode!r}", "open or closed")
        tools[str(name)] = RouteConfig(
            index=-1 - i, method="POST", path="", tool=str(name),
            effect=effect,  # type: ignore[arg-type]
            attributes=(), required=required,
            enforce=r.boolean(sm, "enforce", p, enforce_default),
            fail_mode=fail_mode,  # type: ignore[arg-type]
            allow_in_kill_switch=r.boolean(sm, "allow_in_kill_switch", p, False),
            resource_tenant=None)
    return DecisionsConfig(
        trusted_callers=trusted, roles=roles, tools=MappingProxyType(tools),
        max_body_bytes=r.integer(m, "max_body_bytes", "decisions", 65_536, 1))


def _budget_limits(r: _Reader, m: Mapping[str, Any], p: str) -> BudgetLimits:
    r.known(m, p, {"daily", "monthly"})
    daily = r.integer(m, "daily", p, 0, 1) if m.get("daily") is not None else None
    monthly = r.integer(m, "monthly", p, 0, 1) if m.get("monthly") is not None else None
    if daily is None and monthly is None:
        r.fail(p, "sets no quota", "set daily, monthly or both (cost units per period)")
    return BudgetLimits(daily, monthly)


def _budget(r: _Reader, i: int, raw: Any) -> BudgetRule:
    p = f"budgets[{i}]"
    m = r.mapping(raw, p)
    r.known(m, p, {"name", "tools", "cost", "daily", "monthly", "tenants", "warn_at"})
    tools = [str(t) for t in r.seq(m, "tools", p)]
    if not tools:
        r.fail(f"{p}.tools", "is required", "list the tool names whose calls this budget counts")
    cost_raw = m.get("cost", 1)
    costs: dict[str, int] = {}
    if isinstance(cost_raw, dict):
        unknown = set(cost_raw) - set(tools)
        if unknown:
            r.fail(f"{p}.cost.{sorted(unknown)[0]}", "is not one of this budget's tools",
                   "add it to tools or remove it from cost")
        for tool in tools:
            costs[tool] = r.integer(cost_raw, tool, f"{p}.cost", 1, 0)
    else:
        one = r.integer(m, "cost", p, 1, 0)
        costs = dict.fromkeys(tools, one)
    limits = _budget_limits(r, {k: m[k] for k in ("daily", "monthly") if k in m}, p)
    tenants = {str(t): _budget_limits(r, r.mapping(v, f"{p}.tenants.{t}"), f"{p}.tenants.{t}")
               for t, v in r.mapping(m.get("tenants"), f"{p}.tenants").items()}
    warn_at = r.number(m, "warn_at", p, 0.9, 0.0)
    if warn_at > 1:
        r.fail(f"{p}.warn_at", "must be a fraction between 0 and 1", "e.g. 0.9 for 90%")
    return BudgetRule(name=r.string(m, "name", p, f"budget{i}"), costs=MappingProxyType(costs),
                      limits=limits, tenants=MappingProxyType(tenants), warn_at=warn_at)


def credential_header_key(name: str) -> str:
    """A header name as CGI/WSGI upstreams read it: case-folded, ``_`` as ``-``."""
    return name.lower().replace("_", "-")


# request headers that carry credentials whatever the identity section says
_CREDENTIAL_HEADERS = frozenset(credential_header_key(h) for h in (
    "Authorization", "Proxy-Authorization", "Cookie", "X-API-Key"))


def _route(r: _Reader, i: int, raw: Any, enforce_default: bool,
           credentials: frozenset[str] = frozenset()) -> RouteConfig:
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
        if source == "header" and credential_header_key(name) in (
                _CREDENTIAL_HEADERS | credentials):
            r.fail(f"{ap}.name", f"header {name!r} carries a credential: its value would be "
                   "in the policy input and in the audit record's attrs",
                   "read who the caller is with {from: principal, name: id|role|tenant}; "
                   "a credential is never an attribute, redacted or not")
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
    websocket = r.boolean(m, "websocket", p, False)
    if websocket and method != "GET":
        r.fail(f"{p}.method", f"a websocket route is opened with GET, not {method}",
               "method: GET")
    if websocket and any(a.source == "body" for a in attrs):
        r.fail(f"{p}.attributes", "a WebSocket upgrade has no body to read attributes from",
               "take them from the path, query, headers or principal")
    return RouteConfig(
        index=i, method=method, path=path, tool=r.string(m, "tool", p),
        effect=effect,  # type: ignore[arg-type]
        attributes=tuple(attrs), required=required,
        enforce=r.boolean(m, "enforce", p, enforce_default),
        fail_mode=fail_mode,  # type: ignore[arg-type]
        allow_in_kill_switch=r.boolean(m, "allow_in_kill_switch", p, False),
        resource_tenant=resource_tenant, websocket=websocket,
    )


_HS_MIN_SECRET = 32
_JWT_ALGS = frozenset({"RS256", "PS256", "ES256", "EdDSA", "Ed25519", "HS256"})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_CLAIM_PATH = re.compile(r"^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*$")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _identity(r: _Reader, m: Mapping[str, Any], base: Path, env: Environment) -> IdentityConfig:
    r.known(m, "identity", {"order", *AUTH_METHODS})
    api_keys = _api_keys(r, m["api_keys"], base, env) if m.get("api_keys") is not None else None
    jwt = _jwt(r, r.mapping(m["jwt"], "identity.jwt"), base, env) if m.get(
        "jwt") is not None else None
    trusted = _trusted_headers(r, r.mapping(m.get("trusted_headers"), "identity.trusted_headers"))
    configured = {"api_keys": api_keys, "jwt": jwt, "trusted_headers": trusted}
    raw_order = m.get("order")
    if raw_order is None:
        order = tuple(name for name in AUTH_METHODS if configured[name] is not None)
    else:
        if isinstance(raw_order, str):  # "jwt,api_keys": lets ${VAR} choose the methods
            items: list[Any] = [x.strip() for x in r.expand(raw_order, "identity.order")
                                .split(",") if x.strip()]
        elif isinstance(raw_order, list):
            items = raw_order
        else:
            r.fail("identity.order", "expected a list or a comma-separated string",
                   "e.g. [jwt, api_keys]")
        order_list: list[str] = []
        for i, item in enumerate(items):
            name = str(item)
            if name not in AUTH_METHODS:
                r.fail(f"identity.order[{i}]", f"{name!r} is not an authenticator",
                       "one of: " + ", ".join(AUTH_METHODS))
            if configured[name] is None:
                r.fail(f"identity.order[{i}]", f"{name!r} is not configured",
                       f"configure identity.{name} or remove it from identity.order")
            if name in order_list:
                r.fail(f"identity.order[{i}]", f"{name!r} is listed twice")
            order_list.append(name)
        order = tuple(order_list)
    if not order:
        r.fail("identity", "no authenticator is configured",
               "configure identity.api_keys, identity.jwt or identity.trusted_headers")
    # every configured method's headers, enabled by identity.order or not
    credentials = [*([api_keys.header] if api_keys is not None else ()),
                   *([jwt.header] if jwt is not None else ()),
                   *((trusted.actor_header, trusted.role_header, trusted.tenant_header)
                     if trusted is not None else ())]
    return IdentityConfig(api_keys=api_keys if "api_keys" in order else None,
                          jwt=jwt if "jwt" in order else None,
                          trusted_headers=trusted if "trusted_headers" in order else None,
                          order=order,
                          credential_headers=frozenset(credential_header_key(h)
                                                       for h in credentials))


def _header_name(r: _Reader, m: Mapping[str, Any], key: str, path: str, default: str) -> str:
    name = r.string(m, key, path, default)
    if not _HEADER_NAME.match(name):
        r.fail(f"{path}.{key}", f"{name!r} is not an HTTP header name")
    return name


def _api_keys(r: _Reader, raw: Any, base: Path, env: Environment) -> ApiKeysConfig:
    p = "identity.api_keys"
    akm = r.mapping(raw, p)
    r.known(akm, p, {"header", "keys_file", "keys_dir", "reload_interval_ms"})
    header = _header_name(r, akm, "header", p, "X-API-Key")
    keys_file = keys_dir = None
    if akm.get("keys_file") is not None:
        keys_file = Path(r.string(akm, "keys_file", p))
        keys_file = keys_file if keys_file.is_absolute() else base / keys_file
    if akm.get("keys_dir") is not None:
        keys_dir = Path(r.string(akm, "keys_dir", p))
        keys_dir = keys_dir if keys_dir.is_absolute() else base / keys_dir
        if not keys_dir.is_dir():
            r.fail(f"{p}.keys_dir", f"{keys_dir} is not a directory",
                   "point it at the mounted Secret (one file per key id)")
    if keys_file is None and keys_dir is None:
        r.fail(p, "names no key source", "set keys_file, keys_dir or both")
    cfg = ApiKeysConfig(header=header, keys_file=keys_file, keys=(), keys_dir=keys_dir,
                        reload_interval_s=r.number(akm, "reload_interval_ms", p, 1000, 100)
                        / 1000)
    return ApiKeysConfig(header=cfg.header, keys_file=keys_file, keys=load_api_keys(cfg, env),
                         keys_dir=keys_dir, reload_interval_s=cfg.reload_interval_s)


def _str_list(r: _Reader, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    v = m.get(key)
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    out: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            r.fail(f"{path}.{key}[{i}]", f"expected a string, got {type(item).__name__}")
        text = r.expand(str(item), f"{path}.{key}")
        if not text:
            r.fail(f"{path}.{key}[{i}]", "is empty")
        out.append(text)
    return tuple(out)


def _jwt(r: _Reader, m: Mapping[str, Any], base: Path, env: Environment) -> JwtConfig:
    p = "identity.jwt"
    r.known(m, p, {"header", "issuer", "audience", "algorithms", "leeway_seconds", "jwks_file",
                   "jwks_url", "allow_http", "jwks_timeout_ms", "jwks_refresh_seconds",
                   "jwks_min_refresh_seconds", "hs256_secret_env", "hs256_kid", "claims",
                   "require_tenant", "cache_size", "max_token_bytes"})
    issuers = _str_list(r, m, "issuer", p)
    if not issuers:
        r.fail(f"{p}.issuer", "is required", "the identity provider's iss value (or a list)")
    audiences = _str_list(r, m, "audience", p)
    if not audiences:
        r.fail(f"{p}.audience", "is required", "the aud value tokens for this API carry")
    algs = set(_str_list(r, m, "algorithms", p) or ("RS256", "PS256", "ES256", "EdDSA"))
    for alg in sorted(algs):
        if alg not in _JWT_ALGS:
            r.fail(f"{p}.algorithms", f"{alg!r} is not supported",
                   "choose from RS256, PS256, ES256, EdDSA (HS256 via hs256_secret_env)")
    if "EdDSA" in algs or "Ed25519" in algs:
        algs |= {"EdDSA", "Ed25519"}  # RFC 9864's name for the same Ed25519 signature
    secret: bytes | None = None
    secret_env = r.opt_string(m, "hs256_secret_env", p)
    if secret_env is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", secret_env):
            r.fail(f"{p}.hs256_secret_env", f"{secret_env!r} is not an environment variable name",
                   "name the variable holding the secret, e.g. CASF_JWT_HS256_SECRET")
        value = env.get(secret_env)
        if value is None:
            r.fail(f"{p}.hs256_secret_env", f"environment variable {secret_env} is not set",
                   f"export {secret_env} with a random secret of at least {_HS_MIN_SECRET} bytes")
        secret = value.encode()
        if len(secret) < _HS_MIN_SECRET:
            r.fail(f"{p}.hs256_secret_env",
                   f"the secret in {secret_env} is shorter than {_HS_MIN_SECRET} bytes",
                   "use e.g. `openssl rand -base64 48`")
        algs.add("HS256")
    elif "HS256" in algs:
        r.fail(f"{p}.algorithms", "HS256 needs a shared secret",
               "set identity.jwt.hs256_secret_env to the variable holding it")
    jwks_file: Path | None = None
    if m.get("jwks_file") is not None:
        jwks_file = Path(r.string(m, "jwks_file", p))
        jwks_file = jwks_file if jwks_file.is_absolute() else base / jwks_file
        if not jwks_file.is_file():
            r.fail(f"{p}.jwks_file", f"{jwks_file} is not a file",
                   "point it at a JSON Web Key Set ({\"keys\": [...]})")
    jwks_url = r.opt_string(m, "jwks_url", p)
    if jwks_url is not None:
        _no_userinfo(r, jwks_url, f"{p}.jwks_url")
        m_url = re.match(r"^(https?)://(\[[^\]]+\]|[^/:]+)(:\d+)?(/|$)", jwks_url)
        if m_url is None:
            r.fail(f"{p}.jwks_url", f"{redact_url(jwks_url)!r} is not an http(s) URL",
                   "e.g. https://idp.example.com/.well-known/jwks.json")
        host = m_url.group(2).strip("[]")
        loopback = host == "localhost" or host.startswith("127.") or host == "::1"
        if m_url.group(1) == "http" and not loopback and not r.boolean(m, "allow_http", p, False):
            r.fail(f"{p}.jwks_url", "plain http lets the network substitute signing keys",
                   "use https, or set identity.jwt.allow_http: true for a trusted network")
    if jwks_file is not None and jwks_url is not None:
        r.fail(p, "jwks_file and jwks_url are both set", "use one key set source")
    if jwks_file is None and jwks_url is None and secret is None:
        r.fail(p, "has no verification key", "set jwks_url, jwks_file or hs256_secret_env")
    cm = r.mapping(m.get("claims"), f"{p}.claims")
    r.known(cm, f"{p}.claims", {"actor", "role", "tenant"})
    names: dict[str, str] = {}
    for key, default in (("actor", "sub"), ("role", "role"), ("tenant", "tenant")):
        names[key] = r.string(cm, key, f"{p}.claims", default)
        if not _CLAIM_PATH.match(names[key]):
            r.fail(f"{p}.claims.{key}", f"{names[key]!r} is not a claim name",
                   "a claim name, or a dotted path such as realm_access.role")
    hs256_kid = r.opt_string(m, "hs256_kid", p)
    if hs256_kid is not None and secret is None:
        r.fail(f"{p}.hs256_kid", "is set without hs256_secret_env")
    return JwtConfig(
        issuers=issuers, audiences=audiences, algorithms=frozenset(algs),
        header=_header_name(r, m, "header", p, "Authorization"),
        leeway_s=r.number(m, "leeway_seconds", p, 30, 0),
        jwks_file=jwks_file, jwks_url=jwks_url,
        jwks_timeout_s=r.number(m, "jwks_timeout_ms", p, 2000, 10) / 1000,
        jwks_refresh_s=r.number(m, "jwks_refresh_seconds", p, 300, 1),
        jwks_min_refresh_s=r.number(m, "jwks_min_refresh_seconds", p, 10, 0),
        hs256_secret=secret, hs256_kid=hs256_kid,
        claims=JwtClaimNames(names["actor"], names["role"], names["tenant"]),
        require_tenant=r.boolean(m, "require_tenant", p, False),
        cache_size=r.integer(m, "cache_size", p, 10_000, 0),
        max_token_bytes=r.integer(m, "max_token_bytes", p, 8192, 256),
    )


def _trusted_headers(r: _Reader, m: Mapping[str, Any]) -> TrustedHeadersConfig | None:
    p = "identity.trusted_headers"
    r.known(m, p, {"enabled", "sources", "headers"})
    if not r.boolean(m, "enabled", p, False):
        return None
    nets: list[IPv4Network | IPv6Network] = []
    for i, text in enumerate(_str_list(r, m, "sources", p)):
        try:
            net = ip_network(text, strict=False)
        except ValueError:
            r.fail(f"{p}.sources[{i}]", f"{text!r} is not an IP network", "e.g. 127.0.0.1/32")
        if net.prefixlen == 0:
            r.fail(f"{p}.sources[{i}]", f"{text} would trust every address",
                   "name the networks of the component that authenticates callers")
        nets.append(net)
    if not nets:
        r.fail(f"{p}.sources", "is required when enabled",
               "list the source networks allowed to assert identity, e.g. [127.0.0.1/32]")
    hm = r.mapping(m.get("headers"), f"{p}.headers")
    r.known(hm, f"{p}.headers", {"actor", "role", "tenant"})
    names = [_header_name(r, hm, key, f"{p}.headers", default) for key, default in
             (("actor", "X-Casf-Actor"), ("role", "X-Casf-Role"), ("tenant", "X-Casf-Tenant"))]
    if len({n.lower() for n in names}) != 3:
        r.fail(f"{p}.headers", "actor, role and tenant must be different headers")
    return TrustedHeadersConfig(tuple(nets), *names)


_MAX_KEY_FILE = 1_048_576


def load_api_keys(cfg: ApiKeysConfig, env: Environment) -> tuple[ApiKeyEntry, ...]:
    """Every key of the keys file and the Secret directory; ids and hashes must be unique."""
    entries: list[ApiKeyEntry] = []
    if cfg.keys_file is not None:
        entries.extend(load_keys(cfg.keys_file, env))
    if cfg.keys_dir is not None:
        entries.extend(load_keys_dir(cfg.keys_dir, env))
    ids: set[str] = set()
    digests: set[str] = set()
    for e in entries:
        where = str(cfg.keys_dir if cfg.keys_dir is not None else cfg.keys_file)
        if e.key_id in ids:
            raise ConfigError(where, e.key_id, "duplicate key id",
                              "every key needs its own id (file name in keys_dir)")
        if e.sha256 in digests:
            raise ConfigError(where, e.key_id, "duplicate key hash",
                              "the same key is listed twice")
        ids.add(e.key_id)
        digests.add(e.sha256)
    return tuple(entries)


def _key_entry(r: _Reader, m: Mapping[str, Any], p: str, key_id: str) -> ApiKeyEntry:
    digest = r.string(m, "sha256", p).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        r.fail(f"{p}.sha256" if p else "sha256", "is not a hex SHA-256 digest",
               "store sha256(key) in hex, never the key itself")
    pp = f"{p}.principal" if p else "principal"
    pm = r.mapping(m.get("principal"), pp)
    r.known(pm, pp, {"id", "role", "tenant"})
    return ApiKeyEntry(key_id=key_id, sha256=digest,
                       principal=PrincipalSpec(r.string(pm, "id", pp), r.string(pm, "role", pp),
                                               r.opt_string(pm, "tenant", pp)))


def load_keys_dir(directory: Path, env: Environment) -> tuple[ApiKeyEntry, ...]:
    """A mounted Secret: one file per key id (the file name), holding ``sha256`` and ``principal``.

    Names starting with ``.`` (Kubernetes' ``..data`` links) are skipped.
    """
    try:
        names = sorted(e.name for e in directory.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise ConfigError(str(directory), "", f"cannot list keys directory: {exc.strerror}",
                          "check identity.api_keys.keys_dir") from exc
    out: list[ApiKeyEntry] = []
    for name in names:
        path = directory / name
        file = str(path)
        if not path.is_file():
            continue
        if not _KEY_ID.match(name):
            raise ConfigError(file, "", f"{name!r} is not a usable key id",
                              "name each file after its key id: letters, digits, . _ -")
        try:
            if path.stat().st_size > _MAX_KEY_FILE:
                raise ConfigError(file, "", "key file is too large")
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(file, "", f"cannot read key file: {exc.strerror}") from exc
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(file, "", f"not valid YAML: {exc}") from exc
        r = _Reader(file, env)
        m = r.mapping(data, "")
        r.known(m, "", {"sha256", "principal"})
        out.append(_key_entry(r, m, "", name))
    return tuple(out)


def load_keys(path: Path, env: Environment) -> tuple[ApiKeyEntry, ...]:
    """Parse a keys file: ``keys: [{id, sha256, principal: {id, role, tenant}}]``."""
    file = str(path)
    try:
        if path.stat().st_size > _MAX_KEY_FILE:
            raise ConfigError(file, "", "keys file is too large")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read keys file: {exc.strerror}",
                          "check identity.api_keys.keys_file") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from exc
    r = _Reader(file, env)
    top = r.mapping(data, "")
    r.known(top, "", {"keys"})
    out: list[ApiKeyEntry] = []
    seen: set[str] = set()
    ids: set[str] = set()
    for i, raw in enumerate(r.seq(top, "keys", "")):
        p = f"keys[{i}]"
        m = r.mapping(raw, p)
        r.known(m, p, {"id", "sha256", "principal"})
        key_id = r.string(m, "id", p)
        if not _KEY_ID.match(key_id):
            r.fail(f"{p}.id", f"{key_id!r} is not a usable key id",
                   "letters, digits, . _ - (at most 128 characters)")
        if key_id in ids:
            r.fail(f"{p}.id", "duplicate key id")
        ids.add(key_id)
        entry = _key_entry(r, m, p, key_id)
        if entry.sha256 in seen:
            r.fail(f"{p}.sha256", "duplicate key hash")
        seen.add(entry.sha256)
        out.append(entry)
    return tuple(out)


def _policy(r: _Reader, m: Mapping[str, Any], base: Path) -> PolicyConfig:
    r.known(m, "policy", {"engine", "bundle", "query", "rego_v0", "opa", "decision_cache_size"})
    engine = r.string(m, "engine", "policy", "regorus")
    if engine not in ("regorus", "opa"):
        r.fail("policy.engine", f"{engine!r} is not supported",
               "regorus (in-process) or opa (an external OPA server, see policy.opa)")
    query = r.string(m, "query", "policy", "data.casf")
    if not re.fullmatch(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+", query):
        r.fail("policy.query", f"{query!r} is not a data reference", "e.g. data.casf")
    opa = _opa(r, r.mapping(m.get("opa"), "policy.opa"), query) if engine == "opa" else None
    if engine != "opa" and m.get("opa") is not None:
        r.fail("policy.opa", "is set but policy.engine is not opa",
               "set policy.engine: opa, or remove policy.opa")
    bundle: Path | None = None
    files: tuple[Path, ...] = ()
    if engine == "regorus" or m.get("bundle") is not None:
        bundle = Path(r.string(m, "bundle", "policy"))
        if not bundle.is_absolute():
            bundle = base / bundle
        if not bundle.is_dir():
            r.fail("policy.bundle", f"{bundle} is not a directory",
                   "point it at the Rego folder")
        files = tuple(p for p in rego_files(bundle) if not p.name.endswith("_test.rego"))
        if not files:
            r.fail("policy.bundle", f"no .rego files in {bundle}")
    h = hashlib.sha256()
    sources: list[tuple[Path, bytes]] = []
    if bundle is not None:
        for f in files:
            rel = f.relative_to(bundle).as_posix().encode()
            try:
                body = f.read_bytes()
            except OSError as exc:
                r.fail("policy.bundle", f"{f}: {exc.strerror}")
            sources.append((f, body))
            h.update(len(rel).to_bytes(8, "big") + rel + len(body).to_bytes(8, "big") + body)
    else:  # OPA without a local copy: the hash names the decision source, not its content
        assert opa is not None
        h.update(f"opa:{opa.url}/v1/data/{opa.path}".encode())
    return PolicyConfig(bundle=bundle, files=files, query=query,
                        rego_v0=r.boolean(m, "rego_v0", "policy", False),
                        policy_hash="sha256:" + h.hexdigest(),
                        engine="opa" if engine == "opa" else "regorus", opa=opa,
                        decision_cache_size=r.integer(m, "decision_cache_size", "policy",
                                                      10_000, 0),
                        sources=tuple(sources))


def _opa(r: _Reader, m: Mapping[str, Any], query: str) -> OpaConfig:
    p = "policy.opa"
    r.known(m, p, {"url", "path", "timeout_ms", "pool_size"})
    url = r.string(m, "url", p)
    _no_userinfo(r, url, f"{p}.url")
    if not re.match(r"^https?://[^/]+/?$", url):
        r.fail(f"{p}.url", f"{redact_url(url)!r} is not an OPA server URL",
               "scheme, host and port only, e.g. http://127.0.0.1:8181")
    path = r.string(m, "path", p, query.removeprefix("data.").replace(".", "/")).strip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*", path):
        r.fail(f"{p}.path", f"{path!r} is not a decision path", "e.g. casf or casf/decision")
    return OpaConfig(url=url.rstrip("/"), path=path,
                     timeout_s=r.number(m, "timeout_ms", p, 350, 1) / 1000,
                     pool_size=r.integer(m, "pool_size", p, 32, 1))


def _no_userinfo(r: _Reader, url: str, path: str) -> None:
    """Refuse ``user:password@`` in a dependency URL: URLs are written to log lines."""
    if redact_url(url) != url:
        r.fail(path, "contains credentials (user:password@ before the host), which would "
               "be written to the logs", "remove them from the URL; casf-proxy sends this "
               "server no credentials, so if it needs some, have them added as a header "
               "from a secret (e.g. by a mesh sidecar or an mTLS proxy)")
