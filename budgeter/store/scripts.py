"""Loads the ``.lua`` files that live beside the package's modules.

A script whose text contains ``-- needs: <file>.lua`` gets that helper file prepended, so
shared Lua functions (calendar periods, server time) are written once.

Script calls from many coroutines are pipelined: the calls made while the event loop
runs one round, of every script on one client, go to Redis together, as one
non-transactional pipeline (one write and one read instead of one round trip each). Each
call is still its own atomic script; only the network trips are shared. On Redis Cluster
the round's calls go as one pipeline per node, sent concurrently: each call goes to the
master of its keys' slot, so a round costs one round trip per node it touches, and a node
that fails fails only the calls sent to it.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.domain import jsonio
from budgeter.store import durability
from budgeter.store.cluster_client import as_connection_error
from budgeter.store.types import RedisClient, Script, ScriptArg, ScriptReply

MAX_BATCH = 512
# On a cluster, the replies of a round's node pipelines that arrive within this long of
# each other are handed out together, as one Redis hands out a round's (so the callers they
# wake call again in one event-loop pass, and their next calls batch as on one Redis); a
# node slower than that (failing over, say) holds up the others no longer than this.
ROUND_GRACE_S = 0.005

_Pending = tuple[
    tuple["ScriptArg", ...],
    "Callable[[], Awaitable[ScriptReply]] | None",
    "asyncio.Future[ScriptReply]",
]
_Group = tuple[tuple[str, ...], tuple["ScriptArg", ...]]  # the keys and head of a batched call
_Call = tuple[list[object], "asyncio.Future[list[ScriptReply]]"]  # an item and its answer

_ROUND_ATTRIBUTE = "_budgeter_round_pipeline"
_NEEDS = re.compile(r"^-- needs: (\S+\.lua)$", re.MULTILINE)


@functools.cache
def lua_source(name: str) -> str:
    """The full text of script ``name`` with its helpers prepended."""
    text = resources.files("budgeter").joinpath("lua", name).read_text(encoding="utf-8")
    helpers = [lua_source(helper) for helper in _NEEDS.findall(text)]
    return "\n".join([*helpers, text])


class RoundPipeline:
    """The calls made on one Redis client while the event loop runs one round (script
    calls of every script, and the commands given to :meth:`command`) go to Redis
    together, as one non-transactional pipeline: one write and one read for all of them.
    On a cluster, one such pipeline per node (the master of each call's hash slot), the
    nodes' pipelines sent at the same time and their replies handed out together (those
    within ROUND_GRACE_S of each other). Each call keeps its own answer or error."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._pending: list[_Pending] = []
        self._batchers: list[BatchedScript] = []  # BatchedScripts with calls gathered this round
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._durable: set[asyncio.Future[ScriptReply]] = set()  # calls to WAIT for

    def command(
        self,
        *args: ScriptArg,
        fallback: Callable[[], Awaitable[ScriptReply]] | None = None,
        durable: bool = False,
    ) -> asyncio.Future[ScriptReply]:
        """Queue ``args`` (a command with its arguments) for this round's pipeline; the
        future gets its reply. ``fallback``: a coroutine function that answers instead
        when the reply is NoScriptError (the script is loaded again). ``durable``: the
        round WAITs for the replicas (see budgeter/store/durability.py)."""
        future: asyncio.Future[ScriptReply] = asyncio.get_running_loop().create_future()
        self._pending.append((args, fallback, future))
        if durable:
            self._durable.add(future)
        self._schedule()
        return future

    def join(self, batcher: BatchedScript) -> None:
        """``batcher.emit()`` adds its gathered calls just before this round's pipeline
        is sent."""
        self._batchers.append(batcher)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batchers, self._batchers = self._batchers, []
        for batcher in batchers:  # their commands join this pipeline (still scheduled)
            batcher.emit()
        self._scheduled = False
        pending, self._pending = self._pending, []
        groups = self._by_node(pending) if isinstance(self.redis, RedisCluster) else {None: pending}
        parts = [
            (node, group[start : start + MAX_BATCH])
            for node, group in groups.items()
            for start in range(0, len(group), MAX_BATCH)
        ]
        if len(parts) > 1:  # a cluster round over several nodes
            sends = [self._send_together(parts)]
        else:
            sends = [self._send(node, batch) for node, batch in parts]
        for send in sends:
            task = asyncio.ensure_future(send)
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _by_node(self, pending: list[_Pending]) -> dict[ClusterNode | None, list[_Pending]]:
        """The round's calls by the node that holds their first key's slot, as this
        client's slot table says now (None: not known yet, or no key: the cluster pipeline
        routes them itself). The table may be stale: a call answered MOVED or ASK is sent
        again on its own, routed by its slot, and a pipeline retried after a connection
        error is routed again call by call."""
        assert isinstance(self.redis, RedisCluster)
        groups: dict[ClusterNode | None, list[_Pending]] = {}
        slots = self.redis.nodes_manager.slots_cache
        for call in pending:
            args = call[0]
            key = _first_key(args)  # a call whose keys span slots: Redis says CROSSSLOT
            holders = None if key is None else slots.get(self.redis.keyslot(key))
            groups.setdefault(holders[0] if holders else None, []).append(call)
        return groups

    async def _send(self, node: ClusterNode | None, batch: list[_Pending]) -> None:
        await self._deliver(batch, *await self._replies(node, batch))

    async def _send_together(self, parts: list[tuple[ClusterNode | None, list[_Pending]]]) -> None:
        """A cluster round of several node pipelines, sent at once: the replies that come
        within ROUND_GRACE_S are handed out together, the later ones as they come."""
        runs = [asyncio.ensure_future(self._replies(node, batch)) for node, batch in parts]
        try:
            await asyncio.wait(runs, timeout=ROUND_GRACE_S)
            late = []
            for (_, batch), run in zip(parts, runs, strict=True):
                if run.done():
                    await self._deliver(batch, *run.result())
                else:
                    late.append((batch, run))
            for batch, run in late:
                await self._deliver(batch, *await run)
        except BaseException as exc:  # cancelled: so are the node pipelines still out
            for run in runs:
                run.cancel()
            for _, batch in parts:
                _fail(batch, exc)
            raise

    async def _replies(
        self, node: ClusterNode | None, batch: list[_Pending]
    ) -> tuple[
        list[ScriptReply | BaseException],
        durability.NotReplicated | None,
        set[asyncio.Future[ScriptReply]],
    ]:
        """``batch`` sent to ``node``: its replies (errors as replies), the WAIT's failure,
        and which of its calls were durable."""
        durable = {future for _, _, future in batch if future in self._durable}
        self._durable.difference_update(durable)
        try:
            replies, not_replicated = await self._execute(node, batch, durable)
        except Exception as exc:  # the connection failed even after its retries
            return [exc] * len(batch), None, durable
        except BaseException as exc:
            _fail(batch, exc)
            raise
        return list(replies), not_replicated, durable

    async def _deliver(
        self,
        batch: list[_Pending],
        replies: list[ScriptReply | BaseException],
        not_replicated: durability.NotReplicated | None,
        durable: set[asyncio.Future[ScriptReply]],
    ) -> None:
        for (_, fallback, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError) and fallback is not None:
                reply = await _settled(fallback())  # Redis restarted: load it, call again
            elif not_replicated is not None and future in durable:
                reply = (
                    reply if isinstance(reply, BaseException) else not_replicated.with_reply(reply)
                )
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(
        self,
        node: ClusterNode | None,
        batch: list[_Pending],
        durable: set[asyncio.Future[ScriptReply]],
    ) -> tuple[list[ScriptReply], durability.NotReplicated | None]:
        """The one place where a node's pipeline is built and sent: ``batch``'s commands
        to ``node`` (None: the one Redis, or a cluster node not known yet); their replies,
        errors as replies, and whether the WAIT for the replicas fell short (``durable``:
        the batch's calls that WAIT)."""
        redis = self.redis
        if isinstance(redis, RedisCluster):  # the WAIT goes on the node's own pipeline
            wanted = durability.durability_of(redis) if durable else None
            positions = {n for n, (_, _, future) in enumerate(batch) if future in durable}
            calls = [args for args, _, _ in batch]
            return await _on_node(redis, node, calls, wanted, positions)
        async with redis.pipeline(transaction=False) as pipe:
            for args, _, _ in batch:
                pipe.execute_command(*args)
            return await durability.execute_round(pipe, redis, bool(durable))


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)


