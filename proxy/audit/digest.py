"""Audit digests: a signed, verifiable summary of every chain, for WORM anchoring.

A digest document (format ``casf-audit-digest/1``) is canonical JSON::

    {"chains": [{"chain_id", "count", "first_seq", "last_seq",
                 "first_hash", "last_hash", "prev_hash"}, ...],   # sorted by chain_id
     "created_at": "...Z", "date": "YYYY-MM-DD" | null,
     "format": "casf-audit-digest/1", "merkle_root": "<hex>", "records": <sum of counts>,
     "store": "postgresql" | "sqlite",
     "window": {"since": "...Z", "until": "...Z"} | null,
     "digest_hash": "<hex>",
     "signature": {"alg": "Ed25519", "key_id", "public_key", "value"}}   # optional

- leaf(chain)  = SHA-256(0x00 || canonical_json(chain entry))
- node(l, r)   = SHA-256(0x01 || l || r); an odd node at the end of a level
  is carried up unchanged; the root of no chains is SHA-256("")
- digest_hash  = SHA-256(canonical_json(document without digest_hash, signature))
- signature    = Ed25519 over canonical_json(document without signature)
  (hex), ``public_key`` the raw 32-byte key in hex, ``key_id`` the first 16
  hex digits of SHA-256(public key).

``prev_hash`` is the hash the chain's first covered record links to: the
digest of day D+1 continues exactly where day D's ``last_hash`` ended.
The file is the canonical JSON plus a newline; verification insists on that
exact form, so any changed byte fails it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.canonical import canonical_json

FORMAT = "casf-audit-digest/1"
_ENTRY_KEYS = ("chain_id", "count", "first_seq", "last_seq", "first_hash", "last_hash",
               "prev_hash")


class DigestError(Exception):
    """A digest or key that cannot be used (unreadable, wrong kind)."""


def leaf_hash(entry: dict[str, Any]) -> bytes:
    return hashlib.sha256(b"\x00" + canonical_json(entry)).digest()


def merkle_root(leaves: Sequence[bytes]) -> str:
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    level = list(leaves)
    while len(level) > 1:
        up = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
              for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        level = up
    return level[0].hex()


def _unsigned(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("digest_hash", "signature")}


def digest_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(_unsigned(doc))).hexdigest()


def build(chains: list[dict[str, Any]], *, store: str, created_at: str,
          day: str | None = None, window: tuple[str, str] | None = None) -> dict[str, Any]:
    entries = sorted(({k: c[k] for k in _ENTRY_KEYS} for c in chains),
                     key=lambda e: str(e["chain_id"]))
    doc: dict[str, Any] = {
        "format": FORMAT, "store": store, "created_at": created_at, "date": day,
        "window": {"since": window[0], "until": window[1]} if window else None,
        "chains": entries, "records": sum(int(e["count"]) for e in entries),
        "merkle_root": merkle_root([leaf_hash(e) for e in entries]),
    }
    doc["digest_hash"] = digest_hash(doc)
    return doc


def serialise(doc: dict[str, Any]) -> bytes:
    return canonical_json(doc) + b"\n"


# ------------------------------------------------------------ keys and signatures


def load_key(path: Path) -> Ed25519PrivateKey | Ed25519PublicKey:
    """An Ed25519 key from a PEM file (PKCS#8 private key or SubjectPublicKeyInfo)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DigestError(f"cannot read key file {path}: {exc.strerror}") from exc
    key: Any
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise DigestError(f"{path} is not a PEM Ed25519 key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise DigestError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    raw = _raw(key.public_key())
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    signed = dict(unsigned)
    signed["signature"] = {
        "alg": "Ed25519", "key_id": hashlib.sha256(raw).hexdigest()[:16],
        "public_key": raw.hex(), "value": key.sign(canonical_json(unsigned)).hex()}
    return signed


def verify(raw: bytes, key: Ed25519PrivateKey | Ed25519PublicKey | None = None
           ) -> tuple[bool, list[str]]:
    """Check a digest file's bytes; returns (ok, findings)."""
    notes: list[str] = []
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return False, [f"not a JSON document: {exc}"]
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return False, [f"not a {FORMAT} document"]
    body = raw[:-1] if raw.endswith(b"\n") else raw
    if body != canonical_json(doc):
        return False, ["the file is not in its canonical form: it was changed after it was "
                       "written"]
    ok = True
    chains = doc.get("chains")
    if not isinstance(chains, list):
        return False, ["malformed document: chains is not a list"]
    try:
        entries = [{k: c[k] for k in _ENTRY_KEYS} for c in chains]
        if entries != chains:
            raise ValueError("unexpected chain fields")
        if merkle_root([leaf_hash(e) for e in entries]) != doc.get("merkle_root"):
            ok = False
            notes.append("merkle_root does not match the chain entries")
        if sum(int(e["count"]) for e in entries) != doc.get("records"):
            ok = False
            notes.append("records does not match the sum of the chain counts")
    except (KeyError, TypeError, ValueError) as exc:
        return False, [f"malformed chain entries: {exc}"]
    if digest_hash(doc) != doc.get("digest_hash"):
        ok = False
        notes.append("digest_hash does not match the document")
    sig = doc.get("signature")
    if sig is None:
        if key is not None:
            return False, [*notes, "the digest is not signed"]
        notes.append("unsigned digest (integrity checked, authenticity not)")
        return ok, notes
    try:
        embedded = Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig["public_key"]))
        value = bytes.fromhex(sig["value"])
        if sig.get("alg") != "Ed25519":
            raise ValueError(f"unsupported alg {sig.get('alg')!r}")
    except (KeyError, TypeError, ValueError) as exc:
        return False, [*notes, f"malformed signature: {exc}"]
    public = embedded
    if key is not None:
        public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        if _raw(public) != _raw(embedded):
            return False, [*notes, "signed with a different key than the one given"]
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    try:
        public.verify(value, canonical_json(unsigned))
    except InvalidSignature:
        return False, [*notes, "signature does not verify"]
    if key is None:
        notes.append(f"signature valid for the embedded key {sig.get('key_id')} (pass --key "
                     "to check it is yours)")
    else:
        notes.append(f"signature valid (key {sig.get('key_id')})")
    return ok, notes
