"""Anti-replay helpers (IETF "Idempotency-Key HTTP Header Field" draft), pure.

Request ids come from ``Idempotency-Key``, else ``X-Request-Id``
(configurable); they are validated, scoped by principal, and paired with a
fingerprint over tool, method, normalised path+query and the canonical body.
The claim itself is taken by the admission stage.
"""

from __future__ import annotations

import hashlib

from proxy.model import Exchange, Verdict
from proxy.reasons import Reason

MAX_ID_LENGTH = 255


def parse_request_id(raw: str) -> str | None:
    """Validate an id: printable ASCII, 1-255 characters; sf-string quotes stripped."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_ID_LENGTH:
        return None
    if not all(" " <= ch <= "~" for ch in value):
        return None
    return value


def scoped_key(principal_id: str, request_id: str) -> str:
    """One caller's id can never collide with, or block, another caller's."""
    h = hashlib.sha256()
    for part in (principal_id.encode(), request_id.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def client_request_id(ex: Exchange, headers: tuple[str, ...]) -> str | Verdict | None:
    """The caller's request id from the first configured header present.

    Returns ``None`` when none is sent, a 400 verdict when it is invalid or
    repeated. A valid id is also stored on the exchange (``request_id``), so
    every later envelope and audit record carries it.
    """
    for header in headers:
        values = ex.headers.getall(header, [])
        if not values:
            continue
        if len(values) > 1:
            return Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,), f"{header} is repeated")
        parsed = parse_request_id(values[0])
        if parsed is None:
            return Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,),
                           f"{header} must be 1-{MAX_ID_LENGTH} printable characters")
        ex.request_id = parsed
        return parsed
    return None


def state_scope(tenant: str | None, principal_id: str) -> str:
    """The request's state partition: its tenant, else its principal (brace-free hex)."""
    source = f"t:{tenant}" if tenant is not None else f"p:{principal_id}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]
