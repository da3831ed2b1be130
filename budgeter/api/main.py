"""``budgeter api``: serve the HTTP API until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

from budgeter.api.app import create_app
from budgeter.serving import listen_url, serve_app, stop_event_on_signals
from budgeter.settings import Settings

log = logging.getLogger("budgeter.api")


async def run_api(
    settings: Settings, *, host: str, port: int, port_file: Path | None = None
) -> int:
    stop = stop_event_on_signals()
    async with serve_app(create_app(settings), host, port, port_file=port_file) as bound:
        log.info("listening on %s", listen_url(host, bound))
        await stop.wait()
    log.info("api stopped")
    return 0
