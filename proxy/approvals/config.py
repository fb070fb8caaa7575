"""The ``approvals:`` config section, validated into a frozen model.

Errors name the key path (``approvals.pending_ttl_seconds: must be a positive
integer``). String values may hold ``${VAR}`` / ``${VAR:-default}``: the
config loader passes its expander, and numbers or booleans written that way
are read after expansion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Expand = Callable[[str, str], str]  # (value, key path) -> expanded value


class ApprovalsConfigError(ValueError):
    """A problem in the ``approvals`` section; ``path`` is the key, ``problem`` the text."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """Webhook for new approvals; ``webhook_url`` None means off."""

    webhook_url: str | None = None
    timeout_ms: int = 2000
    retries: int = 3


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The approval console's sign-in session: lifetime and the cookie's ``Secure`` flag."""

    session_ttl_seconds: int = 900
    cookie_secure: bool = True


@dataclass(frozen=True, slots=True)
class ApprovalsConfig:
    """Human approval of NEEDS_APPROVAL requests (docs/approvals.md).

    ``approver_roles``: the roles that may approve or deny. ``four_eyes``:
    nobody decides their own request. A pending approval expires
    ``pending_ttl_seconds`` after it was created; an approved one must be
    used within ``approved_ttl_seconds`` of its approval.
    """

    approver_roles: tuple[str, ...]
    four_eyes: bool = True
    pending_ttl_seconds: int = 900
    approved_ttl_seconds: int = 900
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)


def _no_expand(value: str, path: str) -> str:
    return value


class _Reader:
    def __init__(self, expand: Expand) -> None:
        self.expand = expand

    def mapping(self, raw: object, path: str, keys: set[str]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ApprovalsConfigError(path, f"expected a mapping, got {type(raw).__name__}")
        for k in raw:
            if k not in keys:
                raise ApprovalsConfigError(f"{path}.{k}", "unknown key (one of: "
                                           + ", ".join(sorted(keys)) + ")")
        return raw

    def positive(self, m: Mapping[str, Any], key: str, path: str, default: int,
                 minimum: int = 1) -> int:
        p = f"{path}.{key}"
        v = m.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            text = self.expand(v, p).strip()
            v = int(text) if text.isdigit() else text
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ApprovalsConfigError(p, f"must be {what}")
        return v

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        p = f"{path}.{key}"
        v = m.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            text = self.expand(v, p).strip().lower()
            if text in ("true", "yes", "1"):
                return True
            if text in ("false", "no", "0"):
                return False
        if not isinstance(v, bool):
            raise ApprovalsConfigError(p, "must be true or false")
        return v


def parse_approvals(raw: object, path: str = "approvals", *,
                    expand: Expand = _no_expand) -> ApprovalsConfig | None:
    """The validated section, or None when it is absent (approvals off)."""
    if raw is None:
        return None
    r = _Reader(expand)
    m = r.mapping(raw, path, {"approver_roles", "four_eyes", "pending_ttl_seconds",
                              "approved_ttl_seconds", "notify", "console"})
    roles = m.get("approver_roles")
    if not isinstance(roles, list) or not roles:
        raise ApprovalsConfigError(f"{path}.approver_roles",
                                   "must be a non-empty list of role names")
    out_roles: list[str] = []
    for i, role in enumerate(roles):
        if not isinstance(role, str) or not role.strip():
            raise ApprovalsConfigError(f"{path}.approver_roles[{i}]", "must be a role name")
        out_roles.append(expand(role, f"{path}.approver_roles[{i}]").strip())
    notify_m = r.mapping(m.get("notify"), f"{path}.notify", {"webhook_url", "timeout_ms",
                                                             "retries"})
    url_raw = notify_m.get("webhook_url")
    if url_raw is not None and not isinstance(url_raw, str):
        raise ApprovalsConfigError(f"{path}.notify.webhook_url", "must be a URL string")
    url = expand(url_raw, f"{path}.notify.webhook_url").strip() if url_raw else ""
    if url and not url.startswith(("http://", "https://")):
        raise ApprovalsConfigError(f"{path}.notify.webhook_url",
                                   "must be an http:// or https:// URL (or empty: off)")
    notify = NotifyConfig(
        webhook_url=url or None,
        timeout_ms=r.positive(notify_m, "timeout_ms", f"{path}.notify", 2000),
        retries=r.positive(notify_m, "retries", f"{path}.notify", 3, minimum=0))
    if notify.retries > 10:
        raise ApprovalsConfigError(f"{path}.notify.retries", "must be at most 10")
    console_m = r.mapping(m.get("console"), f"{path}.console",
                          {"session_ttl_seconds", "cookie_secure"})
    console = ConsoleConfig(
        session_ttl_seconds=r.positive(console_m, "session_ttl_seconds", f"{path}.console",
                                       900),
        cookie_secure=r.boolean(console_m, "cookie_secure", f"{path}.console", True))
    return ApprovalsConfig(
        approver_roles=tuple(dict.fromkeys(out_roles)),
        four_eyes=r.boolean(m, "four_eyes", path, True),
        pending_ttl_seconds=r.positive(m, "pending_ttl_seconds", path, 900),
        approved_ttl_seconds=r.positive(m, "approved_ttl_seconds", path, 900),
        notify=notify, console=console)
