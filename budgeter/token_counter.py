"""Counting a request's input tokens with the upstream, cached by content hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from budgeter.keys import count_cache_key
from budgeter.metrics import Metrics
from budgeter.upstream import UpstreamClient, count_tokens_body


def payload_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class TokenCounter:
    def __init__(
        self,
        redis: Any,
        upstream: UpstreamClient,
        *,
        prefix: str = "budgeter",
        ttl_s: int = 3600,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.upstream = upstream
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.metrics = metrics

    async def count(self, params: Mapping[str, Any]) -> int:
        """Input tokens of ``params`` (only the fields count_tokens accepts are sent)."""
        body = count_tokens_body(params)
        if self.ttl_s <= 0:
            return await self.upstream.count_tokens(body)
        key = count_cache_key(self.prefix, payload_digest(body))
        cached = await self.redis.get(key)
        if cached is not None:
            self._hit("hit")
            return int(cached)
        self._hit("miss")
        tokens = await self.upstream.count_tokens(body)
        await self.redis.set(key, tokens, ex=self.ttl_s)
        return tokens

    def _hit(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.count_cache.labels(result).inc()


def upstream_and_counter(
    session: Any, redis: Any, settings: Any, metrics: Metrics, global_limits: Any = None
) -> tuple[UpstreamClient, TokenCounter]:
    """The upstream client and the cached token counter every process builds the same way
    from its settings (``budgeter.settings.Settings``). With ``global_limits`` (a
    budgeter.global_limits.GlobalLimits), an upstream 429 pauses the model everywhere."""
    upstream = UpstreamClient(
        session,
        settings.upstream_url,
        settings.upstream_api_key.get_secret_value(),
        timeout_s=settings.upstream_timeout_seconds,
        max_attempts=settings.upstream_max_attempts,
        observe=metrics.observe_upstream,
        on_rate_limited=global_limits.pause if global_limits is not None else None,
    )
    counter = TokenCounter(
        redis,
        upstream,
        prefix=settings.key_prefix,
        ttl_s=settings.count_cache_ttl_seconds,
        metrics=metrics,
    )
    return upstream, counter
