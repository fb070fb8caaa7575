"""Filtering ``tools/list`` answers: an agent is shown only what it may call (pure).

A tool stays in the list when the endpoint maps it (or ``unknown_tools:
allow``) and the ``visible`` predicate says so (the front door evaluates
the endpoint's ``list_query`` for the caller and each candidate first:
:func:`candidates` names them). Everything else in the result
(``nextCursor``, ``_meta``, ``ttlMs``, ...) and in each kept tool is
preserved; an entry that is not an object with a string ``name`` is
dropped, since nothing could be decided about it.

The answer is either one JSON body (:func:`filter_json_answer`) or one
event of an SSE stream (:func:`filter_sse_event`); other events and
JSON-RPC errors pass unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.mcp.config import McpEndpoint, McpTool
from proxy.mcp.protocol import INTERNAL_ERROR, JsonRpcId, is_response
from proxy.mcp.sse import SseEvent

Visible = Callable[[str], bool]


def _tools(result: Any) -> list[Any] | None:
    tools = result.get("tools") if isinstance(result, dict) else None
    return tools if isinstance(tools, list) else None


def _name(tool: Any) -> str | None:
    name = tool.get("name") if isinstance(tool, dict) else None
    return name if isinstance(name, str) else None


def candidates(result: Any, endpoint: McpEndpoint) -> tuple[str, ...]:
    """The tool names of a ``tools/list`` result the endpoint may list at all
    (mapped, or any with ``unknown_tools: allow``), in order, without repeats."""
    out: dict[str, None] = {}
    for tool in _tools(result) or ():
        name = _name(tool)
        if name is not None and endpoint.lists(name):
            out[name] = None
    return tuple(out)


def visibility_input(list_input: Mapping[str, Any], tool: McpTool) -> dict[str, Any]:
    """The ``list_query`` input for one listed tool: the policy input of the
    ``tools/list`` message (caller, mode, context, request) with the tool's
    ``tool`` and ``effect`` and without subject or arguments, i.e. what a call
    of that tool would be decided on before its arguments are known."""
    return {**list_input, "tool": tool.tool, "effect": tool.effect, "subject": {}, "args": {}}


def filter_result(result: Any, endpoint: McpEndpoint, visible: Visible) -> Any:
    """The ``tools/list`` result with only the tools the caller may see.

    A result without a ``tools`` list is returned as it is (it lists nothing).
    """
    tools = _tools(result)
    if tools is None:
        return result
    kept = [t for t in tools
            if (n := _name(t)) is not None and endpoint.lists(n) and visible(n)]
    return {**result, "tools": kept}


def filter_response(doc: Any, endpoint: McpEndpoint, visible: Visible) -> Any:
    """A JSON-RPC response to ``tools/list`` with its result filtered (errors unchanged)."""
    if is_response(doc) and "result" in doc:
        return {**doc, "result": filter_result(doc["result"], endpoint, visible)}
    return doc


def response_result(body: bytes) -> Any:
    """The ``result`` of a JSON-RPC response body, for :func:`candidates` (None if none)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc.get("result") if is_response(doc) else None


def filter_json_answer(body: bytes, endpoint: McpEndpoint, visible: Visible,
                       msg_id: JsonRpcId = None) -> bytes:
    """An ``application/json`` answer to ``tools/list``, filtered.

    A body that is not a JSON-RPC response cannot be filtered, so it is never
    passed on: it becomes a JSON-RPC internal error (-32603) for ``msg_id``.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not is_response(doc):
        return orjson.dumps({"jsonrpc": "2.0", "id": msg_id,
                             "error": {"code": INTERNAL_ERROR,
                                       "message": "the upstream's tools/list answer is not a "
                                                  "JSON-RPC response, so no tool is shown"}})
    return orjson.dumps(filter_response(doc, endpoint, visible))


def sse_result(event: SseEvent) -> Any:
    """The ``result`` of the JSON-RPC response an SSE event carries (None if none)."""
    doc = event.json()
    return doc.get("result") if is_response(doc) else None


def filter_sse_event(event: SseEvent, endpoint: McpEndpoint, visible: Visible) -> bytes:
    """The bytes to pass on for one event of a ``tools/list`` answer stream: a
    response event re-serialised with its result filtered, anything else as it came."""
    doc = event.json()
    if not is_response(doc):
        return event.raw
    return event.with_data(orjson.dumps(filter_response(doc, endpoint, visible)).decode()).raw
