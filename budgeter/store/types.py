"""The types every store shares: the Redis client (one server or a cluster), what a Lua
script takes and answers, and a registered script."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

RedisClient: TypeAlias = "Redis | RedisCluster"

ScriptArg: TypeAlias = "str | int | float | bytes"
"""One KEYS or ARGV element of a script call."""

ScriptReply: TypeAlias = Any
"""What a Lua script answers, as redis-py decodes it: nested lists of str and int, or an
error. Its shape is each script's contract (stated in the script's opening comment), so
the caller that knows the script narrows it."""


class Script(Protocol):
    """A registered Lua script: ``await script(keys=[...], args=[...])``."""

    sha: str

    async def __call__(
        self, keys: Sequence[str] = ..., args: Sequence[ScriptArg] = ...
    ) -> ScriptReply: ...
