"""One MCP message over streamable HTTP: classify, cross-check, answer (pure).

A POST to an MCP endpoint carries exactly one JSON-RPC 2.0 request or
notification. :func:`parse_message` reads it strictly (the decoder rules of
``proxy.strictjson``: duplicate keys, 64-bit integers, nesting) and returns a
classified :class:`McpMessage`, or raises :class:`McpRejected` with the
JSON-RPC error code, the HTTP status and the reason code of the refusal:

* not JSON → -32700 ``BadRequest_InvalidJson``;
* a JSON array (a batch) → -32600 ``Mcp_BatchNotAllowed``;
* duplicate keys → -32600 ``BadRequest_Ambiguous``;
* not a JSON-RPC 2.0 request or notification (a response, no ``jsonrpc:
  "2.0"``, a missing, empty or non-string method, a method that is not
  visible ASCII without spaces, an id that is not a string or an integer)
  → -32600 ``Mcp_InvalidMessage``;
* params that are not an object, ``tools/call`` without a string
  ``params.name`` (or one with control characters), ``params.arguments``
  that is not an object → -32602 ``Mcp_InvalidParams``.

The id of the refusal is the message's id when it could be read, else null.

:func:`check_headers` compares the headers MCP 2026-07-28 mirrors from the
body (``Mcp-Method``, ``Mcp-Name``, ``Mcp-Param-*``, ``MCP-Protocol-Version``)
with the body, after the ``=?base64?…?=`` decoding; a mismatch is -32020
``Mcp_HeaderMismatch``. Header names compare ignoring case and with ``_``
read as ``-`` (as CGI-style servers read them); a repeated header is a
mismatch, since first-copy and last-copy readers would disagree.

The builders give the answers the proxy writes itself: the JSON-RPC error
for a deny (-32010) or a refusal, the ``isError`` tool result for
``deny_as: tool_error``, and a stored answer with the retry's id for an
idempotent replay. :func:`fingerprint_input` is what a tool call's
idempotency fingerprint covers.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.canonical import canonical_json, sha256_hex
from proxy.mcp.config import LIFECYCLE_METHODS, McpEndpoint
from proxy.mcp.sse import SseParser, serialize
from proxy.reasons import Reason
from proxy.strictjson import JsonRejected, loads_strict

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: A casf-proxy denial (-32001 is the MCP SDK's own request timeout).
DENIED = -32010
#: MCP's HeaderMismatch.
HEADER_MISMATCH = -32020

MessageKind = Literal["tool_call", "tool_list", "lifecycle", "other"]
JsonRpcId = str | int | None

PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
#: The first protocol version that mirrors body fields into headers.
MIRRORING_VERSION = "2026-07-28"

_MAX_METHOD = 256
_MAX_NAME = 256
_MAX_ID = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_METHOD = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: it must fit Mcp-Method as it is
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>[A-Za-z0-9+/]*={0,2})\?=$")
_DECIMAL = re.compile(r"^-?[0-9]+(\.0+)?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: params key whose value ``Mcp-Name`` mirrors, per method.
NAME_FIELDS: Mapping[str, str] = {"tools/call": "name", "prompts/get": "name",
                                  "resources/read": "uri"}


class McpRejected(Exception):
    """The message is refused before any decision: a JSON-RPC error answers it."""

    def __init__(self, code: int, reason: str, message: str, msg_id: JsonRpcId = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.id = msg_id
        self.status = status


@dataclass(frozen=True, slots=True)
class McpMessage:
    """A valid JSON-RPC request or notification, classified.

    ``doc`` is the whole message (attribute pointers such as
    ``/params/arguments/patient_id`` resolve against it); ``arguments`` is
    ``params.arguments`` of a ``tools/call`` ({} when absent).
    """

    doc: Mapping[str, Any]
    method: str
    kind: MessageKind
    id: JsonRpcId = None
    is_notification: bool = False
    tool_name: str | None = None
    arguments: Mapping[str, Any] | None = None

    @property
    def id_text(self) -> str | None:
        """The JSON-RPC id as a string, for the audit record (None for a notification)."""
        return None if self.id is None else str(self.id)

    @property
    def params(self) -> Mapping[str, Any]:
        p = self.doc.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def protocol_version(self) -> str | None:
        """``params._meta["io.modelcontextprotocol/protocolVersion"]`` (2026-07-28 messages)."""
        meta = self.params.get("_meta")
        v = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
        return v if isinstance(v, str) else None

    def audit_tool(self) -> str:
        """The audit record's tool for a message that is not a tool call: ``mcp.<method>``."""
        return f"mcp.{self.method}"

    def allowed_without_tool(self, endpoint: McpEndpoint) -> bool:
        """For ``lifecycle`` and ``other`` messages: whether an authenticated caller
        may send it (lifecycle always; others only when listed under ``methods``)."""
        return self.kind == "lifecycle" or (self.kind == "other"
                                            and endpoint.method_allowed(self.method))


