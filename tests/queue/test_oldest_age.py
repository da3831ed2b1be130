"""The age of a tenant's oldest queued job (the queue-age gauge and the status page),
exactly (issue 21: mutmut found none of it asserted): the oldest head over the three
priority queues, from its batch's enqueue time, never negative, 0 with nothing queued."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batch_meta import parse_batch_meta
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import oldest_queued_age_s
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for

KEYS = TenantKeys.of("budgeter", "age")


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def enqueued_ms(redis: Redis, batch_id: str) -> int:
    meta = await redis.hget(KEYS.bmeta, batch_id)
    assert meta is not None
    enqueued = parse_batch_meta(meta).enqueued_ms
    assert enqueued is not None
    return enqueued


async def test_the_oldest_head_of_any_priority_gives_the_age(redis: Redis) -> None:
    await TenantStore(redis).put("age", TenantPolicy())
    store = BatchStore(redis)
    assert await oldest_queued_age_s(redis, KEYS, 10**13) == 0.0  # nothing queued
    low = await store.create("age", requests_for("age", 1), priority="low")
    high = await store.create("age", requests_for("age", 1), priority="high")
    normal = await store.create("age", requests_for("age", 1))
    first = await enqueued_ms(redis, low)
    assert first <= await enqueued_ms(redis, high) <= await enqueued_ms(redis, normal)
    async with asyncio.timeout(10):  # Redis's clock past the first batch's ms (bounded)
        while await server_ms(redis) <= first:  # noqa: ASYNC110 - a bounded poll of the server's clock
            await asyncio.sleep(0.001)
    later = await store.create("age", requests_for("age", 1), priority="low")
    assert await enqueued_ms(redis, later) > first  # behind the head of the low queue
    # the low queue's head is the oldest, though high and normal are served first
    assert await oldest_queued_age_s(redis, KEYS, first + 2_500) == 2.5
    assert await oldest_queued_age_s(redis, KEYS, first) == 0.0
    assert await oldest_queued_age_s(redis, KEYS, first - 1_000) == 0.0  # never negative


async def test_a_head_whose_batch_is_gone_is_no_age(redis: Redis) -> None:
    await TenantStore(redis).put("age", TenantPolicy())
    batch_id = await BatchStore(redis).create("age", requests_for("age", 1))
    started = await enqueued_ms(redis, batch_id)
    await redis.hdel(KEYS.bmeta, batch_id)
    assert await oldest_queued_age_s(redis, KEYS, started + 5_000) == 0.0
