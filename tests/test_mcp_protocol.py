"""proxy.mcp.protocol: message classes, mirrored headers, the answers the proxy writes."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.canonical import fingerprint
from proxy.mcp.config import parse_mcp
from proxy.mcp.protocol import (
    DENIED,
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    McpMessage,
    McpRejected,
    ParamBinding,
    bindings_from_list,
    call_outcome,
    check_headers,
    decode_header_value,
    deny_answer,
    fingerprint_input,
    parse_message,
    rejection_answer,
    tool_bindings,
    with_id,
)
from proxy.mcp.sse import SseParser
from proxy.reasons import Reason


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def call(name: Any = "send_sms", arguments: Any = None, msg_id: Any = 7,
         **params: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, **params}
    if arguments is not None:
        p["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": p}


# --------------------------------------------------------------- malformed messages

MALFORMED: list[tuple[str, bytes, int, str, Any]] = [
    ("empty body", b"", PARSE_ERROR, Reason.INVALID_JSON, None),
    ("whitespace", b"  \n", PARSE_ERROR, Reason.INVALID_JSON, None),
    ("not json", b"{jsonrpc: 2.0}", PARSE_ERROR, Reason.INVALID_JSON, None),
    ("truncated", b'{"jsonrpc":"2.0","id":1,"method":"ping"', PARSE_ERROR,
     Reason.INVALID_JSON, None),
    ("nan", b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}', PARSE_ERROR,
     Reason.INVALID_JSON, None),
    ("integer beyond 64 bits", b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":'
     + b"9" * 30 + b"}}", PARSE_ERROR, Reason.INVALID_JSON, None),
    ("too deep", b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b'{"a":' * 70
     + b"1" + b"}" * 71, PARSE_ERROR, Reason.INVALID_JSON, None),
    ("batch", b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', INVALID_REQUEST,
     Reason.MCP_BATCH_NOT_ALLOWED, None),
    ("empty batch", b"[]", INVALID_REQUEST, Reason.MCP_BATCH_NOT_ALLOWED, None),
    ("batch with a duplicate key", b' [{"id":1,"id":2}]', INVALID_REQUEST,
     Reason.MCP_BATCH_NOT_ALLOWED, None),
    ("duplicate key", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}',
     INVALID_REQUEST, Reason.AMBIGUOUS_REQUEST, None),
    ("duplicate argument ignoring case", body(call(arguments={"patient_id": "p1"}))
     .replace(b'"patient_id":"p1"', b'"patient_id":"p1","Patient_Id":"p2"'),
     INVALID_REQUEST, Reason.AMBIGUOUS_REQUEST, None),
    ("a string", b'"tools/call"', INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("a number", b"1", INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("no jsonrpc", body({"id": 1, "method": "ping"}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("jsonrpc 1.0", body({"jsonrpc": "1.0", "id": 1, "method": "ping"}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("jsonrpc as a number", body({"jsonrpc": 2.0, "id": "a", "method": "ping"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, "a"),
    ("no method", body({"jsonrpc": "2.0", "id": 1}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("a response", body({"jsonrpc": "2.0", "id": 3, "result": {}}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 3),
    ("an error response", body({"jsonrpc": "2.0", "id": 3, "error": {"code": 1}}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, 3),
    ("method a number", body({"jsonrpc": "2.0", "id": 1, "method": 5}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("method null", body({"jsonrpc": "2.0", "id": 1, "method": None}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("method empty", body({"jsonrpc": "2.0", "id": 1, "method": ""}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, 1),
    ("method with a newline", body({"jsonrpc": "2.0", "id": 1, "method": "tools/call\n"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, 1),
    ("method with a space", body({"jsonrpc": "2.0", "id": 1, "method": "tools/call "}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, 1),
    ("method not ascii", body({"jsonrpc": "2.0", "id": 1, "method": "tööls/call"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, 1),
    ("id null", body({"jsonrpc": "2.0", "id": None, "method": "ping"}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, None),
    ("id a bool", body({"jsonrpc": "2.0", "id": True, "method": "ping"}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, None),
    ("id a float", body({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}), INVALID_REQUEST,
     Reason.MCP_INVALID_MESSAGE, None),
    ("id an object", body({"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("id with a control character", body({"jsonrpc": "2.0", "id": "a\x00", "method": "ping"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("id too long", body({"jsonrpc": "2.0", "id": "x" * 256, "method": "ping"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("tools/call as a notification", body({"jsonrpc": "2.0", "method": "tools/call",
                                           "params": {"name": "send_sms"}}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("tools/list as a notification", body({"jsonrpc": "2.0", "method": "tools/list"}),
     INVALID_REQUEST, Reason.MCP_INVALID_MESSAGE, None),
    ("params an array", body({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}),
     INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 1),
    ("tools/call without params", body({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}),
     INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 1),
    ("tools/call without a name", body({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                        "params": {"arguments": {}}}),
     INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 1),
    ("name a number", body(call(name=5)), INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 7),
    ("name null", body(call(name=None)), INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 7),
    ("name empty", body(call(name="")), INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, 7),
    ("name with a newline", body(call(name="send_sms\n")), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("name with NUL", body(call(name="send\x00sms")), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("name with DEL", body(call(name="send\x7fsms")), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("name too long", body(call(name="x" * 257)), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("arguments an array", body(call(arguments=["p1"])), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("arguments a string", body(call(arguments="p1")), INVALID_PARAMS,
     Reason.MCP_INVALID_PARAMS, 7),
    ("arguments null", body(call(msg_id="r", arguments=None) | {"params": {
        "name": "x", "arguments": None}}), INVALID_PARAMS, Reason.MCP_INVALID_PARAMS, "r"),
]


@pytest.mark.parametrize(("raw", "code", "reason", "msg_id"),
                         [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_messages_are_refused(raw: bytes, code: int, reason: str, msg_id: Any) -> None:
    with pytest.raises(McpRejected) as info:
        parse_message(raw)
    exc = info.value
    assert (exc.code, exc.reason, exc.id, exc.status) == (code, reason, msg_id, 400)


def test_refusal_body_is_a_jsonrpc_error_with_the_envelope() -> None:
    with pytest.raises(McpRejected) as info:
        parse_message(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    envelope = {"decision": "DENY", "status": 400, "reason_codes": ["Mcp_BatchNotAllowed"],
                "message": info.value.message, "tool": None}
    status, raw = rejection_answer(info.value, envelope)
    assert status == 400
    assert orjson.loads(raw) == {"jsonrpc": "2.0", "id": None, "error": {
        "code": INVALID_REQUEST, "message": info.value.message, "data": envelope}}


# --------------------------------------------------------------- classification

CLASSES = [
    ("tools/call", "tool_call"), ("tools/list", "tool_list"), ("initialize", "lifecycle"),
    ("server/discover", "lifecycle"), ("ping", "lifecycle"),
    ("notifications/initialized", "lifecycle"), ("notifications/cancelled", "lifecycle"),
    ("resources/list", "other"), ("resources/read", "other"), ("prompts/get", "other"),
    ("completion/complete", "other"), ("logging/setLevel", "other"),
    ("subscriptions/listen", "other"), ("tools/anything", "other"), ("Ping", "other"),
]


@pytest.mark.parametrize(("method", "kind"), CLASSES)
def test_methods_are_classified(method: str, kind: str) -> None:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "id": "x", "method": method}
    if method == "tools/call":
        doc["params"] = {"name": "t"}
    msg = parse_message(body(doc))
    assert (msg.kind, msg.method, msg.id, msg.is_notification) == (kind, method, "x", False)
    if kind != "tool_call":
        assert msg.audit_tool() == f"mcp.{method}"


def test_a_tool_call_carries_name_and_arguments() -> None:
    msg = parse_message(body(call(arguments={"patient_id": "p1", "message": "hi"})))
    assert msg.kind == "tool_call" and msg.tool_name == "send_sms"
    assert msg.arguments == {"patient_id": "p1", "message": "hi"}
    assert msg.id == 7 and msg.id_text == "7"
    without = parse_message(body(call()))
    assert without.arguments == {}


def test_notifications_have_no_id() -> None:
    msg = parse_message(body({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    assert msg.is_notification and msg.id is None and msg.id_text is None
    assert msg.kind == "lifecycle"


ENDPOINT = parse_mcp([{"path": "/mcp", "tools": {
    "send_sms": {"tool": "twilio.send_sms", "effect": "write"}},
    "methods": ["resources/read", "prompts/*"]}])[0]


@pytest.mark.parametrize(("method", "allowed"), [
    ("initialize", True), ("ping", True), ("server/discover", True),
    ("notifications/progress", True), ("resources/read", True), ("resources/list", False),
    ("prompts/get", True), ("prompts/list", True), ("promptsX/get", False),
    ("completion/complete", False), ("logging/setLevel", False),
])
def test_methods_without_a_tool(method: str, allowed: bool) -> None:
    msg = parse_message(body({"jsonrpc": "2.0", "id": 1, "method": method}))
    assert msg.allowed_without_tool(ENDPOINT) is allowed


# --------------------------------------------------------------- mirrored headers

SMS = parse_message(body(call(arguments={"patient_id": "p1", "message": "hello",
                                         "count": 42, "urgent": True,
                                         "nested": {"region": "eu-west"}})))
BINDINGS = {
    "patientid": ParamBinding("PatientId", ("patient_id",), "string"),
    "count": ParamBinding("Count", ("count",), "integer"),
    "urgent": ParamBinding("Urgent", ("urgent",), "boolean"),
    "region": ParamBinding("Region", ("nested", "region"), "string"),
    "absent": ParamBinding("Absent", ("not_there",), "string"),
}


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


OK_HEADERS: list[tuple[str, list[tuple[str, str]]]] = [
    ("none", []),
    ("method", [("Mcp-Method", "tools/call")]),
    ("method lower case name", [("mcp-method", "tools/call")]),
    ("method upper case name", [("MCP-METHOD", "tools/call")]),
    ("method with surrounding blanks", [("Mcp-Method", " tools/call\t")]),
    ("name", [("Mcp-Name", "send_sms")]),
    ("name base64", [("Mcp-Name", b64("send_sms"))]),
    ("params", [("Mcp-Param-PatientId", "p1"), ("Mcp-Param-Count", "42"),
                ("Mcp-Param-Urgent", "true"), ("Mcp-Param-Region", "eu-west")]),
    ("param name in another case", [("mcp-param-patientid", "p1")]),
    ("param base64", [("Mcp-Param-PatientId", b64("p1"))]),
    ("integer compared numerically", [("Mcp-Param-Count", "42.0")]),
    ("unknown param forwarded", [("Mcp-Param-Other", "anything")]),
    ("other headers", [("Content-Type", "application/json"), ("X-API-Key", "k")]),
    ("protocol version without body version", [("MCP-Protocol-Version", "2025-06-18")]),
]


@pytest.mark.parametrize("headers", [h for _, h in OK_HEADERS],
                         ids=[n for n, _ in OK_HEADERS])
def test_matching_headers_pass(headers: list[tuple[str, str]]) -> None:
    check_headers(SMS, headers, BINDINGS)


BAD_HEADERS: list[tuple[str, list[tuple[str, str]]]] = [
    ("method differs", [("Mcp-Method", "tools/list")]),
    ("method differs in case", [("Mcp-Method", "Tools/Call")]),
    ("method with underscore name", [("Mcp_Method", "tools/list")]),
    ("method base64 is not decoded", [("Mcp-Method", b64("tools/call"))]),
    ("method twice", [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/call")]),
    ("method twice, other case", [("Mcp-Method", "tools/call"), ("mcp-method", "tools/call")]),
    ("method twice, underscore", [("Mcp-Method", "tools/call"), ("Mcp_Method", "tools/call")]),
    ("name differs", [("Mcp-Name", "generate_invoice")]),
    ("name differs in case", [("Mcp-Name", "Send_Sms")]),
    ("name base64 differs", [("Mcp-Name", b64("generate_invoice"))]),
    ("name base64 malformed", [("Mcp-Name", "=?base64?not base64!?=")]),
    ("name base64 with a trailing newline", [("Mcp-Name", "=?base64?c2VuZF9zbXM=\n?=")]),
    ("integer with a trailing newline", [("Mcp-Param-Count", "42\n")]),
    ("name base64 not canonical", [("Mcp-Name", "=?base64?c2VuZF9zbXN=?=")]),
    ("name base64 not utf-8", [("Mcp-Name", "=?base64?" + base64.b64encode(b"\xff").decode()
                                + "?=")]),
    ("name non-ascii", [("Mcp-Name", "send_smś")]),
    ("name with a control character", [("Mcp-Name", "send\x01sms")]),
    ("param differs", [("Mcp-Param-PatientId", "p2")]),
    ("param base64 differs", [("Mcp-Param-PatientId", b64("p2"))]),
    ("param base64 of the sentinel itself", [("Mcp-Param-PatientId", b64(b64("p1")))]),
    ("param name in another case differs", [("MCP-PARAM-PATIENTID", "p2")]),
    ("param with underscore name", [("Mcp_Param_PatientId", "p2")]),
    ("param twice", [("Mcp-Param-PatientId", "p1"), ("mcp-param-patientid", "p1")]),
    ("integer differs", [("Mcp-Param-Count", "41")]),
    ("integer with a fraction", [("Mcp-Param-Count", "42.5")]),
    ("boolean differs", [("Mcp-Param-Urgent", "false")]),
    ("boolean spelled differently", [("Mcp-Param-Urgent", "True")]),
    ("nested param differs", [("Mcp-Param-Region", "us-east")]),
    ("param for an absent argument", [("Mcp-Param-Absent", "x")]),
    ("param with a newline", [("Mcp-Param-PatientId", "p1\n")]),
    ("param non-ascii", [("Mcp-Param-PatientId", "p1é")]),
]


@pytest.mark.parametrize("headers", [h for _, h in BAD_HEADERS],
                         ids=[n for n, _ in BAD_HEADERS])
def test_mismatching_headers_are_refused(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(McpRejected) as info:
        check_headers(SMS, headers, BINDINGS)
    exc = info.value
    assert (exc.code, exc.reason, exc.status, exc.id) == (
        HEADER_MISMATCH, Reason.MCP_HEADER_MISMATCH, 400, 7)
    for _, value in headers:  # header values may carry patient data: never echoed
        assert value.strip() not in exc.message or value.strip() in ("tools/call",)


def test_param_headers_are_unchecked_without_the_tools_schema() -> None:
    check_headers(SMS, [("Mcp-Param-PatientId", "p2")], None)
    check_headers(SMS, [("Mcp-Param-PatientId", "p2")], {})


def test_a_2026_call_must_mirror_every_annotated_argument() -> None:
    version = [("MCP-Protocol-Version", "2026-07-28")]
    with pytest.raises(McpRejected) as info:
        check_headers(SMS, version, BINDINGS)
    assert info.value.code == HEADER_MISMATCH
    full = [("Mcp-Param-PatientId", "p1"), ("Mcp-Param-Count", "42"),
            ("Mcp-Param-Urgent", "true"), ("Mcp-Param-Region", "eu-west")]
    check_headers(SMS, version + full, BINDINGS)
    # an older client never mirrors: missing headers are not its fault
    check_headers(SMS, [("MCP-Protocol-Version", "2025-11-25")], BINDINGS)


def test_name_header_for_other_methods() -> None:
    read = parse_message(body({"jsonrpc": "2.0", "id": 1, "method": "resources/read",
                               "params": {"uri": "file:///a b"}}))
    check_headers(read, [("Mcp-Name", b64("file:///a b"))])
    with pytest.raises(McpRejected):
        check_headers(read, [("Mcp-Name", "file:///other")])
    ping = parse_message(body({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    with pytest.raises(McpRejected):  # a name the body does not have
        check_headers(ping, [("Mcp-Name", "x")])


def test_protocol_version_header_must_match_the_body() -> None:
    msg = parse_message(body(call(_meta={
        "io.modelcontextprotocol/protocolVersion": "2026-07-28"})))
    check_headers(msg, [("MCP-Protocol-Version", "2026-07-28")])
    with pytest.raises(McpRejected) as info:
        check_headers(msg, [("mcp-protocol-version", "2025-11-25")])
    assert info.value.code == HEADER_MISMATCH


@pytest.mark.parametrize(("value", "decoded"), [
    ("us-west1", "us-west1"),
    ("=?base64?SGVsbG8sIOS4lueVjA==?=", "Hello, 世界"),
    ("=?base64?IHBhZGRlZCA=?=", " padded "),
    ("=?base64?bGluZTEKbGluZTI=?=", "line1\nline2"),
    ("=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=", "=?base64?literal?="),
    ("=?base64??=", ""),
    ("=?BASE64?SGk=?=", "=?BASE64?SGk=?="),  # markers are case-sensitive: not encoded
    ("=?base64?SGk=", "=?base64?SGk="),
    ("=?base64?SGk?=", None),  # missing padding
    ("=?base64?S-k=?=", None),
])
def test_base64_header_values(value: str, decoded: str | None) -> None:
    assert decode_header_value(value) == decoded


def test_bindings_come_from_the_tool_definitions() -> None:
    tools = {"tools": [
        {"name": "ok", "inputSchema": {"type": "object", "properties": {
            "patient_id": {"type": "string", "x-mcp-header": "PatientId"},
            "where": {"type": "object", "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"}}},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "data": {"type": "string", "default": {"x-mcp-header": "NotASchema"}},
        }}},
        {"name": "none", "inputSchema": {"type": "object", "properties": {"a": {}}}},
        {"name": "number", "inputSchema": {"properties": {
            "x": {"type": "number", "x-mcp-header": "X"}}}},
        {"name": "in-items", "inputSchema": {"properties": {"xs": {
            "type": "array", "items": {"type": "string", "x-mcp-header": "X"}}}}},
        {"name": "in-anyof", "inputSchema": {"anyOf": [{"properties": {
            "x": {"type": "string", "x-mcp-header": "X"}}}]}},
        {"name": "repeated", "inputSchema": {"properties": {
            "a": {"type": "string", "x-mcp-header": "Same"},
            "b": {"type": "string", "x-mcp-header": "same"}}}},
        {"name": "not-a-token", "inputSchema": {"properties": {
            "a": {"type": "string", "x-mcp-header": "Two words"}}}},
        {"name": "at-root", "inputSchema": {"type": "string", "x-mcp-header": "Root"}},
        {"inputSchema": {}},
    ]}
    got = bindings_from_list(tools)
    assert got == {
        "ok": {"patientid": ParamBinding("PatientId", ("patient_id",), "string"),
               "region": ParamBinding("Region", ("where", "region"), "string"),
               "n": ParamBinding("N", ("n",), "integer")},
        "none": {},
    }
    assert tool_bindings({"name": "x"}) == {}


def test_the_example_servers_schema_binds_patient_id() -> None:
    # the inputSchema the MCP SDK publishes for examples/mcp/server.py's send_sms
    send_sms = {"name": "send_sms", "inputSchema": {
        "type": "object", "title": "send_smsArguments", "required": ["patient_id", "message"],
        "properties": {"patient_id": {"description": "the patient", "title": "Patient Id",
                                      "type": "string", "x-mcp-header": "PatientId"},
                       "message": {"title": "Message", "type": "string"}}}}
    assert tool_bindings(send_sms) == {
        "patientid": ParamBinding("PatientId", ("patient_id",), "string")}


# --------------------------------------------------------------- answers

ENVELOPE = {"decision": "DENY", "status": 403, "reason_codes": ["Policy_Denied", "Inv_X"],
            "message": "denied by policy", "tool": "twilio.send_sms", "request_id": "r1",
            "trace_id": "t", "policy_hash": "sha256:x"}


def test_deny_as_jsonrpc_error() -> None:
    status, raw = deny_answer(SMS, ENVELOPE, ENDPOINT)
    assert status == 403
    assert orjson.loads(raw) == {"jsonrpc": "2.0", "id": 7, "error": {
        "code": DENIED, "message": "denied by policy", "data": ENVELOPE}}


def test_deny_as_jsonrpc_error_keeps_the_envelope_status() -> None:
    limited = {**ENVELOPE, "status": 429, "retry_after": 30,
               "reason_codes": ["RateLimit_Exceeded"]}
    status, raw = deny_answer(SMS, limited, ENDPOINT)
    assert status == 429 and orjson.loads(raw)["error"]["data"]["retry_after"] == 30


def test_deny_as_tool_error() -> None:
    endpoint = parse_mcp([{"path": "/mcp", "deny_as": "tool_error"}])[0]
    status, raw = deny_answer(SMS, {**ENVELOPE, "retry_after": 5}, endpoint)
    doc = orjson.loads(raw)
    assert status == 200 and doc["id"] == 7 and "error" not in doc
    result = doc["result"]
    assert result["isError"] is True and result["resultType"] == "complete"
    assert result["_meta"] == {"casf": {**ENVELOPE, "retry_after": 5}}
    [content] = result["content"]
    assert content["type"] == "text"
    assert "Policy_Denied" in content["text"] and "Inv_X" in content["text"]
    assert "denied by policy" in content["text"] and "5" in content["text"]
    # a method other than tools/call has no tool result: the JSON-RPC error it is
    ping = parse_message(body({"jsonrpc": "2.0", "id": "p", "method": "resources/list"}))
    status, raw = deny_answer(ping, ENVELOPE, endpoint)
    assert status == 403 and orjson.loads(raw)["error"]["code"] == DENIED


def test_deny_of_a_notification_has_a_null_id() -> None:
    note = parse_message(body({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    _, raw = deny_answer(note, ENVELOPE, ENDPOINT)
    assert orjson.loads(raw)["id"] is None


STORED = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "ok"}],
                                                "isError": False}}


@pytest.mark.parametrize("new_id", ["retry-2", 99, None])
def test_replayed_json_answer_carries_the_retrys_id(new_id: Any) -> None:
    out = orjson.loads(with_id(body(STORED), "application/json", new_id))
    assert out == {**STORED, "id": new_id}


def test_replayed_sse_answer_carries_the_retrys_id() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": 1, "progress": 1}}
    stream = (b": keep-alive\r\n\r\n"
              b"event: message\r\ndata: " + body(progress) + b"\r\n\r\n"
              b"event: message\r\nid: ev-2\r\ndata: " + body(STORED) + b"\r\n\r\n")
    out = with_id(stream, "text/event-stream; charset=utf-8", "r-2")
    parser = SseParser()
    events = parser.feed(out)
    assert [e.json() for e in events] == [None, progress, {**STORED, "id": "r-2"}]
    assert events[0].raw == b": keep-alive\r\n\r\n"
    assert events[2].event == "message" and events[2].id == "ev-2"


@pytest.mark.parametrize("raw", [b"not json", b'{"jsonrpc":"2.0","method":"x"}', b"[]"])
def test_replay_leaves_other_bodies_alone(raw: bytes) -> None:
    assert with_id(raw, "application/json", 5) == raw


def test_fingerprint_covers_tool_and_arguments_never_the_id() -> None:
    a = parse_message(body(call(arguments={"patient_id": "p1", "message": "hi"}, msg_id=1,
                                _meta={"progressToken": 1})))
    b = parse_message(b'{"params":{"arguments":{"message":"hi","patient_id":"p1"},'
                      b'"name":"send_sms","_meta":{"progressToken":2}},'
                      b'"method":"tools/call","id":"other","jsonrpc":"2.0"}')
    c = parse_message(body(call(arguments={"patient_id": "p2", "message": "hi"})))
    d = parse_message(body(call(name="other", arguments={"patient_id": "p1", "message": "hi"})))
    assert fingerprint_input(a) == fingerprint_input(b)
    assert len({fingerprint_input(m) for m in (a, c, d)}) == 3

    def fp(m: McpMessage) -> str:
        return fingerprint("twilio.send_sms", "POST", "/mcp", fingerprint_input(m))

    assert fp(a) == fp(b) and fp(a) != fp(c)


def test_call_outcome() -> None:
    ok = call_outcome(STORED)
    assert not ok.is_error and len(ok.response_sha256) == 64
    assert call_outcome({**STORED, "id": 8}) == ok  # the id is not part of the digest
    failed = call_outcome({"jsonrpc": "2.0", "id": 7, "result": {"content": [],
                                                                 "isError": True}})
    assert failed.is_error and failed.response_sha256 != ok.response_sha256
    error = call_outcome({"jsonrpc": "2.0", "id": 7, "error": {"code": -32602,
                                                               "message": "x"}})
    assert error.is_error


# --------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "name",
                                       "arguments", "result", "x"]), children, max_size=5),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_refused(raw: bytes) -> None:
    try:
        parse_message(raw)
    except McpRejected as exc:
        assert exc.code in (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_any_json_parses_or_is_refused_with_a_readable_id(doc: Any) -> None:
    try:
        msg = parse_message(orjson.dumps(doc))
    except McpRejected as exc:
        assert exc.id is None or isinstance(exc.id, str | int)
        return
    assert isinstance(doc, dict) and doc["jsonrpc"] == "2.0"
    assert msg.method == doc["method"]
    if msg.kind == "tool_call":
        assert isinstance(msg.tool_name, str) and isinstance(msg.arguments, dict)
    check_headers(msg, [("Mcp-Method", msg.method)])
