"""Durability you choose: ``BUDGETER_REDIS_WAIT_REPLICAS=N`` (default 0).

Redis replicates asynchronously: a write the master acknowledged may be lost when a
replica is promoted before it got it. With N > 0, every write budgeter acknowledges to
someone (batch creation and submit, a result stored, a settle) and every lease and
reservation made before an upstream call is followed by ``WAIT N timeout`` *on the
connection that made the write* (WAIT waits for the writes of its own connection; with a
pool, another connection's WAIT proves nothing): the round pipeline appends one WAIT to a
round that holds such calls (:func:`execute_round`), a durable MULTI/EXEC holds its
connection until its WAIT (:func:`durable_pipeline`). When fewer than N replicas
acknowledge in time, the operation fails with :class:`NotReplicated`, a Redis connection
error: the API answers 503, the worker defers the job (budgeter/worker/reserving.py) or
handles it as Redis away. The write did happen on the master; where keeping it would leave
something half-done, the caller undoes it (a reservation is released: the upstream is
never called on it; the jobs of a lease are given back, from the script's reply that
:class:`NotReplicated` carries; a new batch the client was told is not created is
deleted). A failover would have lost either anyway.

On Redis Cluster the WAIT goes on the node that holds the keys, on the connection that
wrote: the round pipeline appends it to each node's pipeline that holds a durable call
(budgeter/store/scripts.py), a durable MULTI/EXEC WAITs on its transaction's connection
(:class:`DurableClusterPipeline`). A durable call that had to go again on its own (MOVED,
ASK, a failover's connection error) is not proven replicated: it fails with
:class:`NotReplicated` as a WAIT that fell short would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.store.types import RedisClient, ScriptArg, ScriptReply

# The scripts whose write is acknowledged to someone or precedes an upstream call.
DURABLE_SCRIPTS = frozenset(
    {
        "admission/reserve.lua",  # the reservation, before the upstream call
        # the lease, before the upstream call: lost on a failover, the job would be queued
        # on the promoted replica and leased again by another worker while this one serves
        # it under the same reservation id (served twice)
        "queue/dequeue.lua",
        "admission/mark_sent.lua",  # "the upstream may be called": the reaper charges it
        "admission/settle.lua",  # settle, charge in full, release, reap
        "queue/ack.lua",  # a result stored, the job's terminal state
        "batch/cancel.lua",  # a cancel the API acknowledged
    }
)


class NotReplicated(RedisConnectionError):
    """Fewer replicas than ``BUDGETER_REDIS_WAIT_REPLICAS`` acknowledged a write in time.

    A Redis connection error on purpose: callers treat it as Redis being away (503, job
    retried, settle retried). The write happened on the master; it may be lost on a
    failover. ``reply`` is the script's own answer when it ran (None when unknown), so a
    caller can undo what it wrote (jobs leased by ``queue/dequeue.lua`` are given back)."""

    reply: ScriptReply | None = None

    def with_reply(self, reply: ScriptReply) -> NotReplicated:
        """The same failure, carrying the reply of the call it replaces."""
        failure = NotReplicated(*self.args)
        failure.reply = reply
        return failure


@dataclass(frozen=True, slots=True)
class Durability:
    replicas: int
    timeout_ms: int

    def wait_args(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, reply: object) -> NotReplicated | None:
        """None when ``reply`` (WAIT's answer) says enough replicas have the writes."""
        if isinstance(reply, BaseException):
            return NotReplicated(f"too few replicas: WAIT failed: {' '.join(str(reply).split())}")
        if isinstance(reply, int) and reply >= self.replicas:
            return None
        return NotReplicated(
            f"too few replicas: {reply} of {self.replicas} acknowledged the write within "
            f"{self.timeout_ms} ms (BUDGETER_REDIS_WAIT_REPLICAS)"
        )


_ATTRIBUTE = "_budgeter_durability"


def configure(redis: RedisClient, replicas: int, timeout_ms: int) -> None:
    """Make ``redis``'s durable writes wait for ``replicas`` replicas (0: never wait)."""
    if replicas < 0 or timeout_ms < 1:
        raise ValueError("replicas must be >= 0 and timeout_ms >= 1")
    setattr(redis, _ATTRIBUTE, Durability(replicas, timeout_ms) if replicas else None)


def durability_of(redis: RedisClient) -> Durability | None:
    """What ``redis``'s durable writes wait for; None: nothing (the default)."""
    found = getattr(redis, _ATTRIBUTE, None)
    return found if isinstance(found, Durability) else None


async def execute_round(
    pipe: Pipeline, redis: Redis, durable: bool
) -> tuple[list[ScriptReply | BaseException], NotReplicated | None]:
    """Execute a round pipeline (errors as replies); with ``durable`` (the round holds a
    durable call) and a configured durability, a WAIT goes last on the same connection.
    Returns the replies of the round's own commands and the failure of the WAIT (None:
    replicated, or nothing to wait for)."""
    wanted = durability_of(redis) if durable else None
    if wanted is not None:
        pipe.execute_command(*wanted.wait_args())
    replies: list[ScriptReply | BaseException] = await pipe.execute(raise_on_error=False)
    if wanted is None:
        return replies, None
    acked = replies.pop()
    return replies, wanted.check(acked)


async def call_script(
    redis: Redis,
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[ScriptArg],
    *,
    durable: bool,
) -> ScriptReply:
    """Call ``script`` outside the round pipeline (after NOSCRIPT: the script is loaded
    again); a durable call loads, calls and WAITs in one pipeline, on one connection."""
    wanted = durability_of(redis) if durable else None
    if wanted is None:
        return await script(keys=list(keys), args=list(args))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("SCRIPT LOAD", script.script)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        pipe.execute_command(*wanted.wait_args())
        _, reply, acked = await pipe.execute(raise_on_error=False)
    failure = wanted.check(acked)
    if isinstance(reply, BaseException):
        raise reply
    if failure is not None:
        raise failure.with_reply(cast(ScriptReply, reply))
    return cast(ScriptReply, reply)


class _Held:
    """The pool a durable pipeline draws from: the one connection it holds (releasing
    it here is a no-op; :func:`durable_pipeline` gives it back when done)."""

    def __init__(self, pool: ConnectionPool, connection: AbstractConnection) -> None:
        self.pool = pool
        self.connection = connection

    async def get_connection(self, *_args: object, **_kwargs: object) -> AbstractConnection:
        return self.connection

    async def release(self, _connection: AbstractConnection) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)


