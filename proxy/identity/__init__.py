"""Identity: who is calling (pipeline stage 3, authenticate; docs/identity.md).

``identity.order`` lists the configured authenticators (API keys, JWT,
trusted headers); :class:`Identity` holds them in that order and owns their
background tasks (key reloads, JWKS refresh). The pipeline stage that uses
them is ``proxy.stages.authenticate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from proxy.config import IdentityConfig
from proxy.identity.apikeys import ApiKeyAuthenticator
from proxy.identity.base import Authenticator
from proxy.identity.jwt import JwtAuthenticator
from proxy.identity.trusted import TrustedHeaderAuthenticator
from proxy.metrics import Metrics
from proxy.settings import Environment


class Identity:
    """The ordered authenticators of one proxy instance."""

    def __init__(self, authenticators: list[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)

    @classmethod
    def build(cls, cfg: IdentityConfig, env: Environment, metrics: Metrics, *,
              watch_files: bool = True) -> Identity:
        """``watch_files`` false: the caller watches the key files (the runtime's one
        file watcher) and calls :meth:`reload` on a change."""
        out: list[Authenticator] = []
        for name in cfg.order:
            if name == "api_keys" and cfg.api_keys is not None:
                out.append(ApiKeyAuthenticator(cfg.api_keys, env, metrics, watch=watch_files))
            elif name == "jwt" and cfg.jwt is not None:
                out.append(JwtAuthenticator(cfg.jwt, metrics))
            elif name == "trusted_headers" and cfg.trusted_headers is not None:
                out.append(TrustedHeaderAuthenticator(cfg.trusted_headers))
        return cls(out)

    @property
    def challenge(self) -> str:
        """All methods' challenges in one ``WWW-Authenticate`` value (RFC 9110 §11.6.1)."""
        return ", ".join(a.challenge for a in self.authenticators)

    @property
    def credential_names(self) -> str:
        return " or ".join(dict.fromkeys(h for a in self.authenticators
                                         for h in a.consumed_headers[:1]))

    @property
    def consumed_headers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for a in self.authenticators for h in a.consumed_headers))

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for a in self.authenticators for h in a.stripped_headers))

    def get(self, name: str) -> Authenticator | None:
        return next((a for a in self.authenticators if a.name == name), None)

    async def start(self) -> None:
        for a in self.authenticators:
            await a.start()

    async def close(self) -> None:
        for a in reversed(self.authenticators):
            await a.close()

    async def reload(self) -> dict[str, int]:
        """Re-read API keys and refetch the JWKS now; returns how many of each are loaded."""
        out: dict[str, int] = {}
        for a in self.authenticators:
            out.update(await a.reload())
        return out


@contextlib.asynccontextmanager
async def open_identity(cfg: IdentityConfig, env: Environment, metrics: Metrics
                        ) -> AsyncIterator[Identity]:
    identity = Identity.build(cfg, env, metrics)
    try:
        await identity.start()
        yield identity
    finally:
        await identity.close()
