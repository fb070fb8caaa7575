"""Approvals as plain data, and the rules of their transitions (pure: no I/O, no clock).

An approval moves ``pending`` → ``approved`` | ``denied`` | ``expired`` and
``approved`` → ``used`` | ``expired``; ``denied``, ``expired`` and ``used``
are final. Every function that depends on time takes ``now`` (seconds since
the epoch) from its caller.

Who may decide (:func:`check_decider`), in this order:

1. the approver's role must be one of ``approver_roles`` (else
   :class:`NotApprover`, 403);
2. the approval must be in the approver's tenant (else :class:`NotFound`,
   exactly what an unknown id gives: nobody learns that another tenant's
   approval exists);
3. with four eyes, the approver must not be the caller who asked (else
   :class:`SelfApproval`, 403);
4. the approval must still be pending and unexpired (else
   :class:`NotPending`, 409).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

ID_PREFIX = "apr_"
_ID_TOKEN_BYTES = 24  # 192 random bits
_ID_RE = re.compile(r"^apr_[A-Za-z0-9_-]{32}$")
MAX_COMMENT = 500


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"


LIVE = (Status.PENDING, Status.APPROVED)  # the states that can still expire


class ApprovalError(Exception):
    """A refused approver action; the API maps each subclass to its status."""


class NotFound(ApprovalError):
    """Unknown id, or an approval of another tenant (indistinguishable on purpose)."""


class NotApprover(ApprovalError):
    """The principal's role is not one of ``approver_roles``."""


class SelfApproval(ApprovalError):
    """Four eyes: the approver is the caller who asked."""


class NotPending(ApprovalError):
    """The approval is approved, denied, expired or used already."""


def new_id() -> str:
    """``apr_`` and 192 random bits, URL-safe base64 (32 characters)."""
    return ID_PREFIX + secrets.token_urlsafe(_ID_TOKEN_BYTES)


