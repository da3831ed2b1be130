"""Creating the Redis client from settings: the configured URL, or the shared embedded
server of the data directory (started detached when none runs; never stopped here)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.settings import Settings
from budgeter.store import reply_deadline
from budgeter.store.cluster_client import FailoverRedisCluster
from budgeter.store.durability import configure as configure_durability
from budgeter.store.outage import OUTAGE
from budgeter.store.shared_redis import SharedRedis
from budgeter.store.types import RedisClient, ScriptArg
from budgeter.store.urls import SentinelURL, is_cluster, is_sentinel, redacted_url

__all__ = ["make_redis", "redacted_url", "redis_from_settings", "resolve_redis_url"]

T = TypeVar("T")

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

    @property
    def socket_timeout(self) -> float | None:
        """The configured socket timeout, or the caller's shorter
        :mod:`~budgeter.store.reply_deadline`: redis-py bounds each read (and write) with
        it, and on a timeout disconnects the half-read connection and raises its
        ``TimeoutError`` (an explicit read ``timeout``, pubsub's own, is left alone)."""
        configured: float | None = self.__dict__.get("_configured_socket_timeout")
        bound = reply_deadline.current()
        if bound is None or (configured is not None and configured <= bound):
            return configured
        return bound

    @socket_timeout.setter
    def socket_timeout(self, value: float | None) -> None:
        self.__dict__["_configured_socket_timeout"] = value


def _hiredis_packing(connection_class: type) -> type:
    name = f"HiredisPacking{connection_class.__name__}"
    return type(name, (HiredisPacking, connection_class), {})


class LoginRetry(Retry):
    """redis-py's Retry, except that a refused login (wrong password, disabled ACL user)
    or a refused TLS certificate (the server's not trusted, the client's missing or not
    accepted) is not retried: it stays refused, and the caller hears so at once; nor is a
    timeout under a :mod:`~budgeter.store.reply_deadline` (the caller waits on that
    bound)."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, AuthenticationError | AuthorizationError):
                return False
            if refused_certificate(error):
                return False
            if isinstance(error, RedisTimeoutError) and reply_deadline.current() is not None:
                return False  # a caller waits on a bound: its call fails, not tried again
            return is_retryable is None or is_retryable(error)

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def refused_certificate(error: BaseException) -> bool:
    """``error`` (redis-py's ConnectionError) comes from a TLS certificate one side
    refused: settings to fix, not a network to wait for (a TLS error without a
    certificate in it, a connection cut mid-handshake, stays retried)."""
    cause = error.__cause__ or error.__context__
    return isinstance(cause, ssl.SSLError) and "CERTIFICATE" in str(cause).upper()


def _pool_options() -> dict[str, object]:
    """What every client's pool takes, whichever the URL form."""
    return {
        "timeout": 60,  # wait this long for a free connection
        "decode_responses": True,
        "health_check_interval": 30,
        "socket_timeout": 60,  # a 100,000-request batch is one large MULTI/EXEC
        "socket_connect_timeout": 5,
        "retry": LoginRetry(ExponentialBackoff(cap=2.0, base=0.05), retries=6),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel pool (asks the Sentinels for the master before each new connection,
    drops connections to a master that is no longer one) that waits for a free
    connection, as the plain client's pool does."""


class SentinelRedis(Redis):
    """The master's client: closing it closes its connections to the Sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def make_sentinel_redis(url: SentinelURL, *, max_connections: int = 512) -> Redis:
    """A client of the master the Sentinels of ``url`` name. It follows a failover by
    itself: a command that fails on a connection error is retried (as after a restart),
    and each new connection asks the Sentinels where the master is now."""
    sentinel_login: dict[str, object] = {
        "username": url.sentinel_username,
        "password": url.sentinel_password,
    }
    sentinel = Sentinel(
        list(url.sentinels),
        sentinel_kwargs={
            "socket_timeout": 5,  # a Sentinel that hangs: ask the next one
            "socket_connect_timeout": 5,
            **{name: value for name, value in sentinel_login.items() if value is not None},
        },
    )
    client: Redis = sentinel.master_for(
        url.master,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelConnectionPool,
        connection_class=_hiredis_packing(SentinelManagedConnection),
        max_connections=max_connections,
        db=url.db,
        username=url.username,
        password=url.password,
        **_pool_options(),
    )
    return client


def _pack_with_hiredis(client: RedisCluster) -> None:
    """The cluster client's connections, to every node it knows now or finds later, pack
    commands with hiredis too (RedisCluster takes no connection class of its own)."""
    packing = _hiredis_packing(Connection)
    client.nodes_manager.connection_kwargs["connection_class"] = packing
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = packing


def make_redis(url: str, *, cluster: bool = False, max_connections: int = 512) -> RedisClient:
    """An asyncio client (hiredis parser when installed) that retries dropped connections;
    a RedisCluster client for ``cluster`` or a ``redis+cluster://`` URL; the master's
    client for a ``redis+sentinel://`` URL (:func:`make_sentinel_redis`).

    The pool blocks when all ``max_connections`` are busy (redis-py's default pool raises
    "Too many connections" past 100, which would fail jobs under high concurrency)."""
    if is_sentinel(url):
        return make_sentinel_redis(SentinelURL.parse(url), max_connections=max_connections)
    if cluster or is_cluster(url):  # retries that outlast a failover (cluster_client.py)
        cluster_client = FailoverRedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            decode_responses=True,
            socket_timeout=60,
            socket_connect_timeout=5,
            max_connections=max_connections,  # per node
        )
        _pack_with_hiredis(cluster_client)
        return cluster_client
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, **_pool_options())
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return Redis.from_pool(pool)


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
    configure_durability(client, settings.redis_wait_replicas, settings.redis_wait_timeout_ms)
    try:
        yield client
    finally:
        await client.aclose()
