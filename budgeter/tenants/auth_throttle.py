"""Failed authentication is rate limited per client address, shared by every API process
through Redis: each failure counts in a fixed window; past the limit, failures answer 429
``rate_limit_error`` with ``retry-after`` instead of 401. A correct key costs nothing here
(no Redis call on the happy path), and an address only ever limits its own failures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiohttp import web

from budgeter.store.keys import auth_failures_key
from budgeter.store.types import RedisClient


@dataclass(frozen=True, slots=True)
class AuthThrottle:
    redis: RedisClient
    prefix: str
    limit: int
    window_seconds: int = 60
    trust_forwarded_for: bool = False

    def client_of(self, request: web.Request) -> str:
        if self.trust_forwarded_for:
            forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
            if forwarded:
                return forwarded[:64]
        return request.remote or "unknown"

    async def failed(self, client: str) -> float | None:
        """Count one failure of ``client``; the seconds to wait when past the limit."""
        key = auth_failures_key(self.prefix, client)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=self.window_seconds, nx=True)
            pipe.incr(key)
            pipe.pttl(key)
            _, count, ttl_ms = await pipe.execute()
        if int(count) <= self.limit:
            return None
        return max(1.0, math.ceil(max(int(ttl_ms), 0) / 1000))
