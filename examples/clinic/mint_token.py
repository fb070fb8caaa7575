#!/usr/bin/env python3
"""Print a dev JWT for the clinic example (signed with the dev key in dev-keys/).

    python examples/clinic/mint_token.py --role nurse --tenant t1
    curl -H "Authorization: Bearer $(python examples/clinic/mint_token.py --role doctor)" \\
        http://127.0.0.1:8080/patients/p1/history

The issuer and audience match identity.jwt in casf.yaml. The private key is a
published development key: anything it signs is forgeable by anyone, so never
trust its public half (dev-keys/jwks.json) outside this example.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import import_key

HERE = Path(__file__).resolve().parent
ISSUER = "https://idp.clinic.example"
AUDIENCE = "casf-clinic"


def mint(role: str, tenant: str | None, subject: str | None = None, ttl: int = 3600,
         issuer: str = ISSUER, audience: str = AUDIENCE,
         key_file: Path = HERE / "dev-keys" / "dev-private-key.jwk.json") -> str:
    data = json.loads(key_file.read_text())
    key = import_key(data)
    now = int(time.time())
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": subject or f"user-{role}",
                                 "role": role, "iat": now, "nbf": now, "exp": now + ttl}
    if tenant:
        claims["tenant"] = tenant
    return jwt.encode({"alg": data.get("alg", "RS256"), "kid": data["kid"]}, claims, key,
                      algorithms=[data.get("alg", "RS256")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", required=True, help="role claim, e.g. nurse")
    ap.add_argument("--tenant", default="t1", help="tenant claim (default t1; '' for none)")
    ap.add_argument("--sub", default=None, help="subject (default user-ROLE)")
    ap.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    ap.add_argument("--iss", default=ISSUER)
    ap.add_argument("--aud", default=AUDIENCE)
    args = ap.parse_args(argv)
    print(mint(args.role, args.tenant or None, args.sub, args.ttl, args.iss, args.aud))
    return 0


if __name__ == "__main__":
    sys.exit(main())
