"""A short MCP client for the example: list the tools casf-proxy shows, call one.

    python examples/mcp/client.py --key demo-receptionist
    python examples/mcp/client.py --key demo-billing --call send_sms \\
        --args '{"patient_id": "p1", "message": "Your appointment is tomorrow"}'

It uses the official MCP Python SDK over streamable HTTP and sends the API
key as ``X-API-Key`` on every request. A denied call is a JSON-RPC error
(code -32010) whose ``data`` is casf-proxy's error envelope; the script
prints its decision and reason codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def run(url: str, key: str, tool: str, arguments: dict[str, Any],
              request_id: str | None) -> int:
    headers = {"X-API-Key": key}
    if request_id:
        headers["Idempotency-Key"] = request_id
    async with httpx2.AsyncClient(headers=headers) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        listed = await client.list_tools()
        print("tools shown:", ", ".join(t.name for t in listed.tools) or "(none)")
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            envelope = exc.data if isinstance(exc.data, dict) else {}
            print(f"{tool}: refused ({exc.code}) {envelope.get('decision', '')} "
                  f"{envelope.get('reason_codes', [])}: {exc.message}")
            return 1
        text = " ".join(one_line(getattr(c, "text", "")) for c in result.content)
        print(f"{tool}: {'error' if result.is_error else 'ok'}: {text}")
        return 1 if result.is_error else 0


def one_line(text: str) -> str:
    """A JSON text content (the SDK indents it) on one line; other text as it is."""
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/mcp")
    parser.add_argument("--key", default="demo-receptionist")
    parser.add_argument("--call", default="list_appointments", help="the tool to call")
    parser.add_argument("--args", default="{}", help="the tool's arguments as JSON")
    parser.add_argument("--request-id", help="an Idempotency-Key for the call")
    ns = parser.parse_args()
    sys.exit(asyncio.run(run(ns.url, ns.key, ns.call, json.loads(ns.args), ns.request_id)))


if __name__ == "__main__":
    main()
