"""``budgeter redis status|start|stop``: the shared embedded Redis of the data directory.

Every budgeter process of a user shares one detached redis-server when
``BUDGETER_REDIS_URL`` is unset (``budgeter/store/shared_redis.py``); these commands show
it, start it, and stop it (SHUTDOWN SAVE). ``status`` exits 1 when it is not running.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from budgeter.settings import Settings
    from budgeter.store.shared_redis import SharedServer

ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)

ACTIONS = {
    "status": "show the shared embedded Redis: url, pid, data dir, memory, uptime "
    "(exit 1 when it is not running)",
    "start": "start it when it is not running (any budgeter process would)",
    "stop": "stop it (SHUTDOWN SAVE: its data stays in the data dir); processes using it "
    "wait for it to come back",
}


def register(sub: argparse._SubParsersAction[ParserT]) -> None:
    redis = sub.add_parser(
        "redis",
        help="status, start or stop the shared embedded Redis",
        description="The redis-server budgeter processes share when BUDGETER_REDIS_URL is "
        "unset; its data lives in BUDGETER_DATA_DIR.",
    )
    rsub = redis.add_subparsers(dest="redis_command", required=True, metavar="ACTION")
    for action, text in ACTIONS.items():
        rsub.add_parser(action, help=text, description=text)
    redis.set_defaults(run=run_redis)


async def run_redis(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from budgeter.store.shared_redis import SharedRedis

    shared = SharedRedis(settings.data_dir)
    if settings.redis_url is not None:
        from budgeter.store.client import redacted_url

        print(
            f"budgeter: note: BUDGETER_REDIS_URL is set; budgeter processes use "
            f"{redacted_url(settings.redis_url)}, not this embedded server",
            file=sys.stderr,
        )
    action = args.redis_command
    if action == "stop":
        stopped = await asyncio.to_thread(shared.stop)
        if stopped is None:
            print(f"embedded Redis: not running (data dir {shared.data_dir})")
        else:
            print(
                f"embedded Redis stopped: {stopped.url} (pid {stopped.pid}); "
                f"its data is kept in {stopped.data_dir}"
            )
        return 0
    if action == "start":
        server, started = await asyncio.to_thread(shared.ensure)
        verb = "started" if started else "already running"
        print(f"embedded Redis {verb}: {server.url} (pid {server.pid}, data dir {server.data_dir})")
        return 0
    running = await asyncio.to_thread(shared.running)
    if running is None:
        print(f"embedded Redis: not running (data dir {shared.data_dir})")
        return 1
    for name, value in (await _status_rows(running)).items():
        print(f"{name:<9} {value}")
    return 0


async def _status_rows(server: SharedServer) -> dict[str, str]:
    from budgeter.store.client import make_redis

    client = make_redis(server.url, max_connections=1)
    try:
        info = await client.info()
    finally:
        await client.aclose()
    return {
        "url": server.url,
        "pid": str(server.pid),
        "data dir": str(server.data_dir),
        "memory": f"{info.get('used_memory_human', '?')} "
        f"(peak {info.get('used_memory_peak_human', '?')}, {_keys(info)} keys)",
        "uptime": _duration(int(info.get("uptime_in_seconds", 0))),
        "version": str(info.get("redis_version", "?")),
    }


def _keys(info: dict[str, object]) -> int:
    db0 = info.get("db0")
    return int(db0.get("keys", 0)) if isinstance(db0, dict) else 0


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value] or ["0s"]
    return " ".join(shown[:2])
