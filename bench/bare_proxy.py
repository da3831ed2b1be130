"""Bench-only floor for the proxy row: a bare aiohttp pass-through proxy.

``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` are forwarded byte for byte
to ``BUDGETER_UPSTREAM_URL`` (with ``BUDGETER_UPSTREAM_API_KEY`` and
``anthropic-version: 2023-06-01``) and the upstream's status and body are answered. No
Redis, no auth, no JSON parsing, no retries. Everything else is what ``budgeter api``
uses: the same settings class, the same event loop (``BUDGETER_EVENT_LOOP``, uvloop by
default: :mod:`budgeter.cli.event_loop`), the same one ClientSession
(:func:`budgeter.serving.upstream_session`) and the same aiohttp runner
(:func:`budgeter.serving.serve_app`). What budgeter adds over this process is what
budgeter itself costs.

    .venv/bin/python bench/bare_proxy.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from budgeter.cli.event_loop import loop_factory
from budgeter.serving import serve_app, stop_event_on_signals, upstream_session
from budgeter.settings import Settings

SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTES = ("/v1/messages", "/v1/messages/count_tokens")


def create_app(settings: Settings) -> web.Application:
    base = settings.upstream_url.rstrip("/")
    headers = {
        "x-api-key": settings.upstream_api_key.get_secret_value(),
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        session = request.app[SESSION]
        async with session.post(base + request.path, data=body, headers=headers) as answer:
            raw = await answer.read()
            return web.Response(body=raw, status=answer.status, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = upstream_session(settings)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    for route in ROUTES:
        app.router.add_post(route, forward)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(settings: Settings, host: str, port: int) -> int:
    stop = stop_event_on_signals()
    async with serve_app(create_app(settings), host, port):
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings()
    factory, _name = loop_factory(settings.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(settings, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
