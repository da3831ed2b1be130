"""Loads the ``.lua`` files that live beside the package's modules.

A script whose text contains ``-- needs: <file>.lua`` gets that helper file prepended, so
shared Lua functions (calendar periods, server time) are written once.

Calls of one script from many coroutines are pipelined: the calls made while the event
loop runs one round go to Redis together, as one non-transactional pipeline of EVALSHAs
(one write and one read instead of one round trip each). Each call is still its own
atomic script; only the network trips are shared. (On Redis Cluster every call goes
alone: redis-py's cluster pipeline would split the batch per node anyway.)
"""

from __future__ import annotations

import asyncio
import json
import re
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

MAX_BATCH = 512

_NEEDS = re.compile(r"^-- needs: (\S+\.lua)$", re.MULTILINE)


@cache
def lua_source(name: str) -> str:
    """The full text of script ``name`` with its helpers prepended."""
    text = resources.files("budgeter").joinpath(name).read_text(encoding="utf-8")
    helpers = [lua_source(helper) for helper in _NEEDS.findall(text)]
    return "\n".join([*helpers, text])


class PipelinedScript:
    """An AsyncScript whose concurrent calls share pipelines (same call signature)."""

    def __init__(self, redis: Any, script: AsyncScript) -> None:
        self.redis = redis
        self.script = script
        self.sha = script.sha
        self._pending: list[tuple[list[Any], list[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, keys: Any = (), args: Any = ()) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((list(keys), list(args), future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._run(batch)
                except BaseException as exc:  # never leave a caller waiting forever
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._flusher = None

    async def _run(self, batch: list[tuple[list[Any], list[Any], asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            keys, args, future = batch[0]
            replies: list[Any] = [await _settled(self.script(keys=keys, args=args))]
        else:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args, _ in batch:
                        pipe.evalsha(self.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection failed even after its retries
                replies = [exc] * len(batch)
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, call again
                reply = await _settled(self.script(keys=keys, args=args))
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)


async def _settled(call: Any) -> Any:
    try:
        return await call
    except Exception as exc:
        return exc


def register(redis: Any, name: str) -> Any:
    """Register a script with an async Redis (or RedisCluster) client: an AsyncScript-like
    callable ``await script(keys=[...], args=[...])`` with a ``sha``."""
    script: AsyncScript = redis.register_script(lua_source(name))
    if isinstance(redis, RedisCluster):
        return script
    return PipelinedScript(redis, script)


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

    def __init__(self, redis: Any, name: str, *, width: int, max_items: int = 256) -> None:
        self.script = register(redis, name)
        self.width = width
        self.sha = self.script.sha
        self.max_items = max_items
        self._groups: dict[tuple[tuple[str, ...], tuple[Any, ...]], list[Any]] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: tuple[str, ...], head: tuple[Any, ...], item: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._groups.setdefault((keys, head), []).append((item, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        groups, self._groups = self._groups, {}
        for (keys, head), calls in groups.items():
            for start in range(0, len(calls), self.max_items):
                chunk = calls[start : start + self.max_items]
                task = asyncio.ensure_future(self._send(keys, head, chunk))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, keys: tuple[str, ...], head: tuple[Any, ...], calls: list[Any]) -> None:
        args = [*head, json.dumps([item for item, _ in calls], separators=(",", ":"))]
        try:
            flat = await self.script(keys=keys, args=args)
            if len(flat) != len(calls) * self.width:
                raise RuntimeError(f"{len(flat)} values for {len(calls)} items")
        except BaseException as exc:
            for _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        width = self.width
        for n, (_, future) in enumerate(calls):
            if not future.done():  # its caller was cancelled
                future.set_result(flat[n * width : (n + 1) * width])
