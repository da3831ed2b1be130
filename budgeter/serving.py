"""Running long-lived processes: signals, aiohttp runners."""

from __future__ import annotations

import asyncio
import errno
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


# the signals that set a stop event of this process (the CLI exits 130 after a SIGINT)
_stop_signals: set[int] = set()


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the process then drains and exits cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        _stop_signals.add(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def stopped_by_sigint() -> bool:
    """Whether a SIGINT (Ctrl-C) set a stop event of this process."""
    return signal.SIGINT in _stop_signals


class ListenError(OSError):
    """The socket could not be bound (``in_use``: the port is taken)."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host = host
        self.port = port

    @property
    def in_use(self) -> bool:
        return self.errno == errno.EADDRINUSE


def listen_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The process's one HTTP session, sized for ``settings.upstream_max_connections``
    calls in flight (aiohttp's default connector allows 100)."""
    limit = settings.upstream_max_connections
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit))


@asynccontextmanager
async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    port_file: Path | None = None,
    reuse_port: bool = False,
) -> AsyncIterator[int]:
    """Serve ``app`` on host:port (0 = a free port); yields the bound port, also written to
    ``port_file`` (when given) once the socket listens. ``reuse_port``: SO_REUSEPORT, so
    several processes can listen on one port (the kernel spreads connections)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(host, port, exc) from None
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
