"""Redis server time in milliseconds: the one clock every process and script shares."""

from __future__ import annotations

from budgeter.store.types import RedisClient


def time_reply_ms(reply: tuple[int, int] | list[int] | list[str]) -> int:
    """Milliseconds of a ``TIME`` reply (seconds, microseconds), as Lua scripts compute
    their ``now``: ``seconds * 1000 + micros // 1000``."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


async def server_time_ms(redis: RedisClient) -> int:
    """Redis server time (a keyless command: on a cluster it goes to any node; it cannot
    join a pipeline there)."""
    return time_reply_ms(await redis.time())