def valid_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as RFC 3339 UTC (``2026-12-01T20:00:00Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Details:
    """What the request that needs approval was, as the decision core knows it.

    ``attrs`` are the policy input's attributes *after redaction* (as in its
    audit record); the store keeps them for the approver to see. ``via`` is
    the front door the request came through.
    """

    tool: str
    effect: str
    method: str
    route: str
    caller: str
    caller_role: str
    tenant: str | None
    request_id: str
    reason_codes: tuple[str, ...]
    attrs: Mapping[str, Any]
    body_sha256: str | None
    via: str


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval. ``binding_key`` is the caller-scoped request id key it is bound to,
    ``fingerprint`` the request's replay fingerprint: it covers that request only."""

    id: str
    status: Status
    binding_key: str
    fingerprint: str
    tool: str
    effect: str
    method: str
    route: str
    caller: str
    caller_role: str
    tenant: str | None
    request_id: str
    reason_codes: tuple[str, ...]
    attrs: Mapping[str, Any]
    body_sha256: str | None
    via: str
    created_at: float
    expires_at: float
    approvers: tuple[str, ...] = ()
    approved_at: float | None = None
    decided_by: str | None = None
    comment: str | None = None
    used_at: float | None = None

    # ---------------------------------------------------------------- views

    def envelope_field(self) -> dict[str, Any]:
        """The ``approval`` object of the caller's 403 NEEDS_APPROVAL envelope."""
        return {"id": self.id, "status": self.status.value, "expires_at": iso(self.expires_at)}

    def policy_field(self) -> dict[str, Any]:
        """The policy input's ``approval`` object for an approved retry."""
        return {"id": self.id, "status": self.status.value, "approvers": list(self.approvers),
                "approved_at": iso(self.approved_at)}

    def public(self) -> dict[str, Any]:
        """What an approver of the tenant sees (API and console): no binding key."""
        return {
            "id": self.id, "status": self.status.value, "tool": self.tool,
            "effect": self.effect, "method": self.method, "route": self.route,
            "caller": self.caller, "caller_role": self.caller_role, "tenant": self.tenant,
            "request_id": self.request_id, "reason_codes": list(self.reason_codes),
            "attrs": dict(self.attrs), "body_sha256": self.body_sha256, "via": self.via,
            "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
            "approvers": list(self.approvers), "approved_at": iso(self.approved_at),
            "decided_by": self.decided_by, "comment": self.comment,
            "used_at": iso(self.used_at),
        }

    def to_doc(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (for stores)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["status"] = self.status.value
        d["reason_codes"] = list(self.reason_codes)
        d["approvers"] = list(self.approvers)
        d["attrs"] = dict(self.attrs)
        return d

    @classmethod
    def from_doc(cls, d: Mapping[str, Any]) -> Approval:
        return cls(
            id=str(d["id"]), status=Status(d["status"]), binding_key=str(d["binding_key"]),
            fingerprint=str(d["fingerprint"]), tool=str(d["tool"]), effect=str(d["effect"]),
            method=str(d["method"]), route=str(d["route"]), caller=str(d["caller"]),
            caller_role=str(d["caller_role"]),
            tenant=None if d.get("tenant") is None else str(d["tenant"]),
            request_id=str(d["request_id"]),
            reason_codes=tuple(str(x) for x in d.get("reason_codes") or ()),
            attrs=dict(d.get("attrs") or {}),
            body_sha256=None if d.get("body_sha256") is None else str(d["body_sha256"]),
            via=str(d["via"]), created_at=float(d["created_at"]),
            expires_at=float(d["expires_at"]),
            approvers=tuple(str(x) for x in d.get("approvers") or ()),
            approved_at=_opt_float(d.get("approved_at")),
            decided_by=None if d.get("decided_by") is None else str(d["decided_by"]),
            comment=None if d.get("comment") is None else str(d["comment"]),
            used_at=_opt_float(d.get("used_at")))


def _opt_float(v: Any) -> float | None:
    return None if v is None or v == "" else float(v)


# -------------------------------------------------------------------- transitions


def create(approval_id: str, binding_key: str, fingerprint: str, details: Details,
           now: float, pending_ttl_s: float) -> Approval:
    return Approval(
        id=approval_id, status=Status.PENDING, binding_key=binding_key,
        fingerprint=fingerprint, tool=details.tool, effect=details.effect,
        method=details.method, route=details.route, caller=details.caller,
        caller_role=details.caller_role, tenant=details.tenant,
        request_id=details.request_id, reason_codes=tuple(details.reason_codes),
        attrs=dict(details.attrs), body_sha256=details.body_sha256, via=details.via,
        created_at=now, expires_at=now + pending_ttl_s)


def is_expired(a: Approval, now: float) -> bool:
    """A live approval past its expiry (it has not been marked yet)."""
    return a.status in LIVE and now >= a.expires_at


def expire(a: Approval) -> Approval:
    return dataclasses.replace(a, status=Status.EXPIRED)


def settle(a: Approval, now: float) -> Approval:
    """The approval as it stands at ``now``: a live one past its expiry is expired."""
    return expire(a) if is_expired(a, now) else a


@dataclass(frozen=True, slots=True)
class Approver:
    """The principal acting on an approval."""

    id: str
    role: str
    tenant: str | None


@dataclass(frozen=True, slots=True)
class Rules:
    approver_roles: tuple[str, ...]
    four_eyes: bool
    approved_ttl_s: float


def check_role(who: Approver, rules: Rules) -> None:
    if who.role not in rules.approver_roles:
        raise NotApprover(who.role)


def visible(a: Approval | None, who: Approver) -> Approval:
    """``a`` when it exists and is in ``who``'s tenant; else :class:`NotFound`."""
    if a is None or a.tenant != who.tenant:
        raise NotFound()
    return a


def check_decider(a: Approval | None, who: Approver, rules: Rules, now: float) -> Approval:
    """Every rule an approve or deny must pass (module docstring); returns the approval."""
    check_role(who, rules)
    a = visible(a, who)
    if rules.four_eyes and who.id == a.caller:
        raise SelfApproval()
    if settle(a, now).status is not Status.PENDING:
        raise NotPending(settle(a, now).status.value)
    return a


def approve(a: Approval, who: Approver, rules: Rules, now: float,
            comment: str | None) -> Approval:
    """pending → approved; usable until ``now + approved_ttl_s``."""
    a = check_decider(a, who, rules, now)
    return dataclasses.replace(a, status=Status.APPROVED, approvers=(*a.approvers, who.id),
                               approved_at=now, decided_by=who.id, comment=comment,
                               expires_at=now + rules.approved_ttl_s)


def deny(a: Approval, who: Approver, rules: Rules, now: float, comment: str | None
         ) -> Approval:
    """pending → denied (final)."""
    a = check_decider(a, who, rules, now)
    return dataclasses.replace(a, status=Status.DENIED, decided_by=who.id, comment=comment)


def use(a: Approval, fingerprint: str, now: float) -> Approval | None:
    """approved → used, only for the request it was given for and before its expiry."""
    if a.status is not Status.APPROVED or is_expired(a, now) or a.fingerprint != fingerprint:
        return None
    return dataclasses.replace(a, status=Status.USED, used_at=now)


def parse_comment(body: object) -> str | None:
    """The optional ``{"comment": "..."}`` of a decision; ValueError when malformed."""
    if body is None:
        return None
    if not isinstance(body, dict) or set(body) - {"comment"}:
        raise ValueError('body must be {"comment": "..."} (optional)')
    comment = body.get("comment")
    if comment is None:
        return None
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ValueError(f"comment must be a string of at most {MAX_COMMENT} characters")
    return comment or None
