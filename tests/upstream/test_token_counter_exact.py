"""Exact values of the token counter's pieces (issue 21, mutation testing): the local
estimate's arithmetic, the count cache's writes and failures, ``count_for``'s choice
between refusing and estimating, and the settings ``upstream_and_counter`` wires in."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from budgeter.admission.global_limits import GlobalLimits
from budgeter.domain.passthrough import NO_PASSTHROUGH, Passthrough
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient, UpstreamError
from budgeter.upstream.token_counter import (
    CountCacheIO,
    TokenCounter,
    local_estimate,
    payload_digest,
    upstream_and_counter,
)
from tests.helpers import mock_upstream

NINE = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "abcdefghi"}]}
# count_tokens would see {"messages":[{"role":"user","content":"abcdefghi"}]}: 52 bytes


def test_the_local_estimate_is_a_token_per_3_bytes_times_the_margin_plus_8() -> None:
    assert local_estimate(NINE, 1.0) == 18 + 8  # ceil(52 / 3) + 8
    assert local_estimate(NINE, 1.5) == 26 + 8  # ceil(52 / 3 * 1.5)
    assert local_estimate(NINE, 2.0) == 35 + 8  # ceil(34.67)


def test_the_local_estimate_counts_bytes_of_utf8_not_escapes() -> None:
    accents = {"model": "m", "messages": [{"role": "user", "content": "ééé"}]}
    # 43 ASCII bytes and 3 two-byte characters: 49 bytes (as \u00e9 escapes: 61)
    assert local_estimate(accents, 1.0) == 17 + 8


def test_an_image_or_document_counts_1600_tokens_and_not_its_data() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}
    document = {"type": "document", "source": {"type": "base64", "media_type": "x/pdf"}}
    image["source"]["data"] = "A" * 999  # type: ignore[index]
    document["source"]["data"] = "B" * 999  # type: ignore[index]
    params = {"model": "m", "messages": [{"role": "user", "content": [image, document]}]}
    # what is left: ..."content":[{"type":"image"},{"type":"document"}]...: 79 bytes
    assert local_estimate(params, 1.0) == 27 + 2 * 1600 + 8  # ceil(79 / 3 + 3200) + 8
    # a block whose source is not an object is text like any other
    odd = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image", "source": "x"}]}],
    }
    assert local_estimate(odd, 1.0) == 24 + 8  # 72 bytes


def test_the_payload_digest_ignores_the_order_of_betas_and_changes_with_them() -> None:
    body = {"messages": [], "model": "m"}
    assert payload_digest(body, ("b", "a")) == payload_digest(body, ("a", "b"))
    assert payload_digest(body, ("a",)) != payload_digest(body)
    assert payload_digest({"model": "m", "messages": []}) == payload_digest(body)
    other = {"messages": [], "model": "n"}
    assert payload_digest(other, ("a",)) != payload_digest(body, ("a",))  # the body counts


def test_the_payload_digest_is_the_same_in_every_version() -> None:
    """Processes of two versions share the cache during a rolling deploy: the digest is a
    format, pinned here (sha256 of the sorted JSON, then a newline and the sorted betas)."""
    body = {"model": "m", "messages": []}
    canonical = b'{"messages":[],"model":"m"}'
    assert payload_digest(body) == hashlib.sha256(canonical).hexdigest()
    with_betas = hashlib.sha256(canonical + b"\na,b").hexdigest()
    assert payload_digest(body, ("b", "a")) == with_betas


def dead_redis() -> Redis:
    """A client of a port nobody listens on: every call fails at once."""
    return Redis.from_url(
        "redis://127.0.0.1:9/0", socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def errors(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "budgeter_count_tokens_cache_total", {"result": "error"}
    )


async def set_and_wait(cache: CountCacheIO, key: str, value: int) -> None:
    """A SET, and until its done callback (not waited for by the cache) has run."""
    ran = asyncio.Event()
    written = cache._written

    def watched(future: asyncio.Future[object]) -> None:
        written(future)
        ran.set()

    cache._written = watched  # type: ignore[method-assign]
    try:
        await cache.set(key, value, 60)
        await asyncio.wait_for(ran.wait(), 10)
    finally:
        cache._written = written  # type: ignore[method-assign]


async def test_a_cache_write_stores_the_count_with_its_ttl(redis: Redis) -> None:
    cache = CountCacheIO(redis, Metrics())
    await cache.set("budgeter:{ct:w}", 42, 77)
    assert await cache.get("budgeter:{ct:w}") == "42"  # same round pipeline: after the SET
    assert 70 < await redis.ttl("budgeter:{ct:w}") <= 77


async def test_cache_failures_are_counted_and_logged_once_until_it_answers(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    client = dead_redis()
    cache = CountCacheIO(client, metrics)
    assert cache.failing is False
    try:
        with caplog.at_level(logging.INFO, logger="budgeter.upstream.token_counter"):
            assert await cache.get("budgeter:{ct:a}") is None
            await set_and_wait(cache, "budgeter:{ct:a}", 1)
            assert await cache.get("budgeter:{ct:b}") is None
            assert errors(metrics) == 3
            assert cache.failing
            cache.round = CountCacheIO(redis).round  # Redis is back
            await set_and_wait(cache, "budgeter:{ct:a}", 5)
            assert cache.failing is False  # the write answered
            assert await cache.get("budgeter:{ct:a}") == "5"
    finally:
        await client.aclose()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in lines if level == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("count cache read failed: ")
    assert "127.0.0.1:9" in warnings[0]  # the reason: the error's own words
    assert [m for level, m in lines if level == logging.INFO] == ["count cache answers again"]
    assert errors(metrics) == 3


async def test_a_failed_write_is_logged_as_a_write_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    client = dead_redis()
    cache = CountCacheIO(client, metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="budgeter.upstream.token_counter"):
            await set_and_wait(cache, "budgeter:{ct:w}", 1)
    finally:
        await client.aclose()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("count cache write failed: ") and "127.0.0.1:9" in warning
    assert cache.failing is True and errors(metrics) == 1


def test_a_failure_reason_is_one_line_of_at_most_200_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = CountCacheIO(dead_redis())
    with caplog.at_level(logging.WARNING, logger="budgeter.upstream.token_counter"):
        cache._failed("write", RuntimeError("a\n  b " + "x" * 300))
        cache.failing = False
        cache._failed("read", RuntimeError())
    first, second = (r.getMessage() for r in caplog.records)
    reason = first.removeprefix("count cache write failed: ").split(";")[0]
    assert reason == ("a b " + "x" * 300)[:200]
    assert second.startswith("count cache read failed: RuntimeError;")


async def test_a_write_cancelled_is_neither_a_failure_nor_an_answer() -> None:
    metrics = Metrics()
    cache = CountCacheIO(dead_redis(), metrics)
    cache.failing = True
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    future.cancel()
    cache._written(future)
    assert cache.failing and errors(metrics) == 0


class CountsOrFails(UpstreamClient):
    """An upstream whose count_tokens answers ``tokens`` or raises ``error``."""

    def __init__(self, session: aiohttp.ClientSession, error: UpstreamError | None) -> None:
        super().__init__(session, "http://127.0.0.1:9", "k")
        self.error = error
        self.calls = 0
        self.sent: list[tuple[Mapping[str, object], Passthrough]] = []

    async def count_tokens(
        self, body: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> int:
        self.calls += 1
        self.sent.append((body, passthrough))
        if self.error is not None:
            raise self.error
        return 11


def upstream_error(status: int, *, retryable: bool) -> UpstreamError:
    body = {"type": "error", "error": {"type": "api_error", "message": "no"}}
    return UpstreamError(status, body, retryable=retryable)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "retryable", "estimated"),
    [(500, False, True), (0, True, True), (499, False, False), (400, False, False)],
)
async def test_count_for_estimates_only_when_the_upstream_failed_not_when_it_refused(
    redis: Redis, status: int, retryable: bool, estimated: bool
) -> None:
    await TenantStore(redis).put(
        "est", TenantPolicy(on_count_failure="estimate", estimate_margin=1.5)
    )
    async with aiohttp.ClientSession() as session:
        error = upstream_error(status, retryable=retryable)
        counter = TokenCounter(redis, CountsOrFails(session, error), ttl_s=60)
        if estimated:
            assert await counter.count_for("est", NINE) == 26 + 8  # the margin of 1.5
        else:
            with pytest.raises(UpstreamError) as raised:
                await counter.count_for("est", NINE)
            assert raised.value is error


async def test_count_for_an_unknown_tenant_refuses(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        error = upstream_error(503, retryable=True)
        counter = TokenCounter(redis, CountsOrFails(session, error), ttl_s=60)
        with pytest.raises(UpstreamError):
            await counter.count_for("nobody", NINE)


async def test_a_ttl_of_0_counts_every_time_and_caches_nothing(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        upstream = CountsOrFails(session, None)
        counter = TokenCounter(redis, upstream, ttl_s=0)
        assert [await counter.count(NINE) for _ in range(2)] == [11, 11]
        assert upstream.calls == 2
    assert [key async for key in redis.scan_iter(match="*ct:*")] == []


async def test_a_count_is_cached_under_its_prefix_for_its_ttl(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        upstream = CountsOrFails(session, None)
        counter = TokenCounter(redis, upstream, prefix="px", ttl_s=90)
        assert await counter.count(NINE) == 11 and await counter.count(NINE) == 11
        assert upstream.calls == 1
    keys = [key async for key in redis.scan_iter(match="*ct:*")]
    assert len(keys) == 1 and keys[0].startswith("px:{ct:")
    assert 80 < await redis.ttl(keys[0]) <= 90


async def test_upstream_and_counter_wire_every_setting(redis: Redis) -> None:
    settings = Settings(
        upstream_url="http://127.0.0.1:9/base/",
        upstream_api_key="sk-wired",
        upstream_timeout_seconds=12.5,
        upstream_max_attempts=3,
        upstream_anthropic_version="client",
        key_prefix="wp",
        count_cache_ttl_seconds=45,
    )
    metrics = Metrics()
    limits = GlobalLimits(redis, prefix="wp")
    async with aiohttp.ClientSession() as session:
        upstream, counter = upstream_and_counter(session, redis, settings, metrics, limits)
        bare, _ = upstream_and_counter(session, redis, settings, metrics)
        assert upstream._session is session
        assert upstream.base_url == "http://127.0.0.1:9/base"
        assert upstream._headers["x-api-key"] == "sk-wired"
        assert (upstream.timeout_s, upstream.max_attempts) == (12.5, 3)
        assert upstream.anthropic_version == "client"
        assert upstream._observe == metrics.observe_upstream
        assert upstream.on_rate_limited == limits.pause and bare.on_rate_limited is None
        assert counter.redis is redis and counter.upstream is upstream
        assert (counter.prefix, counter.ttl_s, counter.metrics) == ("wp", 45, metrics)
        assert counter.tenants.prefix == "wp" and counter.cache.metrics is metrics


async def test_the_counter_counts_hits_and_misses(redis: Redis) -> None:
    metrics = Metrics()
    async with mock_upstream() as (url, _app), aiohttp.ClientSession() as session:
        counter = TokenCounter(redis, UpstreamClient(session, url, "k"), metrics=metrics)
        first = await counter.count(NINE)
        assert await counter.count(NINE) == first
    get = metrics.registry.get_sample_value
    assert get("budgeter_count_tokens_cache_total", {"result": "miss"}) == 1
    assert get("budgeter_count_tokens_cache_total", {"result": "hit"}) == 1


BETAS = Passthrough(betas=("context-management-2025-06-27",), version="2023-06-01")
WITH_BETA_FIELD = {**NINE, "context_management": {"edits": []}}


@pytest.mark.parametrize("ttl_s", [0, 60])
async def test_the_count_is_sent_with_the_callers_betas_and_their_fields(
    redis: Redis, ttl_s: int
) -> None:
    await TenantStore(redis).put("pt", TenantPolicy())
    async with aiohttp.ClientSession() as session:
        upstream = CountsOrFails(session, None)
        counter = TokenCounter(redis, upstream, ttl_s=ttl_s)
        assert await counter.count_for("pt", WITH_BETA_FIELD, BETAS) == 11
    ((body, passthrough),) = upstream.sent
    assert passthrough is BETAS
    assert body["context_management"] == {"edits": []}  # a beta-only field, kept with betas
    assert "max_tokens" not in body


async def test_the_same_payload_with_and_without_betas_is_cached_apart(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        upstream = CountsOrFails(session, None)
        counter = TokenCounter(redis, upstream, ttl_s=60)
        await counter.count(NINE, BETAS)
        await counter.count(NINE)
        await counter.count(NINE, BETAS)
        assert upstream.calls == 2


async def counted_writes(counter: TokenCounter) -> list[tuple[int, int]]:
    """Count NINE once; the (value, ttl) of each cache write it made."""
    written: list[tuple[int, int]] = []

    async def record(key: str, value: int, ttl_s: int) -> None:  # noqa: ARG001
        written.append((value, ttl_s))

    counter.cache.set = record  # type: ignore[method-assign]
    assert await counter.count(NINE) == 11
    return written


async def test_a_ttl_of_1_second_still_caches(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        counter = TokenCounter(redis, CountsOrFails(session, None), ttl_s=1)
        assert await counted_writes(counter) == [(11, 1)]


async def test_a_count_is_cached_for_an_hour_by_default(redis: Redis) -> None:
    async with aiohttp.ClientSession() as session:
        counter = TokenCounter(redis, CountsOrFails(session, None))
        assert await counted_writes(counter) == [(11, 3600)]
