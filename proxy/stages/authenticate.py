"""Authenticate: the configured methods in ``identity.order``; the first that recognises decides.

No method recognises the request → 401 ``Auth_Missing`` with every method's
challenge. A credential that is present but invalid → 401 ``Auth_Invalid``
with that method's challenge; it never falls through to another method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.identity.base import AuthFailure
from proxy.model import Exchange, Verdict
from proxy.reasons import Reason

if TYPE_CHECKING:  # the stage only calls what the identity sources give it
    from proxy.identity import Identity


class AuthenticateStage:
    name = "authenticate"

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._missing = Verdict("DENY", 401, (Reason.AUTH_MISSING,),
                                f"credentials required ({identity.credential_names})",
                                (("WWW-Authenticate", identity.challenge),))

    async def check(self, ex: Exchange) -> Verdict | None:
        for auth in self.identity.authenticators:
            result = await auth.authenticate(ex)
            if result is None:
                continue
            if isinstance(result, AuthFailure):
                return Verdict("DENY", 401, (Reason.AUTH_INVALID,), result.message,
                               (("WWW-Authenticate", auth.invalid_challenge(result)),))
            ex.principal = result
            return None
        return self._missing
