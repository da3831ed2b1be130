"""Bench-only diagnostic: ``budgeter worker`` exactly as shipped, except for the pools
named in ``BENCH_UNLIMITED`` (comma list):

- ``http``: every aiohttp ClientSession gets ``TCPConnector(limit=0)`` (aiohttp's default
  caps a session at 100 connections);
- ``redis``: every redis-py asyncio ConnectionPool gets ``max_connections=100_000``
  (redis-py's default is 100, and a 101st concurrent command raises MaxConnectionsError).

Used by the concurrency row to show what limits a worker once a pool does not. Budgeter's
own code is not changed.

    BENCH_UNLIMITED=http,redis .venv/bin/python bench/worker_unlimited.py --concurrency 2000
"""

from __future__ import annotations

import os
import sys
from typing import Any

import aiohttp
from redis.asyncio import connection as redis_connection

UNLIMITED = {x.strip() for x in os.environ.get("BENCH_UNLIMITED", "http").split(",")}

if "http" in UNLIMITED:
    _session_init = aiohttp.ClientSession.__init__

    def _session(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("connector") is None:
            kwargs["connector"] = aiohttp.TCPConnector(limit=0)
        _session_init(self, *args, **kwargs)

    aiohttp.ClientSession.__init__ = _session  # type: ignore[method-assign]

if "redis" in UNLIMITED:
    _pool_init = redis_connection.ConnectionPool.__init__

    def _pool(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["max_connections"] = kwargs.get("max_connections") or 100_000
        _pool_init(self, *args, **kwargs)

    redis_connection.ConnectionPool.__init__ = _pool  # type: ignore[method-assign]

if __name__ == "__main__":
    from budgeter.cli.commands import main

    sys.exit(main(["worker", *sys.argv[1:]]))
