"""The Redis Cluster client, configured to ride out a failover (issue 19).

When a master dies, its replica is promoted after ``cluster-node-timeout`` and a vote:
2-3 s with a 2 s node timeout. Meanwhile every call to the dead node fails. redis-py's
async cluster client, left at its defaults, gives up well inside that window: it retries
a command 3 times with no pause between tries (a pipeline, 3 times 0.25 s), and each try
re-reads the topology and asks its default node, which may be the dead one, for the
``COMMAND`` table. Here:

- a command that fails on a connection error, a timeout, ``CLUSTERDOWN``, ``TRYAGAIN``
  or an uncovered slot is tried again with capped exponential backoff (and jitter) for
  up to :data:`FAILOVER_S`, a promotion's time with room to spare; redis-py's own quick
  retries (:data:`CLUSTER_RETRIES`, each re-reading the topology from the nodes still up,
  the failed node asked last) run inside each try, and a pipeline retries
  :data:`CLUSTER_RETRIES` times 0.25 s (about 5 s) by itself;
- the ``COMMAND`` table, the same on every node and for the client's lifetime, is read
  once, from the first master that answers, never again on a topology refresh.

A call aimed at one node by its caller (``target_nodes``) is not retried here: that node
is what the caller asked for.

redis-py re-reads the topology after a connection error and disconnects the old nodes'
connections, also one that another coroutine is sending or reading on at that moment:
that call fails with ``AttributeError`` (the connection's stream set to None). Such an
error is a dropped connection, and is made one (:func:`as_connection_error`): retried
here like the others, never a failed job.
"""

from __future__ import annotations

import asyncio
import random
import traceback
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

FAILOVER_S = 10.0  # how long a command keeps trying while a node fails over
CLUSTER_RETRIES = 20  # redis-py's own retries inside each try (a pipeline: 20 x 0.25 s)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
FAILOVER_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)


T = TypeVar("T")


def closed_under_us(exc: BaseException) -> bool:
    """``exc`` is what a redis-py connection raises when another coroutine closed it while
    this call wrote on it: AttributeError on its stream set to None, or (uvloop)
    RuntimeError on a closed transport, raised from inside redis-py's connection."""
    if isinstance(exc, AttributeError):
        if exc.obj is not None:
            return False
    elif not (isinstance(exc, RuntimeError) and "closed" in str(exc)):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return any(
        frame.filename.replace("\\", "/").endswith("/redis/asyncio/connection.py")
        for frame in frames
    )


async def as_connection_error(call: Awaitable[T]) -> T:
    """``await call``, with :func:`closed_under_us` errors raised as the connection
    error they are."""
    try:
        return await call
    except (AttributeError, RuntimeError) as exc:
        if closed_under_us(exc):
            raise RedisConnectionError(
                "connection closed while in use (the client re-read the cluster's topology)"
            ) from exc
        raise


class OnceCommandsParser(AsyncCommandsParser):
    """redis-py's key-position table (``COMMAND``), read once. redis-py reads it again on
    every topology refresh from its default node, and a refresh after a master died may
    name the dead master as default: then the refresh fails, and the command with it."""

    def __init__(self, nodes: NodesManager) -> None:
        super().__init__()
        self._nodes = nodes

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node  # where COMMAND GETKEYS goes (the current default node)
        if self.commands:
            return
        candidates = [n for n in [node] if n is not None]
        candidates += [n for n in self._nodes.get_nodes_by_server_type("primary") if n != node]
        failure: Exception | None = None
        for candidate in candidates:
            try:
                await super().initialize(candidate)
            except FAILOVER_ERRORS as exc:
                failure = exc
                continue
            return
        if failure is not None:
            raise failure
        await super().initialize(node)


class FailoverRedisCluster(RedisCluster):
    """A RedisCluster client whose commands outlast a master's failover (module doc)."""

    failover_s = FAILOVER_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 -- RedisCluster's
        kwargs.setdefault(
            "retry",
            Retry(
                ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S),
                retries=CLUSTER_RETRIES,
            ),
        )
        kwargs.setdefault("reinitialize_steps", 5)  # MOVED errors before the whole table is read
        super().__init__(*args, **kwargs)
        self.commands_parser = OnceCommandsParser(self.nodes_manager)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 -- as redis-py's
        if "target_nodes" in kwargs:
            return await as_connection_error(super().execute_command(*args, **kwargs))
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = BACKOFF_BASE_S
        while True:
            try:
                return await as_connection_error(super().execute_command(*args, **kwargs))
            except FAILOVER_ERRORS:
                now = loop.time()
                if deadline is None:
                    deadline = now + self.failover_s
                if now >= deadline:
                    raise
                await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
                delay = min(delay * 2, BACKOFF_CAP_S)
