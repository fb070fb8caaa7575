"""A bare aiohttp pass-through proxy with no pipeline: the floor of any aiohttp proxy.

python bench/bare_proxy.py --port 8081 --upstream http://127.0.0.1:3000
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer",
       "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def make_app(upstream: str) -> web.Server:
    state: dict[str, aiohttp.ClientSession] = {}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        session = state.get("s")
        if session is None:
            session = state["s"] = aiohttp.ClientSession(auto_decompress=False)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(request.method, upstream + request.raw_path,
                                   data=body or None, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    return web.Server(handle)


async def main(port: int, upstream: str) -> None:
    runner = web.ServerRunner(make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"bare proxy on :{port} -> {upstream}", flush=True)
    await __import__("asyncio").Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--upstream", default="http://127.0.0.1:3000")
    a = p.parse_args()
    uvloop.run(main(a.port, a.upstream))
