"""Creating the Redis client from settings: the configured URL, or the shared embedded
server of the data directory (started detached when none runs; never stopped here)."""

from __future__ import annotations

import asyncio
import logging
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
from budgeter.store.outage import OUTAGE
from budgeter.store.shared_redis import SharedRedis
from budgeter.store.types import RedisClient, ScriptArg

log = logging.getLogger("budgeter.redis")


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

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        """Every new connection: after an outage, the one "reachable again" line."""
        await super().on_connect_check_health(check_health)  # type: ignore[misc]  # mixed in
        OUTAGE.reachable()


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


def redacted_url(url: str) -> str:
    """``url`` without its password and query (which may carry one), for log lines."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hosts}" if user else hosts
    return f"{scheme}://{netloc}{slash}{path.split('?', 1)[0]}"


async def resolve_redis_url(settings: Settings, *, announce: bool = False) -> str:
    """``settings.redis_url``, or the URL of the shared embedded server of
    ``settings.data_dir`` (started, detached, when none runs). Logs which Redis it is:
    at INFO with ``announce`` (long-running processes) or when it started the server."""
    if settings.redis_url is not None:
        url = settings.redis_url
        OUTAGE.describe(redacted_url(url))
        log.log(logging.INFO if announce else logging.DEBUG, "Redis: %s", redacted_url(url))
        return url
    server, started = await asyncio.to_thread(SharedRedis(settings.data_dir).ensure)
    OUTAGE.describe(server.url)
    log.log(
        logging.INFO if announce or started else logging.DEBUG,
        "Redis: embedded at %s (data dir %s; %s, pid %d)",
        server.url,
        server.data_dir,
        "started here, detached" if started else "shared",
        server.pid,
    )
    return server.url


@asynccontextmanager
async def redis_from_settings(
    settings: Settings, *, announce: bool = False
) -> AsyncIterator[RedisClient]:
    """Yield a client for ``settings.redis_url``, or for the shared embedded server (see
    :func:`resolve_redis_url`), which keeps running when this process ends."""
    url = await resolve_redis_url(settings, announce=announce)
    client = make_redis(
        url, cluster=settings.cluster_mode, max_connections=settings.redis_max_connections
    )
    try:
        yield client
    finally:
        await client.aclose()
