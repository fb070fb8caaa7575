"""Trusted headers: identity asserted by a component in front (e.g. a mesh sidecar).

Off unless ``identity.trusted_headers.enabled``. The headers are honoured
only when the TCP peer address is in one of ``sources``; from any other
address they are ignored (this method does not recognise the request, so it
stays unauthenticated unless another method applies) and they are never
forwarded to the upstream, whatever the source.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address, ip_address

from proxy.config import TrustedHeadersConfig
from proxy.identity.base import AuthFailure, printable
from proxy.model import Exchange, Principal

log = logging.getLogger("casf.identity")


def peer_address(peer: str) -> IPv4Address | IPv6Address | None:
    try:
        addr = ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack listener sees ::ffff:127.0.0.1
    return addr


class TrustedHeaderAuthenticator:
    name = "trusted_headers"

    def __init__(self, cfg: TrustedHeadersConfig) -> None:
        self.cfg = cfg
        self._headers = (cfg.actor_header, cfg.role_header, cfg.tenant_header)

    @property
    def challenge(self) -> str:
        return 'TrustedHeader realm="casf"'

    @property
    def consumed_headers(self) -> tuple[str, ...]:
        return self._headers

    @property
    def stripped_headers(self) -> tuple[str, ...]:
        return self._headers

    def invalid_challenge(self, failure: AuthFailure) -> str:
        return self.challenge

    def trusted(self, peer: str) -> bool:
        addr = peer_address(peer)
        return addr is not None and any(addr in net for net in self.cfg.sources)

    async def authenticate(self, ex: Exchange) -> Principal | AuthFailure | None:
        actor = ex.headers.getall(self.cfg.actor_header, [])
        if not actor:
            return None
        if not self.trusted(ex.peer):
            log.debug("identity headers from untrusted peer %s ignored (trace %s)", ex.peer,
                      ex.trace_id)
            return None
        role = ex.headers.getall(self.cfg.role_header, [])
        tenant = ex.headers.getall(self.cfg.tenant_header, [])
        if len(actor) != 1 or len(role) > 1 or len(tenant) > 1:
            return AuthFailure("repeated", "an identity header is sent more than once")
        if not printable(actor[0]):
            return AuthFailure("bad_actor", f"{self.cfg.actor_header} is not a usable id")
        if not role or not printable(role[0]):
            return AuthFailure("no_role", f"{self.cfg.role_header} is missing or unusable")
        if tenant and not printable(tenant[0]):
            return AuthFailure("bad_tenant", f"{self.cfg.tenant_header} is unusable")
        return Principal(actor[0], role[0], tenant[0] if tenant else None, "trusted_header",
                         f"peer:{ex.peer}")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def reload(self) -> dict[str, int]:
        return {}