class DurablePipeline(Pipeline):
    """A MULTI/EXEC pipeline on one held connection whose successful ``execute`` is
    followed by ``WAIT`` on that connection (:class:`NotReplicated` when it falls short)."""

    def __init__(self, redis: Redis, held: _Held, durability: Durability) -> None:
        super().__init__(
            cast(ConnectionPool, held), redis.response_callbacks, transaction=True, shard_hint=None
        )
        self.held = held
        self.durability = durability

    async def execute(self, raise_on_error: bool = True) -> list[object]:
        replies: list[object] = await super().execute(raise_on_error)
        await wait_on(self.held.connection, self.durability)
        return replies


async def wait_on(connection: AbstractConnection, durability: Durability) -> None:
    """``WAIT`` on ``connection`` (never on a new one: a reconnected connection has made
    no write, and its WAIT would prove nothing)."""
    if not connection.is_connected:
        raise NotReplicated("the connection closed before WAIT: the write may not be replicated")
    try:
        await connection.send_command(*durability.wait_args())
        acked = await connection.read_response()
    except BaseException:
        await connection.disconnect()  # no unread reply left for the next user
        raise
    failure = durability.check(acked)
    if failure is not None:
        raise failure


class DurableClusterPipeline(ClusterPipeline):
    """A cluster MULTI/EXEC pipeline (all keys in one slot) whose successful ``execute``
    is followed by ``WAIT`` on the connection that ran the transaction, before redis-py
    gives that connection back (:class:`NotReplicated` when the WAIT falls short)."""

    def __init__(self, redis: RedisCluster, durability: Durability) -> None:
        super().__init__(redis, transaction=True)
        self.durability = durability

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[object]:
        strategy = self._execution_strategy
        try:
            replies: list[object] = await strategy.execute(raise_on_error, allow_redirections)
            # the transaction's connection, still held (redis-py's TransactionStrategy
            # releases it in reset()): the one whose writes WAIT is about
            connection = getattr(strategy, "_transaction_connection", None)
            if connection is None:
                raise NotReplicated("no transaction connection to WAIT on (redis-py changed?)")
            await wait_on(connection, self.durability)
            return replies
        finally:
            await self.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


@contextlib.asynccontextmanager
async def durable_pipeline(redis: RedisClient) -> AsyncIterator[Pipeline | ClusterPipeline]:
    """``redis.pipeline(transaction=True)``, except that with a configured durability its
    ``execute`` WAITs for the replicas on the same connection (see :class:`DurablePipeline`
    and :class:`DurableClusterPipeline`)."""
    wanted = durability_of(redis)
    if wanted is None:
        async with redis.pipeline(transaction=True) as plain:
            yield plain
        return
    if isinstance(redis, RedisCluster):
        # (redis-py's ClusterPipeline declares an abstract attribute it sets itself)
        async with DurableClusterPipeline(redis, wanted) as clustered:  # type: ignore[abstract]
            yield clustered
        return
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py
    try:
        async with DurablePipeline(redis, _Held(pool, connection), wanted) as pipe:
            yield pipe
    except asyncio.CancelledError:
        await connection.disconnect()  # a reply may be unread
        raise
    finally:
        await pool.release(connection)
