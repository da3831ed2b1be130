"""When count_tokens keeps failing: refuse (the default) or admit on a local estimate with
a safety margin, settled against real usage (real Redis, mock upstream on loopback)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient, UpstreamError
from budgeter.upstream.token_counter import TokenCounter, local_estimate
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for, wait_ended

PARAMS = {
    "model": "m",
    "max_tokens": 10,
    "system": "be brief",
    "messages": [{"role": "user", "content": "How many tokens is this sentence, roughly?"}],
}


def test_the_local_estimate_is_above_the_mock_count_and_ignores_attachment_bytes() -> None:
    text_only = local_estimate(PARAMS, 1.0)
    assert text_only >= 20  # the mock counts about 1 token per 4 characters
    assert local_estimate(PARAMS, 2.0) > 2 * text_only - 10
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "A" * 3_000_000},
    }
    with_image = {**PARAMS, "messages": [{"role": "user", "content": [image]}]}
    assert 1600 <= local_estimate(with_image, 1.0) < 1700


async def test_a_dead_count_tokens_refuses_by_default_and_estimates_when_the_policy_says_so(
    redis: Redis,
) -> None:
    tenants = TenantStore(redis)
    await tenants.put("strict", TenantPolicy())
    await tenants.put("lenient", TenantPolicy(on_count_failure="estimate", estimate_margin=2))
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        dead = UpstreamClient(session, "http://127.0.0.1:9", "k", max_attempts=2, backoff_base_s=0)
        counter = TokenCounter(redis, dead, ttl_s=60, metrics=metrics)
        with pytest.raises(UpstreamError):
            await counter.count_for("strict", PARAMS)
        assert await counter.count_for("lenient", PARAMS) == local_estimate(PARAMS, 2)
    value = metrics.registry.get_sample_value(
        "budgeter_count_tokens_estimated_total", {"tenant": "lenient"}
    )
    assert value == 1


async def test_a_job_admitted_on_an_estimate_is_settled_at_its_real_usage(redis: Redis) -> None:
    await TenantStore(redis).put(
        "lenient", TenantPolicy(budgets={"day": 1_000_000}, on_count_failure="estimate")
    )
    store = BatchStore(redis)
    async with mock_upstream() as (url, _), aiohttp.ClientSession() as session:
        metrics = Metrics()
        upstream = UpstreamClient(session, url, "k")
        dead = UpstreamClient(session, "http://127.0.0.1:9", "k", max_attempts=1)
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(concurrency=4, maintenance_interval_s=0.2, drain_s=2),
            metrics=metrics,
            counter=TokenCounter(redis, dead, ttl_s=60, metrics=metrics),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            batch_id = await store.create("lenient", requests_for("lenient", 5))
            await wait_ended(store, [batch_id])
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    lines = [line async for line in store.results(batch_id)]
    assert {line["result"]["type"] for line in lines} == {"succeeded"}
    real = sum(
        line["result"]["message"]["usage"]["input_tokens"]
        + line["result"]["message"]["usage"]["output_tokens"]
        for line in lines
    )
    budget = await redis.hgetall(TenantKeys.of("budgeter", "lenient").budget)
    assert int(budget["day:used"]) == real and int(budget["day:reserved"]) == 0
    assert (
        metrics.registry.get_sample_value(
            "budgeter_count_tokens_estimated_total", {"tenant": "lenient"}
        )
        == 5
    )


async def test_identical_payloads_are_counted_once_with_a_hit_ratio_metric(
    redis: Redis,
) -> None:
    from budgeter.upstream.mock import STATE_KEY

    metrics = Metrics()
    async with mock_upstream() as (url, app), aiohttp.ClientSession() as session:
        counter = TokenCounter(redis, UpstreamClient(session, url, "k"), ttl_s=60, metrics=metrics)
        first = await counter.count(PARAMS)
        # the same content, keys in another order and with fields count_tokens ignores
        same = {"max_tokens": 999, **dict(reversed(list(PARAMS.items())))}
        assert await counter.count(same) == first
        other = {**PARAMS, "messages": [{"role": "user", "content": "something else"}]}
        await counter.count(other)
        assert app[STATE_KEY].stats.requests["count_tokens"] == 2
    hits = metrics.registry.get_sample_value("budgeter_count_tokens_cache_total", {"result": "hit"})
    misses = metrics.registry.get_sample_value(
        "budgeter_count_tokens_cache_total", {"result": "miss"}
    )
    assert (hits, misses) == (1, 2)
    ttls = [await redis.ttl(key) async for key in redis.scan_iter(match="*ct:*")]
    assert len(ttls) == 2 and all(0 < ttl <= 60 for ttl in ttls)
