"""The authenticator interface shared by API keys, JWTs and trusted headers.

An authenticator looks at the request and answers one of three things:

- ``None``: no credential of its kind is present (the next one is tried);
- a :class:`~proxy.model.Principal`: the credential is valid;
- an :class:`AuthFailure`: a credential of its kind is present but invalid.
  The request is then refused with 401 ``Auth_Invalid``; it never falls
  through to another (possibly weaker) method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.model import Exchange, Principal


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """A present but invalid credential.

    ``message`` goes into the envelope: it names the problem (``token
    expired``), never the credential. ``reason`` is a stable short id for logs.
    """

    reason: str
    message: str


class Authenticator(Protocol):
    """One authentication method (``name`` is its config id under ``identity``)."""

    name: str

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` challenge when no credential was sent."""
        ...

    @property
    def consumed_headers(self) -> tuple[str, ...]:
        """Credential headers, dropped before forwarding unless configured otherwise."""
        ...

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        """Headers never forwarded at all (identity assertions the upstream might trust)."""
        ...

    def invalid_challenge(self, failure: AuthFailure) -> str:
        """The ``WWW-Authenticate`` challenge for a rejected credential."""
        ...

    async def authenticate(self, ex: Exchange) -> Principal | AuthFailure | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def reload(self) -> dict[str, int]: ...


def printable(value: str, limit: int = 256) -> bool:
    """A principal field taken from a credential: 1..limit printable ASCII, no outer spaces."""
    return (0 < len(value) <= limit and value == value.strip()
            and all(" " <= ch <= "~" for ch in value))