# answers after which a call goes again on its own, routed by its slot, with the client's
# redirections and failover retries (a connection error: as a lone call would be retried)
_ALONE_AGAIN = (
    MovedError,
    AskError,
    TryAgainError,
    ClusterDownError,
    RedisConnectionError,
    RedisTimeoutError,
)


async def _on_node(
    redis: RedisCluster,
    node: ClusterNode | None,
    calls: list[tuple[ScriptArg, ...]],
    wanted: durability.Durability | None = None,
    durable: frozenset[int] | set[int] = frozenset(),
) -> tuple[list[ScriptReply], durability.NotReplicated | None]:
    """``calls`` as one pipeline to ``node``, their replies (errors as replies). A call
    answered MOVED, ASK, TRYAGAIN, CLUSTERDOWN or a connection error, or all of them when
    the pipeline could not be sent, goes again alone through the client (which follows the
    redirection, refreshes its slot table and rides out a failover), so a failing node
    holds up only its own calls and never closes the other nodes' connections (as
    redis-py's cluster pipeline does when it retries). ``node`` None: the cluster
    pipeline routes the calls itself.

    ``wanted`` (the round holds durable calls, at positions ``durable``): ``WAIT`` goes
    last in the node's pipeline, on the connection that wrote; the second value is its
    failure (None: replicated). A durable call that went again alone (or through the
    routing pipeline) was not on that connection: its success is not proven replicated
    and it answers :class:`~budgeter.store.durability.NotReplicated` instead."""
    if node is None:
        async with redis.pipeline(transaction=False) as pipe:
            for args in calls:
                pipe.execute_command(*args)
            replies: list[ScriptReply] = await as_connection_error(
                pipe.execute(raise_on_error=False)
            )
        if wanted is not None:
            replies = [_unproven(r) if n in durable else r for n, r in enumerate(replies)]
        return replies, None
    commands = [PipelineCommand(n, *args) for n, args in enumerate(calls)]
    if wanted is not None:
        commands.append(PipelineCommand(len(calls), *wanted.wait_args()))
    try:
        await as_connection_error(node.execute_pipeline(commands))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        for command in commands:
            command.result = exc
    failure = None if wanted is None else wanted.check(commands.pop().result)
    again = [c for c in commands if isinstance(c.result, _ALONE_AGAIN)]
    if again:
        answers = await asyncio.gather(
            *(redis.execute_command(*c.args) for c in again), return_exceptions=True
        )
        for command, answer in zip(again, answers, strict=True):
            proven = wanted is None or command.position not in durable
            command.result = answer if proven else _unproven(answer)
    return [command.result for command in commands], failure


