"""Running long-lived processes: signals, aiohttp runners."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from budgeter.settings import Settings


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the process then drains and exits cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The process's one HTTP session, sized for ``settings.upstream_max_connections``
    calls in flight (aiohttp's default connector allows 100)."""
    limit = settings.upstream_max_connections
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit))


@asynccontextmanager
async def serve_app(
    app: web.Application, host: str, port: int, *, port_file: Path | None = None
) -> AsyncIterator[int]:
    """Serve ``app`` on host:port (0 = a free port); yields the bound port, also written to
    ``port_file`` (when given) once the socket listens."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = port
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes the port only here
    if sockets:
        bound = int(sockets[0].getsockname()[1])
    if port_file is not None:
        write_port_file(port_file, bound)
    try:
        yield bound
    finally:
        await runner.cleanup()


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` and a newline to ``path`` at once (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)
