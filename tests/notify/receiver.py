"""A webhook receiver for the notification tests, run as its own process on loopback:
answers 500 to its first ``--fail-first`` requests, then 200; appends every request it
got (headers it cares about and the raw body) as one JSON line to ``--log``; writes its
port to ``--port-file`` once it listens (port 0: any free one).

    python tests/notify/receiver.py --port-file P --log L [--fail-first N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    seen = {"n": 0}

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        seen["n"] += 1
        status = 500 if seen["n"] <= args.fail_first else 200
        record = {
            "n": seen["n"],
            "status": status,
            "event_id": request.headers.get("budgeter-event-id"),
            "signature": request.headers.get("budgeter-signature"),
            "body": body.decode(),
        }
        with Path(args.log).open("a") as out:  # noqa: ASYNC230 -- a test's receiver
            out.write(json.dumps(record) + "\n")
        return web.Response(status=status, text="ok" if status == 200 else "try again")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ready = Path(args.port_file + ".tmp")
        ready.write_text(f"{port}\n")  # noqa: ASYNC240 -- once, before serving
        ready.rename(args.port_file)  # noqa: ASYNC240 -- whole, as tests/helpers.py reads it
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
