"""The clinic example's tool backend: a small aiohttp app with in-memory data.

Run it with ``python examples/clinic/backend.py --port PORT``. It trusts
whatever reaches it; casf-proxy in front of it does the enforcing. Every
endpoint accepts a ``delay_ms`` query parameter (at most 10 s) so demos can
show a request that is still in flight.

All data is synthetic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections import Counter
from typing import Any

from aiohttp import web

HISTORY: dict[str, list[dict[str, str]]] = {
    "p1": [{"date": "2026-01-10", "note": "synthetic: routine check-up"}],
    "p2": [{"date": "2026-03-02", "note": "synthetic: follow-up visit"}],
}

APPOINTMENTS = web.AppKey("appointments", dict)
STATS = web.AppKey("stats", Counter)
IDS = web.AppKey("ids", itertools.count)


@web.middleware
async def delay_and_count(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[STATS][f"{request.method} {request.path}"] += 1
    delay = request.query.get("delay_ms", "")
    if delay.isdigit():
        await asyncio.sleep(min(int(delay), 10_000) / 1000)
    response: web.StreamResponse = await handler(request)
    return response


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text='{"error": "body must be JSON"}',
                                 content_type="application/json") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be an object"}',
                                 content_type="application/json")
    return data


def _missing(data: dict[str, Any], *names: str) -> web.Response | None:
    absent = [n for n in names if not data.get(n)]
    if absent:
        return web.json_response({"error": f"missing {', '.join(absent)}"}, status=400)
    return None


async def list_appointments(request: web.Request) -> web.Response:
    """The most recent appointments (at most ``limit``, default 50, newest last)."""
    limit = request.query.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        return web.json_response({"error": "limit must be 1..1000"}, status=400)
    patient = request.query.get("patient_id")
    items: list[dict[str, str]] = []
    for appt in reversed(request.app[APPOINTMENTS].values()):
        if not patient or appt["patient_id"] == patient:
            items.append(appt)
            if len(items) == int(limit):
                break
    return web.json_response({"appointments": items[::-1]})


async def create_appointment(request: web.Request) -> web.Response:
    data = await _json(request)
    bad = _missing(data, "patient_id", "slot")
    if bad is not None:
        return bad
    ident = f"a-{next(request.app[IDS])}"
    appt = {"id": ident, "patient_id": str(data["patient_id"]), "slot": str(data["slot"]),
            "status": "booked"}
    request.app[APPOINTMENTS][ident] = appt
    return web.json_response(appt, status=201)


async def cancel_appointment(request: web.Request) -> web.Response:
    ident = request.match_info["appointment_id"]
    appt = request.app[APPOINTMENTS].get(ident)
    if appt is None:
        return web.json_response({"error": "no such appointment"}, status=404)
    appt["status"] = "cancelled"
    return web.json_response({"id": ident, "status": "cancelled"})


async def summary_history(request: web.Request) -> web.Response:
    patient = request.match_info["patient_id"]
    return web.json_response({"patient_id": patient, "history": HISTORY.get(patient, [])})


async def send_sms(request: web.Request) -> web.Response:
    data = await _json(request)
    bad = _missing(data, "patient_id", "message")
    if bad is not None:
        return bad
    return web.json_response({"sid": f"sm-{next(request.app[IDS])}",
                              "patient_id": data["patient_id"]}, status=202)


async def generate_invoice(request: web.Request) -> web.Response:
    data = await _json(request)
    bad = _missing(data, "patient_id", "amount_cents")
    if bad is not None:
        return bad
    if not isinstance(data["amount_cents"], int):
        return web.json_response({"error": "amount_cents must be an integer"}, status=400)
    return web.json_response({"invoice_id": f"in-{next(request.app[IDS])}",
                              "amount_cents": data["amount_cents"]}, status=201)


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: three events 50 ms apart (shows unbuffered streaming)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(3):
        await resp.write(f"id: {i}\ndata: tick {i}\n\n".encode())
        await asyncio.sleep(0.05)
    await resp.write_eof()
    return resp


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(dict(request.app[STATS]))


def make_app() -> web.Application:
    app = web.Application(middlewares=[delay_and_count])
    app[APPOINTMENTS] = {}
    app[STATS] = Counter()
    app[IDS] = itertools.count(1)
    r = app.router
    r.add_get("/appointments", list_appointments)
    r.add_post("/appointments", create_appointment)
    r.add_delete("/appointments/{appointment_id}", cancel_appointment)
    r.add_get("/patients/{patient_id}/history", summary_history)
    r.add_post("/sms", send_sms)
    r.add_post("/invoices", generate_invoice)
    r.add_get("/events", events)
    r.add_get("/healthz", healthz)
    r.add_get("/_stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="clinic example tool backend")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None,
                print=lambda *_: print(f"clinic backend on http://{args.host}:{args.port}"),
                loop=loop_factory() if loop_factory else None)


if __name__ == "__main__":
    main()