def classify(method: str) -> MessageKind:
    if method == "tools/call":
        return "tool_call"
    if method == "tools/list":
        return "tool_list"
    if method in LIFECYCLE_METHODS or method.startswith("notifications/"):
        return "lifecycle"
    return "other"


def _readable_id(doc: Any) -> JsonRpcId:
    if isinstance(doc, dict):
        v = doc.get("id")
        if isinstance(v, str) and len(v) <= _MAX_ID and not _CONTROL.search(v):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def parse_message(body: bytes) -> McpMessage:
    """Parse one POST body into a classified message, or raise :class:`McpRejected`."""
    if not body.strip():
        raise McpRejected(PARSE_ERROR, Reason.INVALID_JSON, "the request body is empty")
    try:
        doc = loads_strict(body)
    except JsonRejected as exc:
        if exc.reason == Reason.AMBIGUOUS_REQUEST:
            if body.lstrip().startswith(b"["):
                raise McpRejected(INVALID_REQUEST, Reason.MCP_BATCH_NOT_ALLOWED,
                                  "batches are not allowed: send one JSON-RPC message per "
                                  "request") from None
            raise McpRejected(INVALID_REQUEST, exc.reason, exc.message) from None
        raise McpRejected(PARSE_ERROR, exc.reason, exc.message) from None
    if isinstance(doc, list):
        raise McpRejected(INVALID_REQUEST, Reason.MCP_BATCH_NOT_ALLOWED,
                          "batches are not allowed: send one JSON-RPC message per request")
    msg_id = _readable_id(doc)

    def invalid(message: str) -> McpRejected:
        return McpRejected(INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, message, msg_id)

    def bad_params(message: str) -> McpRejected:
        return McpRejected(INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, message, msg_id)

    if not isinstance(doc, dict):
        raise invalid("the body is not a JSON-RPC 2.0 message object")
    if doc.get("jsonrpc") != "2.0":
        raise invalid('the message is not JSON-RPC 2.0 ("jsonrpc": "2.0" is missing)')
    if "method" not in doc:
        if "result" in doc or "error" in doc:
            raise invalid("the message is a JSON-RPC response; this endpoint accepts "
                          "requests and notifications")
        raise invalid("the message has no method")
    method = doc["method"]
    if not isinstance(method, str):
        raise invalid("the message's method is not a string")
    if len(method) > _MAX_METHOD or not _METHOD.fullmatch(method):
        raise invalid("the message's method is empty, too long, or not visible ASCII "
                      "without spaces")
    has_id = "id" in doc
    if has_id and msg_id is None:
        raise invalid("the message's id must be a string (printable, at most "
                      f"{_MAX_ID} characters) or an integer")
    params = doc.get("params")
    if params is not None and not isinstance(params, dict):
        raise bad_params("the message's params must be an object")
    kind = classify(method)
    if kind in ("tool_call", "tool_list") and not has_id:
        raise invalid(f"{method} must be a request (with an id), not a notification")
    if kind != "tool_call":
        return McpMessage(doc=doc, method=method, kind=kind, id=msg_id,
                          is_notification=not has_id)
    name = (params or {}).get("name")
    if not isinstance(name, str):
        raise bad_params("tools/call needs the tool's name as a string in params.name")
    if not name or len(name) > _MAX_NAME or _CONTROL.search(name):
        raise bad_params("the tool name in params.name is empty, too long or has control "
                         "characters")
    arguments = (params or {}).get("arguments", {})
    if not isinstance(arguments, dict):
        raise bad_params("params.arguments of tools/call must be an object")
    return McpMessage(doc=doc, method=method, kind=kind, id=msg_id, tool_name=name,
                      arguments=arguments)


