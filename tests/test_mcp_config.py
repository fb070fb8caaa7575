"""proxy.mcp.config: the ``mcp:`` section, validated with errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import AttributeSpec
from proxy.mcp.config import McpAttribute, McpConfigError, McpTool, parse_mcp
from proxy.stages.attributes import resolve_pointer

ROOT = Path(__file__).resolve().parent.parent

CONTRACT_EXAMPLE = """
mcp:
  - path: /mcp
    tools:
      create_appointment:
        tool: cliniccloud.create_appointment
        effect: write
        attributes:
          subject.patient_id: {from: arguments, pointer: /patient_id}
      list_appointments: {tool: cliniccloud.list_appointments, effect: read}
    unknown_tools: deny            # deny (default) | allow
    deny_as: jsonrpc_error         # jsonrpc_error (default) | tool_error
"""


def test_the_documented_example_loads() -> None:
    [ep] = parse_mcp(yaml.safe_load(CONTRACT_EXAMPLE)["mcp"])
    assert ep.path == ep.upstream_path == "/mcp"
    assert ep.unknown_tools == "deny" and ep.deny_as == "jsonrpc_error"
    assert ep.methods == frozenset() and ep.list_query is None
    assert ep.require_request_id is False
    assert ep.tools["create_appointment"] == McpTool(
        "cliniccloud.create_appointment", "write",
        (McpAttribute("subject.patient_id", "/patient_id"),))
    assert ep.tools["list_appointments"] == McpTool("cliniccloud.list_appointments", "read")
    assert ep.tool_for("nope") is None and ep.resolve("nope") is None
    assert ep.lists("list_appointments") and not ep.lists("nope")


def test_every_key() -> None:
    [ep] = parse_mcp([{
        "path": "/agents/mcp", "upstream_path": "/mcp",
        "tools": {"send_sms": {"tool": "twilio.send_sms", "effect": "write",
                               "attributes": {"subject.patient_id": {
                                   "from": "arguments", "pointer": "/patient_id"},
                                   "args.message": {"from": "arguments",
                                                    "pointer": "/message"}},
                               "required": ["subject.patient_id"]}},
        "unknown_tools": "allow", "deny_as": "tool_error",
        "methods": ["resources/read", "prompts/*"], "list_query": "data.casf.visible",
        "require_request_id": True}])
    assert (ep.path, ep.upstream_path, ep.unknown_tools, ep.deny_as) == (
        "/agents/mcp", "/mcp", "allow", "tool_error")
    assert ep.methods == {"resources/read", "prompts/*"}
    assert ep.list_query == "data.casf.visible" and ep.require_request_id
    assert ep.tools["send_sms"].required == ("subject.patient_id",)
    assert ep.lists("anything")
    assert ep.resolve("send_sms") is ep.tools["send_sms"]
    assert ep.resolve("weather") == McpTool("weather", "write")
    assert ep.method_allowed("prompts/get") and ep.method_allowed("resources/read")
    assert not ep.method_allowed("resources/list")


def test_methods_as_a_mapping() -> None:
    [ep] = parse_mcp([{"path": "/mcp", "methods": {"resources/*": "allow",
                                                   "prompts/get": "deny"}}])
    assert ep.methods == {"resources/*"}


def test_expand_is_applied_to_strings() -> None:
    seen: list[str] = []

    def expand(value: str, path: str) -> str:
        seen.append(path)
        return value.replace("${P}", "/mcp")

    [ep] = parse_mcp([{"path": "${P}", "tools": {"t": {"tool": "x.t", "effect": "read"}}}],
                     expand=expand)
    assert ep.path == "/mcp" and "mcp[0].path" in seen


def test_absent_section_is_no_endpoint() -> None:
    assert parse_mcp(None) == ()


def test_attribute_specs_read_the_arguments_of_the_message() -> None:
    tool = McpTool("x.t", "write", (McpAttribute("subject.patient_id", "/patient_id"),
                                    McpAttribute("args.a~b", "/a~1b/0")))
    assert tool.attribute_specs() == (
        AttributeSpec("subject.patient_id", "body", "/params/arguments/patient_id"),
        AttributeSpec("args.a~b", "body", "/params/arguments/a~1b/0"))
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "t", "arguments": {"patient_id": "p1", "a/b": ["x"]}}}
    assert [resolve_pointer(message, s.name) for s in tool.attribute_specs()] == ["p1", "x"]


ERRORS: list[tuple[str, Any, str]] = [
    ("not a list", {"path": "/mcp"}, "mcp: expected a list of endpoints"),
    ("endpoint not a mapping", ["/mcp"], "mcp[0]: expected a mapping"),
    ("unknown endpoint key", [{"path": "/mcp", "route": 1}], "mcp[0].route: unknown key"),
    ("no path", [{}], "mcp[0].path: is required"),
    ("relative path", [{"path": "mcp"}], "mcp[0].path: 'mcp' is not a plain absolute path"),
    ("template path", [{"path": "/mcp/{x}"}], "mcp[0].path:"),
    ("dot segment", [{"path": "/a/../mcp"}], "mcp[0].path:"),
    ("path with a trailing newline", [{"path": "/mcp\n"}], "mcp[0].path:"),
    ("list_query with a trailing newline", [{"path": "/mcp", "list_query": "data.x\n"}],
     "mcp[0].list_query:"),
    ("method with a trailing newline", [{"path": "/mcp", "methods": ["a/b\n"]}],
     "mcp[0].methods[0]:"),
    ("bad upstream path", [{"path": "/mcp", "upstream_path": "x"}], "mcp[0].upstream_path:"),
    ("same path twice", [{"path": "/mcp"}, {"path": "/mcp"}],
     "mcp[1].path: '/mcp' is already the path of mcp[0]"),
    ("tools not a mapping", [{"path": "/mcp", "tools": ["a"]}],
     "mcp[0].tools: expected a mapping"),
    ("tool name with a newline", [{"path": "/mcp", "tools": {"a\nb": {}}}], "mcp[0].tools."),
    ("tool name too long", [{"path": "/mcp", "tools": {"x" * 129: {}}}], "is not an MCP tool"),
    ("tool without tool", [{"path": "/mcp", "tools": {"t": {"effect": "read"}}}],
     "mcp[0].tools.t.tool: is required"),
    ("tool without effect", [{"path": "/mcp", "tools": {"t": {"tool": "x"}}}],
     "mcp[0].tools.t.effect: is required"),
    ("bad effect", [{"path": "/mcp", "tools": {"t": {"tool": "x", "effect": "delete"}}}],
     "mcp[0].tools.t.effect: 'delete' is not an effect"),
    ("unknown tool key", [{"path": "/mcp", "tools": {"t": {"tool": "x", "effect": "read",
                                                           "method": "GET"}}}],
     "mcp[0].tools.t.method: unknown key"),
    ("unknown source", [{"path": "/mcp", "tools": {"create_appointment": {
        "tool": "x", "effect": "write", "attributes": {
            "subject.patient_id": {"from": "body", "pointer": "/patient_id"}}}}}],
     'mcp[0].tools.create_appointment.attributes.subject.patient_id.from: '
     'unknown source "body" (arguments)'),
    ("source missing", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "attributes": {
            "subject.patient_id": {"pointer": "/patient_id"}}}}}],
     "mcp[0].tools.t.attributes.subject.patient_id.from: is required"),
    ("name instead of pointer", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "attributes": {
            "subject.patient_id": {"from": "arguments", "name": "patient_id"}}}}}],
     "mcp[0].tools.t.attributes.subject.patient_id.name: unknown key"),
    ("pointer not a pointer", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "attributes": {
            "subject.patient_id": {"from": "arguments", "pointer": "patient_id"}}}}}],
     "mcp[0].tools.t.attributes.subject.patient_id.pointer: 'patient_id' is not a JSON "
     "pointer"),
    ("pointer with a bad escape", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "attributes": {
            "subject.patient_id": {"from": "arguments", "pointer": "/a~2"}}}}}],
     "pointer: '/a~2' is not a JSON pointer"),
    ("bad target", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "attributes": {
            "patient_id": {"from": "arguments", "pointer": "/patient_id"}}}}}],
     "mcp[0].tools.t.attributes.patient_id: attribute target must be"),
    ("required not an attribute", [{"path": "/mcp", "tools": {"t": {
        "tool": "x", "effect": "write", "required": ["subject.patient_id"]}}}],
     "mcp[0].tools.t.required[0]: 'subject.patient_id' is not one of this tool's attributes"),
    ("bad unknown_tools", [{"path": "/mcp", "unknown_tools": "pass"}],
     "mcp[0].unknown_tools: 'pass' is not one of deny, allow"),
    ("bad deny_as", [{"path": "/mcp", "deny_as": "http"}],
     "mcp[0].deny_as: 'http' is not one of jsonrpc_error, tool_error"),
    ("methods not a list", [{"path": "/mcp", "methods": "resources/read"}],
     "mcp[0].methods: expected a list"),
    ("method not a string", [{"path": "/mcp", "methods": [5]}],
     "mcp[0].methods[0]: expected a method name"),
    ("method malformed", [{"path": "/mcp", "methods": ["resources read"]}],
     "mcp[0].methods[0]: 'resources read' is not a JSON-RPC method name"),
    ("method tools/call", [{"path": "/mcp", "methods": ["tools/call"]}],
     "mcp[0].methods[0]: 'tools/call' is decided by the tool map"),
    ("method tools/*", [{"path": "/mcp", "methods": ["tools/*"]}], "decided by the tool map"),
    ("method ping", [{"path": "/mcp", "methods": ["ping"]}],
     "mcp[0].methods[0]: 'ping' always passes"),
    ("method as a mapping with a bad value", [{"path": "/mcp", "methods": {"x/y": "yes"}}],
     "mcp[0].methods.x/y: 'yes' is not one of allow, deny"),
    ("list_query not a query", [{"path": "/mcp", "list_query": "visible"}],
     "mcp[0].list_query: 'visible' is not a Rego query"),
    ("require_request_id not a bool", [{"path": "/mcp", "require_request_id": "maybe"}],
     "mcp[0].require_request_id: expected true or false"),
    ("path not a string", [{"path": 5}], "mcp[0].path: expected a string, got int"),
]


@pytest.mark.parametrize(("raw", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_key(raw: Any, message: str) -> None:
    with pytest.raises(McpConfigError) as info:
        parse_mcp(raw)
    assert str(info.value).startswith(message) or message in str(info.value), str(info.value)
    assert str(info.value).startswith(info.value.path + ": ")


def test_the_example_config_section_loads() -> None:
    doc = yaml.safe_load((ROOT / "examples/mcp/casf.yaml").read_text())
    [ep] = parse_mcp(doc["mcp"])
    assert ep.path == "/mcp" and ep.deny_as == "jsonrpc_error"
    assert ep.list_query == "data.casf.visible"
    want = {"list_appointments": ("cliniccloud.list_appointments", "read"),
            "create_appointment": ("cliniccloud.create_appointment", "write"),
            "cancel_appointment": ("cliniccloud.cancel_appointment", "write"),
            "summary_history": ("cliniccloud.summary_history", "read"),
            "send_sms": ("twilio.send_sms", "write"),
            "generate_invoice": ("stripe.generate_invoice", "write")}
    assert {n: (t.tool, t.effect) for n, t in ep.tools.items()} == want
    assert ep.tools["send_sms"].required == ("subject.patient_id",)


def _rules(path: Path) -> str:
    """The file without its leading comment block."""
    lines = path.read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def test_the_example_policy_is_the_clinic_policy_plus_visible() -> None:
    clinic, mcp = ROOT / "examples/clinic/policies", ROOT / "examples/mcp/policies"
    for name in ("casf.rego", "casf_test.rego"):
        # when the clinic policy changes, copy it here again (keeping the additions)
        assert _rules(mcp / name).startswith(_rules(clinic / name)), name
    added = _rules(mcp / "casf.rego")[len(_rules(clinic / "casf.rego")):]
    assert "visible if role_permitted" in added and "allow" not in added


def test_the_example_policy_tests_pass() -> None:
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "policy", "test",
                          str(ROOT / "examples/mcp/policies"), "-v"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_receptionist_sees_exactly_its_tools" in res.stdout
    assert "FAIL" not in res.stdout