def _unproven(reply: ScriptReply) -> ScriptReply:
    """A durable call's reply when no WAIT followed it on its connection: its error as
    it is, else NotReplicated (the write happened; a failover may still lose it)."""
    if isinstance(reply, BaseException):
        return reply
    return durability.NotReplicated(
        "a durable call went again on its own (redirected, or after a connection error): "
        "its write is not proven replicated"
    ).with_reply(reply)


def _first_key(args: tuple[ScriptArg, ...]) -> ScriptArg | None:
    """The first key of a command given to :meth:`RoundPipeline.command`: a script call's
    KEYS[1] (None: no keys), else the key of a single-key command (GET, SET, ...)."""
    if args[0] in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) else None
    return args[1] if len(args) > 1 else None


def round_pipeline(redis: RedisClient) -> RoundPipeline:
    """The one RoundPipeline of ``redis`` (one server or a cluster), kept on the client
    itself so that it lives and dies with it."""
    found = getattr(redis, _ROUND_ATTRIBUTE, None)
    if not isinstance(found, RoundPipeline):
        found = RoundPipeline(redis)
        setattr(redis, _ROUND_ATTRIBUTE, found)  # lives on the client
    return found


class PipelinedScript:
    """An AsyncScript whose calls go in the client's round pipeline (same call signature)."""

    def __init__(self, redis: RedisClient, script: AsyncScript, *, durable: bool = False) -> None:
        self.redis = redis
        self.script = script
        self.sha = script.sha
        self.round = round_pipeline(redis)
        self.durable = durable  # its writes WAIT for the replicas (when configured)

    async def __call__(
        self, keys: Sequence[str] = (), args: Sequence[ScriptArg] = ()
    ) -> ScriptReply:
        return await self.submit(keys, args)

    def submit(self, keys: Sequence[str], args: Sequence[ScriptArg]) -> asyncio.Future[ScriptReply]:
        """Queue the call in this round's pipeline at once (no task): the future answers."""
        key_list, arg_list = list(keys), list(args)
        redis = self.redis
        fallback: Callable[[], Awaitable[ScriptReply]]
        if isinstance(redis, RedisCluster):  # loads it on every master, calls again
            fallback = functools.partial(self._load_and_call, key_list, arg_list)
        else:
            fallback = functools.partial(
                durability.call_script, redis, self.script, key_list, arg_list, durable=self.durable
            )
        return self.round.command(
            "EVALSHA",
            self.sha,
            len(key_list),
            *key_list,
            *arg_list,
            fallback=fallback,
            durable=self.durable,
        )

    async def _load_and_call(self, keys: list[str], args: list[ScriptArg]) -> ScriptReply:
        """After NOSCRIPT on a cluster (a promoted replica, a restarted node): load the
        script on every master, then call it again in the round pipeline (a durable call
        WAITs there as the first one would have)."""
        await self.redis.script_load(self.script.script)
        return await self.round.command(
            "EVALSHA", self.sha, len(keys), *keys, *args, durable=self.durable
        )