# ------------------------------------------------------------ mirrored headers


@dataclass(frozen=True, slots=True)
class ParamBinding:
    """An ``x-mcp-header`` annotation: ``Mcp-Param-<header>`` mirrors the argument at ``path``."""

    header: str  # the token as annotated, e.g. "Region"
    path: tuple[str, ...]  # property names from the arguments' root
    type: str  # string | integer | boolean


_SUBSCHEMA_ONE = frozenset({"items", "contains", "additionalItems", "unevaluatedItems",
                            "additionalProperties", "unevaluatedProperties", "propertyNames",
                            "not", "if", "then", "else", "contentSchema"})
_SUBSCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAP = frozenset({"patternProperties", "dependentSchemas", "$defs", "definitions",
                            "dependencies"})


def _schema_positions(root: Any) -> Iterator[tuple[tuple[str, ...] | None, Mapping[str, Any]]]:
    """Every schema position under ``root`` with its chain of ``properties`` keys
    (None once the walk left a pure ``properties`` chain). Keywords holding
    instance data (``default``, ``const``, ``enum``, ``examples``) are not schemas
    and are not entered; ``$ref`` is not followed."""
    stack: list[tuple[tuple[str, ...] | None, Any]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield path, node
        for kw, sub in node.items():
            if kw == "properties" and isinstance(sub, dict):
                stack.extend(((*path, k) if path is not None else None, v)
                             for k, v in sub.items())
            elif kw in _SUBSCHEMA_ONE:
                stack.append((None, sub))
            elif kw in _SUBSCHEMA_LIST and isinstance(sub, list):
                stack.extend((None, v) for v in sub)
            elif kw in _SUBSCHEMA_MAP and isinstance(sub, dict):
                stack.extend((None, v) for v in sub.values())


def tool_bindings(tool_def: Any) -> dict[str, ParamBinding] | None:
    """The ``Mcp-Param-*`` bindings a tool definition (a ``tools/list`` entry)
    declares, keyed by the lower-cased header token; None when an annotation
    breaks the rules (not a token, repeated ignoring case, not on a string,
    integer or boolean property, or not reachable through ``properties`` only):
    such a tool is invalid for a 2026-07-28 client."""
    schema = tool_def.get("inputSchema") if isinstance(tool_def, dict) else None
    out: dict[str, ParamBinding] = {}
    for path, node in _schema_positions(schema):
        if "x-mcp-header" not in node:
            continue
        token = node["x-mcp-header"]
        if not path or not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return None
        kind = node.get("type")
        if kind not in ("string", "integer", "boolean") or token.lower() in out:
            return None
        out[token.lower()] = ParamBinding(token, path, kind)
    return out


def bindings_from_list(result: Any) -> dict[str, dict[str, ParamBinding]]:
    """Tool name → bindings, for every valid tool of a ``tools/list`` result.

    The front door keeps what it learns per endpoint (2026-07-28 lists do not
    vary per connection) and hands a tool's bindings to :func:`check_headers`.
    """
    tools = result.get("tools") if isinstance(result, dict) else None
    out: dict[str, dict[str, ParamBinding]] = {}
    for t in tools if isinstance(tools, list) else ():
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            b = tool_bindings(t)
            if b is not None:
                out[t["name"]] = b
    return out


def header_key(name: str) -> str:
    """A header name as lenient servers match it: case-folded, ``_`` read as ``-``."""
    return name.lower().replace("_", "-")


def decode_header_value(value: str) -> str | None:
    """Undo the ``=?base64?…?=`` encoding (UTF-8, canonical base64); None when it is malformed.
    A value without the markers is returned as it is."""
    if not (value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11):
        return value
    m = _SENTINEL.fullmatch(value)
    if m is None:
        return None
    payload = m.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != payload:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _mismatch(msg: McpMessage, text: str) -> McpRejected:
    return McpRejected(HEADER_MISMATCH, Reason.MCP_HEADER_MISMATCH, text, msg.id)


def _value_at(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _param_matches(binding: ParamBinding, value: Any, header: str) -> bool:
    if isinstance(value, bool):
        return header == ("true" if value else "false")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and binding.type == "integer"):
        if binding.type == "integer" and _DECIMAL.fullmatch(header):
            return int(header.split(".", 1)[0]) == int(value)
        return header == str(value)
    if isinstance(value, str):
        return header == value
    if isinstance(value, float):
        return header == str(value)
    return False  # objects, arrays: never mirrored, so a header claiming one cannot match


def check_headers(msg: McpMessage, headers: Iterable[tuple[str, str]],
                  bindings: Mapping[str, ParamBinding] | None = None) -> None:
    """Raise :class:`McpRejected` (-32020) when a mirrored header disagrees with the body.

    ``headers`` are the request's header lines as (name, value) pairs, repeats
    included. ``bindings`` are the called tool's ``Mcp-Param-*`` bindings when
    the endpoint has seen its definition (:func:`bindings_from_list`); without
    them ``Mcp-Param-*`` headers are forwarded unchecked, as MCP asks of an
    intermediary that does not recognise them. With them, a 2026-07-28 call
    (``MCP-Protocol-Version``) must carry the header of every argument present.
    Error messages never quote header or argument values.
    """
    seen: dict[str, list[tuple[str, str]]] = {}
    for name, value in headers:
        key = header_key(name)
        if key in ("mcp-method", "mcp-name", "mcp-protocol-version") \
                or key.startswith("mcp-param-"):
            seen.setdefault(key, []).append((name, value))
    values: dict[str, str] = {}
    for key, found in seen.items():
        if len(found) > 1:
            raise _mismatch(msg, f"header {found[0][0]} appears more than once (spellings "
                            "that differ only in case or _ for - count as the same header)")
        name, value = found[0]
        if not _HEADER_VALUE.fullmatch(value):
            raise _mismatch(msg, f"header {name} has characters a header value may not carry "
                            "(use the =?base64?...?= encoding)")
        values[key] = value.strip(" \t")
    if "mcp-method" in values and values["mcp-method"] != msg.method:
        raise _mismatch(msg, "the Mcp-Method header does not match the body's method")
    if "mcp-name" in values:
        _check_name(msg, values["mcp-name"])
    version = values.get("mcp-protocol-version")
    if version is not None and msg.protocol_version is not None \
            and version != msg.protocol_version:
        raise _mismatch(msg, "the MCP-Protocol-Version header does not match the protocol "
                        "version in params._meta")
    if msg.kind != "tool_call" or bindings is None:
        return
    arguments = msg.arguments or {}
    modern = version is not None and version >= MIRRORING_VERSION
    for token, binding in bindings.items():
        raw = values.get(f"mcp-param-{token}")
        value = _value_at(arguments, binding.path)
        header_name = f"Mcp-Param-{binding.header}"
        argument = ".".join(binding.path)
        if value is None:
            if raw is not None:
                raise _mismatch(msg, f"the {header_name} header is present but the argument "
                                f"{argument} is not")
            continue
        if raw is None:
            if modern and isinstance(value, str | int | bool):
                raise _mismatch(msg, f"the {header_name} header is missing but the argument "
                                f"{argument} is present")
            continue
        decoded = decode_header_value(raw)
        if decoded is None:
            raise _mismatch(msg, f"the {header_name} header has a malformed base64 value")
        if not _param_matches(binding, value, decoded):
            raise _mismatch(msg, f"the {header_name} header does not match the argument "
                            f"{argument}")


def _check_name(msg: McpMessage, raw: str) -> None:
    decoded = decode_header_value(raw)
    if decoded is None:
        raise _mismatch(msg, "the Mcp-Name header has a malformed base64 value")
    params = msg.params
    field = NAME_FIELDS.get(msg.method)
    if field is not None:
        body = params.get(field)
    else:
        body = next((params[f] for f in ("name", "uri") if isinstance(params.get(f), str)),
                    None)
        field = "name"
    if not isinstance(body, str) or decoded != body:
        raise _mismatch(msg, f"the Mcp-Name header does not match the body's params.{field}")


# ------------------------------------------------------------ answers


def _dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def error_body(msg_id: JsonRpcId, code: int, envelope: Mapping[str, Any]) -> bytes:
    """The JSON-RPC error: ``{"jsonrpc": "2.0", "id": …, "error": {"code": …,
    "message": <the envelope's message>, "data": <the envelope>}}``."""
    return _dumps({"jsonrpc": "2.0", "id": msg_id,
                   "error": {"code": code, "message": envelope.get("message") or "",
                             "data": dict(envelope)}})


def tool_error_body(msg_id: JsonRpcId, envelope: Mapping[str, Any]) -> bytes:
    """A ``tools/call`` result with ``isError: true`` that a model can read: the text
    names the decision and the reason codes; ``_meta.casf`` is the envelope.
    ``resultType: complete`` is required by 2026-07-28 clients and ignored by older ones."""
    codes = ", ".join(str(c) for c in envelope.get("reason_codes") or ()) or "none"
    text = f"casf-proxy {envelope.get('decision') or 'DENY'} ({codes})"
    if envelope.get("message"):
        text += f": {envelope['message']}"
    if envelope.get("retry_after") is not None:
        text += f" (retry after {envelope['retry_after']} s)"
    return _dumps({"jsonrpc": "2.0", "id": msg_id,
                   "result": {"content": [{"type": "text", "text": text}], "isError": True,
                              "resultType": "complete", "_meta": {"casf": dict(envelope)}}})


def deny_answer(msg: McpMessage, envelope: Mapping[str, Any],
                endpoint: McpEndpoint) -> tuple[int, bytes]:
    """HTTP status and body for a decision that is not ALLOW.

    ``deny_as: tool_error`` answers a ``tools/call`` with HTTP 200 and an
    ``isError`` result; everything else (and ``jsonrpc_error``) gets the
    envelope's status and the -32010 error.
    """
    if endpoint.deny_as == "tool_error" and msg.kind == "tool_call":
        return 200, tool_error_body(msg.id, envelope)
    return int(envelope.get("status") or 403), error_body(msg.id, DENIED, envelope)


def rejection_answer(exc: McpRejected, envelope: Mapping[str, Any]) -> tuple[int, bytes]:
    """HTTP status and body for a refused message (malformed, batch, header mismatch):
    always a JSON-RPC error with the refusal's code, whatever ``deny_as`` says."""
    return exc.status, error_body(exc.id, exc.code, envelope)


def with_id(answer: bytes, content_type: str | None, msg_id: JsonRpcId) -> bytes:
    """A stored JSON-RPC answer (JSON, or an SSE stream) with its response's id
    replaced by ``msg_id``: an idempotent replay answers the retry's id.
    Notifications inside a stream are left as they are; a body that is not a
    JSON-RPC answer is returned unchanged."""
    if content_type is not None and "text/event-stream" in content_type.lower():
        parser = SseParser(max_event_bytes=None)
        out = bytearray()
        for event in (*parser.feed(answer), *parser.close_events()):
            doc = event.json()
            if is_response(doc):
                doc = {**doc, "id": msg_id}
                out += serialize(orjson.dumps(doc).decode(), event=event.event, id=event.id,
                                 retry=event.retry)
            else:
                out += event.raw
        out += parser.tail()
        return bytes(out)
    try:
        doc = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return answer
    if not is_response(doc):
        return answer
    return _dumps({**doc, "id": msg_id})


def is_response(doc: Any) -> bool:
    """Whether ``doc`` is a JSON-RPC response (an id and a result or an error)."""
    return isinstance(doc, dict) and doc.get("jsonrpc") == "2.0" and "id" in doc \
        and "method" not in doc and ("result" in doc or "error" in doc)


def fingerprint_input(msg: McpMessage) -> bytes:
    """What a tool call's idempotency fingerprint covers besides the mapped tool: the MCP
    tool name and the canonical ``params.arguments``, never the JSON-RPC id or ``_meta``
    (a client changes both on every retry). Pass it as the canonical body to
    ``proxy.canonical.fingerprint``."""
    return canonical_json({"name": msg.tool_name, "arguments": dict(msg.arguments or {})})


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What the outcome record of a tool call says about the upstream's answer."""

    response_sha256: str  # over the canonical result (or error); the id is left out
    is_error: bool  # a JSON-RPC error, or a result with isError: true


def call_outcome(response: Mapping[str, Any]) -> CallOutcome:
    """Digest and error flag of a tool call's JSON-RPC response (as parsed by orjson,
    so it always has a canonical form)."""
    if "error" in response:
        part: Any = {"error": response["error"]}
        is_error = True
    else:
        result = response.get("result")
        part = {"result": result}
        is_error = isinstance(result, dict) and result.get("isError") is True
    return CallOutcome(sha256_hex(canonical_json(part)), is_error)
