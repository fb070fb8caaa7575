"""The MCP example's server: the clinic's tools over MCP streamable HTTP.

Run it with ``python examples/mcp/server.py --port PORT``; the MCP endpoint
is ``/mcp``. It is built with the official MCP Python SDK (``MCPServer``)
and trusts whatever reaches it: casf-proxy in front of it does the
enforcing. The tools are the clinic example's, under their short names and
with its arguments; all data is synthetic and kept in memory.

``summary_history`` reports progress (notifications before its result) when
the caller asks for it with a progress token. ``patient_id`` is mirrored
into the ``Mcp-Param-PatientId`` header by 2026-07-28 clients
(``x-mcp-header``), so the mirrored-header checks can be exercised.

Test hooks, on the server's own port and never behind the proxy:
``GET /_seen`` lists every HTTP request the MCP endpoint received (HTTP
method, JSON-RPC method, tool name, id, the names of its ``Mcp-*``
headers) and every tool that ran with its
arguments; ``DELETE /_seen`` clears both; ``PUT /_delay`` with
``{"ms": N}`` (at most 10000) makes every tool call wait N ms first, so a
call can be kept in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HISTORY: dict[str, list[dict[str, str]]] = {
    "p1": [{"date": "2026-01-10", "note": "synthetic: routine check-up"},
           {"date": "2026-02-14", "note": "synthetic: blood test"}],
    "p2": [{"date": "2026-03-02", "note": "synthetic: follow-up visit"}],
}
MAX_SEEN = 10_000

PatientId = Annotated[str, Field(description="the patient", json_schema_extra={
    "x-mcp-header": "PatientId"})]


class State:
    """The server's in-memory data and what the test hooks report."""

    def __init__(self) -> None:
        self.appointments: dict[str, dict[str, str]] = {}
        self.ids = itertools.count(1)
        self.sms: list[dict[str, str]] = []
        self.invoices: list[dict[str, Any]] = []
        self.requests: deque[dict[str, Any]] = deque(maxlen=MAX_SEEN)
        self.calls: deque[dict[str, Any]] = deque(maxlen=MAX_SEEN)
        self.delay_ms = 0

    async def ran(self, tool: str, arguments: dict[str, Any]) -> None:
        self.calls.append({"tool": tool, "arguments": arguments})
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)


def build(state: State) -> MCPServer:
    mcp = MCPServer("clinic", version="1.0.0",
                    instructions="Synthetic clinic tools (casf-proxy MCP example).")

    @mcp.tool(description="The most recent appointments, optionally for one patient.")
    async def list_appointments(patient_id: str | None = None) -> dict[str, Any]:
        await state.ran("list_appointments", {"patient_id": patient_id})
        items = [a for a in state.appointments.values()
                 if patient_id is None or a["patient_id"] == patient_id]
        return {"appointments": items[-50:]}

    @mcp.tool(description="Book an appointment slot for a patient.")
    async def create_appointment(patient_id: PatientId, slot: str) -> dict[str, str]:
        await state.ran("create_appointment", {"patient_id": patient_id, "slot": slot})
        ident = f"a-{next(state.ids)}"
        appt = {"id": ident, "patient_id": patient_id, "slot": slot}
        state.appointments[ident] = appt
        return appt

    @mcp.tool(description="Cancel an appointment.")
    async def cancel_appointment(appointment_id: str) -> dict[str, str]:
        await state.ran("cancel_appointment", {"appointment_id": appointment_id})
        if state.appointments.pop(appointment_id, None) is None:
            raise ValueError(f"no appointment {appointment_id}")
        return {"cancelled": appointment_id}

    @mcp.tool(description="A patient's visit history, summarised (reports progress).")
    async def summary_history(patient_id: PatientId, ctx: Context) -> dict[str, Any]:
        await state.ran("summary_history", {"patient_id": patient_id})
        visits = HISTORY.get(patient_id, [])
        for done in range(1, len(visits) + 2):
            await ctx.report_progress(done, len(visits) + 1, "reading the history")
        return {"patient_id": patient_id, "visits": len(visits), "history": visits}

    @mcp.tool(description="Send an SMS to a patient.")
    async def send_sms(patient_id: PatientId, message: str) -> dict[str, str]:
        await state.ran("send_sms", {"patient_id": patient_id, "message": message})
        state.sms.append({"patient_id": patient_id, "message": message})
        return {"status": "queued", "sms": str(len(state.sms))}

    @mcp.tool(description="Invoice a patient.")
    async def generate_invoice(patient_id: PatientId, amount_cents: int) -> dict[str, Any]:
        await state.ran("generate_invoice", {"patient_id": patient_id,
                                             "amount_cents": amount_cents})
        invoice = {"id": f"inv-{len(state.invoices) + 1}", "patient_id": patient_id,
                   "amount_cents": amount_cents}
        state.invoices.append(invoice)
        return invoice

    @mcp.custom_route("/_seen", methods=["GET", "DELETE"])
    async def seen(request: Request) -> Response:
        if request.method == "DELETE":
            state.requests.clear()
            state.calls.clear()
            return Response(status_code=204)
        return JSONResponse({"requests": list(state.requests), "calls": list(state.calls)})

    @mcp.custom_route("/_delay", methods=["PUT"])
    async def delay(request: Request) -> Response:
        try:
            ms = int((await request.json())["ms"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'body must be {"ms": N}'}, status_code=400)
        state.delay_ms = max(0, min(ms, 10_000))
        return JSONResponse({"ms": state.delay_ms})

    return mcp


def recorder(app: ASGIApp, state: State, path: str) -> ASGIApp:
    """Record every HTTP request to the MCP endpoint before the SDK sees it."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != path:
            await app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        names = sorted({k.decode("latin-1").lower() for k, _ in scope["headers"]
                        if k.lower().startswith(b"mcp-")})
        entry: dict[str, Any] = {"http_method": scope["method"], "method": None,
                                 "tool": None, "id": None, "mcp_headers": names}
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
            entry.update(method=doc.get("method"), id=doc.get("id"),
                         tool=params.get("name") if doc.get("method") == "tools/call" else None)
        state.requests.append(entry)
        pending = iter(messages)

        async def replay() -> Message:
            try:
                return next(pending)
            except StopIteration:
                return await receive()

        await app(scope, replay, send)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--json", action="store_true",
                        help="answer requests with application/json instead of SSE streams")
    parser.add_argument("--stateless", action="store_true",
                        help="no Mcp-Session-Id sessions for handshake-era clients")
    args = parser.parse_args()
    state = State()
    mcp = build(state)
    app = mcp.streamable_http_app(streamable_http_path="/mcp", json_response=args.json,
                                  stateless_http=args.stateless, host=args.host)
    uvicorn.run(recorder(app, state, "/mcp"), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
