"""Attempts counted by the queue (issue 21): a job whose lease keeps expiring is handed out
exactly ``max_attempts`` times, then returned for dead-lettering; a deferred job's lease
does not count as an attempt."""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for

FAR = 10**13  # a "now" after every lease expiry


async def test_a_job_abandoned_by_its_workers_is_dead_after_exactly_max_attempts(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("ab", TenantPolicy())
    store = BatchStore(redis)
    await store.create("ab", requests_for("ab", 1))
    attempts = []
    for _ in range(10):
        pick = await store.queue.pick(lease_ms=60_000)
        if pick.job is None:
            break
        attempts.append(pick.job.attempt)
        requeued, dead = await store.queue.reclaim("ab", max_attempts=3, now_ms=FAR)
        if dead:
            assert (requeued, dead) == (0, [pick.job.id])
            break
        assert requeued == 1
    assert attempts == [1, 2, 3]


async def test_a_deferred_lease_is_not_an_attempt(redis: Redis) -> None:
    await TenantStore(redis).put("df", TenantPolicy())
    store = BatchStore(redis)
    await store.create("df", requests_for("df", 1))
    for _ in range(3):
        pick = await store.queue.pick(lease_ms=60_000)
        assert pick.job is not None and pick.job.attempt == 1
        assert await store.queue.defer(pick.job, pick.now_ms) == "requeued"
    pick = await store.queue.pick(lease_ms=60_000)
    assert pick.job is not None
    assert await store.queue.retry_later(pick.job) == "requeued"
    pick = await store.queue.pick(lease_ms=60_000)
    assert pick.job is not None and pick.job.attempt == 2


async def test_a_failed_attempt_goes_to_the_tail_of_its_queue_and_wakes_one_worker(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("tl", TenantPolicy())
    store = BatchStore(redis)
    await store.create("tl", requests_for("tl", 2))
    pick = await store.queue.pick(lease_ms=60_000)
    assert pick.job is not None
    await redis.delete("budgeter:{sched}:wake")
    assert await store.queue.retry_later(pick.job) == "requeued"
    queued = await redis.lrange("budgeter:{t:tl}:queue", 0, -1)
    assert len(queued) == 2 and queued[-1] == pick.job.id  # behind the job not yet tried
    assert await redis.lrange("budgeter:{sched}:wake", 0, -1) == ["tl"]  # one wake
    again = await store.queue.pick(lease_ms=60_000)
    assert again.job is not None and again.job.id == queued[0] and again.job.attempt == 1
