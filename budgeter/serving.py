"""Running long-lived processes: signals, aiohttp runners."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the process then drains and exits cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def upstream_session(settings: Any) -> aiohttp.ClientSession:
    """The process's one HTTP session, sized for ``settings.upstream_max_connections``
    calls in flight (aiohttp's default connector allows 100)."""
    limit = settings.upstream_max_connections
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit))


@asynccontextmanager
async def serve_app(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app`` on host:port (0 = a free port); yields the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = port
    server = site._server  # the only way aiohttp exposes the bound port
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])
    try:
        yield bound
    finally:
        await runner.cleanup()
