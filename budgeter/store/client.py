"""Creating the Redis client from settings: the configured URL, or an embedded server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.settings import Settings
from budgeter.store.embedded import EmbeddedRedis, running_embedded_url
from budgeter.store.types import RedisClient, ScriptArg


class HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python packer, which costs
    several microseconds per argument. Anything hiredis does not take (a command name
    with a space, None, bool, ...) goes to redis-py's packer, which accepts it or raises
    its usual error; the bytes sent are the same."""

    def pack_command(self, *args: ScriptArg) -> list[bytes]:
        if not (isinstance(args[0], str) and " " in args[0]):
            try:
                return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # stub: 1-tuple
            except TypeError:
                pass
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]  # mixed in
        return packed


def _hiredis_packing(connection_class: type) -> type:
    name = f"HiredisPacking{connection_class.__name__}"
    return type(name, (HiredisPacking, connection_class), {})


def make_redis(url: str, *, cluster: bool = False, max_connections: int = 512) -> RedisClient:
    """An asyncio client (hiredis parser when installed) that retries dropped connections;
    a RedisCluster client for ``cluster`` or a ``redis+cluster://`` URL.

    The pool blocks when all ``max_connections`` are busy (redis-py's default pool raises
    "Too many connections" past 100, which would fail jobs under high concurrency)."""
    if cluster or url.startswith("redis+cluster://"):
        return RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            decode_responses=True,
            socket_timeout=60,
            socket_connect_timeout=5,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=60,  # wait this long for a free connection
        decode_responses=True,
        health_check_interval=30,
        socket_timeout=60,  # a 100,000-request batch is one large MULTI/EXEC
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return Redis.from_pool(pool)


@asynccontextmanager
async def redis_from_settings(settings: Settings) -> AsyncIterator[RedisClient]:
    """Yield a client for ``settings.redis_url``, or for an embedded server started here."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        url = await asyncio.to_thread(running_embedded_url, settings.data_dir)
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
    client = make_redis(
        url, cluster=settings.cluster_mode, max_connections=settings.redis_max_connections
    )
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
