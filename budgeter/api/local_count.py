"""The API's token counter: a per-process cache of recent counts in front of the shared
Redis count cache (budgeter/upstream/token_counter.py)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from budgeter.domain.passthrough import NO_PASSTHROUGH, Passthrough
from budgeter.store.types import RedisClient
from budgeter.upstream.client import UpstreamClient, count_tokens_body
from budgeter.upstream.token_counter import TokenCounter, payload_digest

if TYPE_CHECKING:
    from budgeter.metrics import Metrics

LOCAL_COUNT_ENTRIES = 4096
LOCAL_COUNT_MAX_S = 600.0


class LocalCountCache(TokenCounter):
    """The API's token counter: in front of the shared Redis cache, the counts of this
    process's recent payloads (at most ``LOCAL_COUNT_ENTRIES``, least recently used
    first out), so a repeated payload costs no Redis round trip. A count only depends on
    the content hashed, so a local copy is never wrong; it is kept no longer than the
    Redis cache's TTL (and at most ``LOCAL_COUNT_MAX_S``). Local estimates (the
    ``on_count_failure: estimate`` fallback of :meth:`count_for`) are never cached."""

    @classmethod
    def over(cls, counter: TokenCounter) -> LocalCountCache:
        return cls(
            counter.redis,
            counter.upstream,
            prefix=counter.prefix,
            ttl_s=counter.ttl_s,
            metrics=counter.metrics,
        )

    def __init__(
        self,
        redis: RedisClient,
        upstream: UpstreamClient,
        *,
        prefix: str = "budgeter",
        ttl_s: int = 3600,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(redis, upstream, prefix=prefix, ttl_s=ttl_s, metrics=metrics)
        self._local: OrderedDict[str, tuple[int, float]] = OrderedDict()

    async def count(
        self, params: Mapping[str, Any], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> int:
        if self.ttl_s <= 0:
            return await super().count(params, passthrough)
        betas = passthrough.betas
        digest = payload_digest(count_tokens_body(params, betas), betas)
        now = time.monotonic()
        found = self._local.get(digest)
        if found is not None and found[1] > now:
            self._local.move_to_end(digest)
            if self.metrics is not None:
                self.metrics.count_cache_results["hit"].inc()
            return found[0]
        tokens = await super().count(params, passthrough)
        self._local[digest] = (tokens, now + min(float(self.ttl_s), LOCAL_COUNT_MAX_S))
        self._local.move_to_end(digest)
        while len(self._local) > LOCAL_COUNT_ENTRIES:
            self._local.popitem(last=False)
        return tokens
