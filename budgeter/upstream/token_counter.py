"""Counting a request's input tokens with the upstream, cached by content hash (and the
betas it is sent with: the same payload may count differently under a beta)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Mapping

import aiohttp

from budgeter.admission.global_limits import GlobalLimits
from budgeter.domain import jsonio
from budgeter.domain.passthrough import NO_PASSTHROUGH, Passthrough, format_betas
from budgeter.metrics import Metrics
from budgeter.settings import Settings
from budgeter.store.keys import count_cache_key
from budgeter.store.scripts import round_pipeline
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient, UpstreamError, count_tokens_body

log = logging.getLogger(__name__)

# An image or document block counts as this many tokens in the local estimate (its base64
# data would otherwise count as text); Anthropic's images cost at most about 1,600 tokens.
ATTACHMENT_TOKENS = 1600


def payload_digest(body: Mapping[str, object], betas: tuple[str, ...] = ()) -> str:
    """What a count is cached under: the payload, and the betas it is counted with (in any
    order; without betas, the payload alone)."""
    canonical = jsonio.dumps(body, sort_keys=True)
    if betas:
        canonical += ("\n" + format_betas(sorted(betas))).encode()
    return hashlib.sha256(canonical).hexdigest()


def local_estimate(params: Mapping[str, object], margin: float) -> int:
    """A conservative input-token estimate without the upstream: one token per 3 bytes of
    the JSON that count_tokens would see (English runs near 4 characters per token),
    attachments at ``ATTACHMENT_TOKENS``, times ``margin``."""
    body = {k: v for k, v in count_tokens_body(params).items() if k != "model"}
    attachments = 0

    def strip(value: object) -> object:
        nonlocal attachments
        if isinstance(value, dict):
            if value.get("type") in ("image", "document") and isinstance(value.get("source"), dict):
                attachments += 1
                return {"type": value["type"]}
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    text = json.dumps(strip(body), ensure_ascii=False, separators=(",", ":"))
    tokens = len(text.encode()) / 3 + attachments * ATTACHMENT_TOKENS
    return math.ceil(tokens * margin) + 8


class CountCacheIO:
    """The count cache's reads and writes go in the client's round pipeline, with the
    other calls of the same event-loop round (scripts of the jobs moving with them), so a
    job costs no round trip of its own here. A SET is not waited for: the cache is only an
    optimisation, and a lost write costs one more count_tokens call. (On Redis Cluster
    they go in the pipeline of the node that holds the key.)

    A read or write that fails (Redis or the key's cluster node away, any Redis error) is
    a miss, or a write not made: never the job's failure. Each failure is counted
    (``budgeter_count_tokens_cache_total{result="error"}``); the first of an outage is
    logged once at WARNING, and the first success after it at INFO."""

    def __init__(self, redis: RedisClient, metrics: Metrics | None = None) -> None:
        self.round = round_pipeline(redis)
        self.metrics = metrics
        self.failing = False  # since the last failure, nothing succeeded

    async def get(self, key: str) -> bytes | str | None:
        try:
            value: bytes | str | None = await self.round.command("GET", key)
        except Exception as exc:  # a miss: the count comes from the upstream
            self._failed("read", exc)
            return None
        self._answered()
        return value

    async def set(self, key: str, value: int, ttl_s: int) -> None:
        self.round.command("SET", key, value, "EX", ttl_s).add_done_callback(self._written)

    def _written(self, future: asyncio.Future[object]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._answered()
        else:
            self._failed("write", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.count_cache_results["error"].inc()
        if not self.failing:
            self.failing = True
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            log.warning(
                "count cache %s failed: %s; counting with the upstream until it answers",
                what,
                reason,
            )

    def _answered(self) -> None:
        if self.failing:
            self.failing = False
            log.info("count cache answers again")


class TokenCounter:
    def __init__(
        self,
        redis: RedisClient,
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
        self.tenants = TenantStore(redis, prefix=prefix)
        self.cache = CountCacheIO(redis, metrics)

    async def count_for(
        self,
        tenant: str,
        params: Mapping[str, object],
        passthrough: Passthrough = NO_PASSTHROUGH,
    ) -> int:
        """Like :meth:`count`; when count_tokens keeps failing (after the client's own
        retries) and the tenant's policy says ``on_count_failure: estimate``, a local
        estimate instead. The reservation is settled against real usage either way."""
        try:
            return await self.count(params, passthrough)
        except UpstreamError as exc:
            if not (exc.retryable or exc.status >= 500):
                raise  # the upstream said the request itself is wrong
            policy = await self.tenants.get(tenant)
            if policy is None or policy.on_count_failure != "estimate":
                raise
            if self.metrics is not None:
                self.metrics.for_tenant(tenant).count_estimated.inc()
            return local_estimate(params, policy.estimate_margin)

    async def count(
        self, params: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> int:
        """Input tokens of ``params`` (only the fields count_tokens accepts are sent), sent
        as the call it admits is: with the caller's betas, version and query."""
        body = count_tokens_body(params, passthrough.betas)
        if self.ttl_s <= 0:
            return await self.upstream.count_tokens(body, passthrough)
        key = count_cache_key(self.prefix, payload_digest(body, passthrough.betas))
        cached = await self.cache.get(key)
        if cached is not None:
            self._hit("hit")
            return int(cached)
        self._hit("miss")
        tokens = await self.upstream.count_tokens(body, passthrough)
        await self.cache.set(key, tokens, self.ttl_s)
        return tokens

    def _hit(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.count_cache_results[result].inc()


def upstream_and_counter(
    session: aiohttp.ClientSession,
    redis: RedisClient,
    settings: Settings,
    metrics: Metrics,
    global_limits: GlobalLimits | None = None,
) -> tuple[UpstreamClient, TokenCounter]:
    """The upstream client and the cached token counter every process builds the same way
    from its settings. With ``global_limits``, an upstream 429 pauses the model everywhere."""
    upstream = UpstreamClient(
        session,
        settings.upstream_url,
        settings.upstream_api_key.get_secret_value(),
        timeout_s=settings.upstream_timeout_seconds,
        max_attempts=settings.upstream_max_attempts,
        observe=metrics.observe_upstream,
        on_rate_limited=global_limits.pause if global_limits is not None else None,
        anthropic_version=settings.upstream_anthropic_version,
    )
    counter = TokenCounter(
        redis,
        upstream,
        prefix=settings.key_prefix,
        ttl_s=settings.count_cache_ttl_seconds,
        metrics=metrics,
    )
    return upstream, counter
