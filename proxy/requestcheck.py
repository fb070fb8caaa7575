"""Stage 1 checks that are not about the path: headers, encodings, override knobs (pure).

Each check answers ``None`` (fine) or a non-shadowable :class:`~proxy.model.Verdict`;
the threats they close are listed in ``docs/threat-model.md``.

* **Header bytes**: a header value with a byte outside ASCII (``obs-text``) is
  refused (400 ``BadRequest_MalformedHeader``). Servers disagree on how to
  decode it (Latin-1, UTF-8, UTF-8 with escapes), so the value the proxy
  reads and the value the upstream reads could differ.
* **Overrides**: headers and parameters that make a framework treat the
  request as another method or another URL than the one on the request line
  are refused (400 ``BadRequest_Ambiguous``): the policy decides on the
  request line, so the upstream must act on it too. Headers:
  ``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``,
  ``X-Original-URL``, ``X-Rewrite-URL``, compared as the strictest upstream
  would: any case, with ``_`` and ``-`` folded (CGI/WSGI servers turn
  ``X_HTTP_Method_Override`` into ``HTTP_X_HTTP_METHOD_OVERRIDE``).
  Parameters: ``_method`` in the query, in a form / multipart body (Laravel,
  Rails, Symfony), or as a top-level key of a JSON object body (Laravel and
  Symfony merge JSON input into the request parameters), however the name is
  escaped.
* **Content-Encoding**: a request body with a content coding other than
  ``identity`` is refused (415 ``Request_UnsupportedEncoding``) before it is
  read: the proxy decides on, fingerprints and forwards the exact bytes it
  received, and a decompressing reader would both change those bytes and
  expand a small body into a large one.
* **Transfer-Encoding** other than ``chunked`` (``gzip, chunked``...): the
  parser would pass the coded bytes on as if they were the content, so it is
  refused (501 ``Request_UnsupportedEncoding``, RFC 9112 §6.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

import orjson

from proxy.model import Verdict
from proxy.reasons import Reason

OVERRIDE_HEADERS = frozenset({
    b"x-http-method-override", b"x-http-method", b"x-method-override",
    b"x-original-url", b"x-rewrite-url",
})
_CONTENT_ENCODING = b"content-encoding"
_TRANSFER_ENCODING = b"transfer-encoding"
_OVERRIDE_PARAM = "_method"
_MULTIPART_OVERRIDE = re.compile(rb"""name\s*=\s*["']?_method["';\s\r\n]""", re.IGNORECASE)

_MALFORMED_HEADER = Verdict("DENY", 400, (Reason.MALFORMED_HEADER,),
                            "a header value contains bytes outside ASCII", shadowable=False)
_OVERRIDE = Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                    "method or URL override headers are not accepted", shadowable=False)
_OVERRIDE_PARAMETER = Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                              "the _method override parameter is not accepted",
                              shadowable=False)
_ENCODING = Verdict("DENY", 415, (Reason.UNSUPPORTED_ENCODING,),
                    "request bodies with a Content-Encoding are not accepted",
                    (("Accept-Encoding", "identity"), ("Connection", "close")),
                    shadowable=False)
_TRANSFER_CODING = Verdict("DENY", 501, (Reason.UNSUPPORTED_ENCODING,),
                           "transfer codings other than chunked are not supported",
                           (("Connection", "close"),), shadowable=False)


def header_verdict(raw_headers: Iterable[tuple[bytes, bytes]]) -> Verdict | None:
    """Check the raw header block (names and values as received)."""
    for name, value in raw_headers:
        if not value.isascii():
            return _MALFORMED_HEADER
        lname = name.lower()
        if lname.replace(b"_", b"-") in OVERRIDE_HEADERS:
            return _OVERRIDE
        if lname == _CONTENT_ENCODING:
            for token in value.split(b","):
                coding = token.strip().lower()
                if coding and coding != b"identity":
                    return _ENCODING
        elif lname == _TRANSFER_ENCODING:
            for token in value.split(b","):
                if token.strip().lower() != b"chunked":
                    return _TRANSFER_CODING
    return None


def _has_override_param(encoded: str) -> bool:
    if "method" not in encoded.lower() and "%" not in encoded:
        return False
    for piece in re.split("[&;]", encoded):
        name = unquote_plus(piece.split("=", 1)[0], errors="replace")
        if name.strip().lower() == _OVERRIDE_PARAM:
            return True
    return False


def _json_override(body: bytes) -> bool:
    """A top-level ``_method`` key in a JSON object body, however it is escaped.

    Only bodies that look like a JSON object are parsed (any content type: an
    upstream may sniff); one that does not parse is left to the stages that
    read it (the upstream cannot read parameters from it either).
    """
    start = body.lstrip()[:1]
    if start != b"{":
        return False
    if b"method" not in body.lower() and b"\\u" not in body:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and any(
        isinstance(k, str) and k.strip().lower() == _OVERRIDE_PARAM for k in doc)


def override_param_verdict(query: str, content_type: str | None, body: bytes
                           ) -> Verdict | None:
    """``_method`` in the query, or in a form, multipart or JSON body."""
    if query and _has_override_param(query):
        return _OVERRIDE_PARAMETER
    if not body:
        return None
    ctype = (content_type or "").lower()
    if ctype.startswith("application/x-www-form-urlencoded"):
        if _has_override_param(body.decode("latin-1")):
            return _OVERRIDE_PARAMETER
    elif ctype.startswith("multipart/"):
        if _MULTIPART_OVERRIDE.search(body):
            return _OVERRIDE_PARAMETER
    elif _json_override(body):
        return _OVERRIDE_PARAMETER
    return None
