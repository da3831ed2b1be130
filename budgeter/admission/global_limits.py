"""The upstream account's own limits, per model, shared by every worker and API process.

``GlobalLimits`` keeps this process's view of the global policy and of the models the
upstream paused (a 429 with ``retry-after``), refreshed from Redis at most once per
``refresh_s``. Admission asks it for the flat limits of a model, and reserves them in the
model's own scope ``{g:<digest>}`` after the tenant's reservation succeeded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from budgeter.domain.policy import GlobalPolicy
from budgeter.store.keys import (
    GlobalModelKeys,
    global_models_key,
    global_pauses_key,
    global_policy_key,
)
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient


class GlobalLimits:
    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "budgeter",
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.refresh_s = refresh_s
        self.clock = clock
        self.wall = wall
        self._pause = register(redis, "admission/pause.lua")
        self._loaded_at: float | None = None
        self._policy = GlobalPolicy()
        self._flat: dict[str, str] = {}  # model -> JSON of its flat limits ('' = none)
        self._pauses: dict[str, int] = {}
        self._known: set[str] = set()
        self._loading: asyncio.Task[None] | None = None  # the one refresh in flight

    def keys(self, model: str) -> GlobalModelKeys:
        return GlobalModelKeys(self.prefix, model)

    async def _refresh(self) -> None:
        now = self.clock()
        if self._loaded_at is not None and now - self._loaded_at < self.refresh_s:
            return
        # one read for every caller that finds the view stale at the same time (a caller
        # that asks for no staleness at all, refresh_s 0, always reads)
        if self._loading is None or self._loading.done() or self.refresh_s <= 0:
            self._loading = asyncio.ensure_future(self._load(now))
        await asyncio.shield(self._loading)

    async def _load(self, now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(global_policy_key(self.prefix))
            pipe.hgetall(global_pauses_key(self.prefix))
            raw, pauses = await pipe.execute()
        self._policy = GlobalPolicy.from_stored(raw)
        self._flat = {}
        self._pauses = {str(m): int(float(u)) for m, u in pauses.items()}
        self._loaded_at = now

    async def limits_json(self, model: str) -> str:
        """The model's global limits as admission/reserve.lua's ARGV[2] ('' when there are none)."""
        await self._refresh()
        found = self._flat.get(model)
        if found is None:
            limits = self._policy.limits_for(model)
            found = json.dumps(limits) if limits else ""
            if len(self._flat) < 10_000:
                self._flat[model] = found
        return found

    async def paused_until_ms(self, model: str) -> int:
        """When the upstream's pause of ``model`` ends (ms since the epoch; 0: not paused)."""
        await self._refresh()
        until = self._pauses.get(model, 0)
        return until if until > self.wall() * 1000 else 0

    async def pause(self, model: str, seconds: float) -> int:
        """The upstream refused ``model`` with 429: pause it for every process."""
        ms = max(1, int(seconds * 1000))
        until = int(await self._pause(keys=[global_pauses_key(self.prefix)], args=[model, ms]))
        await self._pause(keys=[self.keys(model).state], args=["paused_until", ms])
        self._pauses[model] = max(self._pauses.get(model, 0), until)
        return until

    async def remember(self, model: str) -> None:
        """Note that ``model`` has a scope in use, for the reaper."""
        if model not in self._known:
            await self.redis.sadd(global_models_key(self.prefix), model)
            if len(self._known) < 10_000:
                self._known.add(model)

    async def models(self) -> list[str]:
        return sorted(str(m) for m in await self.redis.smembers(global_models_key(self.prefix)))