async def _settled(call: Awaitable[ScriptReply]) -> ScriptReply:
    try:
        return await call
    except Exception as exc:
        return exc


def register(redis: RedisClient, name: str) -> Script:
    """Register a script with an async Redis (or RedisCluster) client: an AsyncScript-like
    callable ``await script(keys=[...], args=[...])`` with a ``sha``, whose calls go in the
    client's round pipeline."""
    script: AsyncScript = redis.register_script(lua_source(name))
    return PipelinedScript(redis, script, durable=name in durability.DURABLE_SCRIPTS)


class BatchedScript:
    """A script that decides many requests in one call: ``ARGV = head + [items]`` where
    the last argument is a JSON array of the items (each a JSON array: one argument
    instead of several per item, since redis-py packs every argument in Python), answered
    by one flat list of ``width`` values per item.

    Calls made while the event loop runs one round, with the same keys and head, become
    one script call (up to ``max_items`` items; all keys of one call share a hash tag, so
    this holds on Redis Cluster too). Calls with other keys go in the same pipeline.
    Each item's answer is what a call for that item alone, in that order, would give.
    """

    def __init__(
        self,
        redis: RedisClient,
        name: str,
        *,
        width: int,
        max_items: int = 256,
        stagger_at: int = 48,
    ) -> None:
        self.script = register(redis, name)
        self.width = width
        self.stagger_at = stagger_at
        self.sha = self.script.sha
        self.max_items = max_items
        self._groups: dict[_Group, list[_Call]] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(
        self, keys: tuple[str, ...], head: tuple[ScriptArg, ...], item: list[object]
    ) -> list[ScriptReply]:
        future: asyncio.Future[list[ScriptReply]] = asyncio.get_running_loop().create_future()
        self._groups.setdefault((keys, head), []).append((item, future))
        if not self._scheduled:
            self._scheduled = True
            if isinstance(self.script, PipelinedScript):  # emitted into the round pipeline
                self.script.round.join(self)
            else:
                asyncio.get_running_loop().call_soon(self.emit)
        return await future

    def emit(self) -> None:
        """Send the calls gathered this round: one script call per keys, head and chunk.

        A group of ``stagger_at`` calls or more sends half now and half one round later:
        Redis decides the first half while this process packs the second, and from then
        on the two halves come back, and are asked again, at different moments, so this
        process and Redis work at the same time instead of in turn."""
        self._scheduled = False
        groups, self._groups = self._groups, {}
        later: dict[_Group, list[_Call]] = {}
        for group, calls in groups.items():
            if len(calls) >= self.stagger_at:
                half = len(calls) // 2
                groups[group], later[group] = calls[:half], calls[half:]
        if later:
            for group, calls in later.items():
                self._groups.setdefault(group, []).extend(calls)
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if isinstance(self.script, PipelinedScript):
                loop.call_soon(self.script.round.join, self)
            else:
                loop.call_soon(loop.call_soon, self.emit)
        for (keys, head), calls in groups.items():
            for start in range(0, len(calls), self.max_items):
                chunk = calls[start : start + self.max_items]
                try:
                    items = jsonio.dumps([item for item, _ in chunk])
                except (TypeError, ValueError) as exc:  # never leave a caller waiting
                    self._deliver(chunk, exc)
                    continue
                args = [*head, items]
                if isinstance(self.script, PipelinedScript):  # into this round's pipeline
                    sent = self.script.submit(keys, args)
                    sent.add_done_callback(functools.partial(self._answered, chunk))
                else:
                    task = asyncio.ensure_future(self._send(keys, args, chunk))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)

    async def _send(self, keys: tuple[str, ...], args: list[ScriptArg], calls: list[_Call]) -> None:
        flat: list[ScriptReply] | BaseException
        try:
            flat = await self.script(keys=keys, args=args)
        except Exception as exc:
            flat = exc
        self._deliver(calls, flat)

    def _answered(self, calls: list[_Call], sent: asyncio.Future[ScriptReply]) -> None:
        if sent.cancelled():
            self._deliver(calls, asyncio.CancelledError())
        else:
            self._deliver(calls, sent.exception() or sent.result())

    def _deliver(self, calls: list[_Call], flat: list[ScriptReply] | BaseException) -> None:
        if not isinstance(flat, BaseException) and len(flat) != len(calls) * self.width:
            flat = RuntimeError(f"{len(flat)} values for {len(calls)} items")
        if isinstance(flat, BaseException):
            for _, future in calls:
                if not future.done():
                    future.set_exception(flat)
            return
        width = self.width
        for n, (_, future) in enumerate(calls):
            if not future.done():  # its caller was cancelled
                future.set_result(flat[n * width : (n + 1) * width])
