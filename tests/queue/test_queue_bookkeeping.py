"""queue/ack.lua, queue/dequeue.lua and queue/reclaim.lua bookkeeping, asserted exactly on
the Redis keys (issue 21, item 3: each test kills named mutants of tools/mutate_lua.py that
the behavioural tests let live). The clock is passed in.
"""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, LeasedJob, NewJob
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000
LEASE = 30_000
DEAD_KEPT = 10_000  # queue/ack.lua keeps the last 10,000 dead-lettered ids


def jobs(n: int, prefix: str = "r") -> list[NewJob]:
    return [
        NewJob(f"{prefix}{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)
    ]


async def setup(redis: Redis) -> JobQueue:
    await TenantStore(redis).put("acme", TenantPolicy())
    return JobQueue(redis)


async def lease_one(queue: JobQueue) -> LeasedJob:
    pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
    assert pick.job is not None
    return pick.job


async def dequeue(queue: JobQueue, wanted: int) -> list[object]:
    """queue/dequeue.lua's own answer (jobs left, now, has_policy, then 5 per job)."""
    k = queue.keys("acme")
    keys = [k.queue, k.leases, k.jobs, k.jstate, k.attempts, k.bmeta, k.canceled_batches]
    keys += [k.policy, k.queue_high, k.queue_low]
    return list(await queue._dequeue(keys=keys, args=[str(NOW), LEASE, wanted]))


async def test_ack_drops_the_lease_and_counts_the_outcome_once(redis: Redis) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(2))
    keys = queue.keys("acme")
    first = await lease_one(queue)
    assert await redis.zscore(keys.leases, first.id) == NOW + LEASE
    assert await queue.ack(first, "succeeded", {"type": "succeeded"})
    assert await redis.zcard(keys.leases) == 0
    assert await redis.hget(keys.jstate, first.id) == "succeeded"
    batch = await redis.hgetall(keys.batch("b1"))
    assert (batch["processing"], batch["succeeded"], batch["errored"]) == ("1", "1", "0")
    assert "ended_ms" not in batch
    outcomes = await redis.hgetall(keys.outcomes)
    assert (outcomes["submitted"], outcomes["succeeded"]) == ("2", "1")
    # a second ack changes no count; the last one ends the batch
    assert not await queue.ack(first, "errored", {"type": "errored"})
    second = await lease_one(queue)
    assert await queue.ack(second, "errored", {"type": "errored"})
    batch = await redis.hgetall(keys.batch("b1"))
    assert (batch["processing"], batch["succeeded"], batch["errored"]) == ("0", "1", "1")
    assert "ended_ms" in batch
    outcomes = await redis.hgetall(keys.outcomes)
    assert (outcomes["succeeded"], outcomes["errored"]) == ("1", "1")


async def test_the_dead_list_keeps_the_last_10000_ids(redis: Redis) -> None:
    queue = await setup(redis)
    keys = queue.keys("acme")
    await redis.rpush(keys.dead, *[f"old{n}" for n in range(DEAD_KEPT)])
    await queue.submit("acme", "b1", jobs(1))
    job = await lease_one(queue)
    assert await queue.ack(job, "errored", {"type": "errored"}, dead=True)
    assert await redis.llen(keys.dead) == DEAD_KEPT
    assert await redis.lindex(keys.dead, 0) == "old1"
    assert await redis.lindex(keys.dead, -1) == job.id


async def test_dequeue_looks_at_most_at_1000_entries_more_than_it_wants(redis: Redis) -> None:
    """Entries of jobs that are gone (deleted, canceled) are dropped while looking for a
    job; a call looks 1000 + wanted times at most (finding the high queue empty is one
    look), so 999 stale entries before a job of the normal queue still find it, 1000 do
    not (the job stays queued for the next call)."""
    queue = await setup(redis)
    keys = queue.keys("acme")
    await redis.rpush(keys.queue, *[f"gone:{n}" for n in range(999)])
    await queue.submit("acme", "b1", jobs(1))
    reply = await dequeue(queue, 1)
    assert reply[0] == 0 and reply[3] == "b1:r0"
    await redis.rpush(keys.queue, *[f"gone:{n}" for n in range(1000)])
    await queue.submit("acme", "b2", jobs(1))
    reply = await dequeue(queue, 1)
    assert reply[:1] == [1] and len(reply) == 3
    assert await redis.lrange(keys.queue, 0, -1) == ["b2:r0"]
    assert await redis.hget(keys.jstate, "b2:r0") is None  # still queued, not leased


async def test_dequeue_takes_exactly_what_is_wanted_and_answers_what_is_left(
    redis: Redis,
) -> None:
    """2 high, 3 normal and 4 low jobs queued: taking 3 leaves 6, across the queues."""
    queue = await setup(redis)
    await queue.submit("acme", "hi", jobs(2, "h"), priority="high")
    await queue.submit("acme", "no", jobs(3, "n"))
    await queue.submit("acme", "lo", jobs(4, "l"), priority="low")
    reply = await dequeue(queue, 3)
    assert reply[0] == 6
    assert reply[3::5] == ["hi:h0", "hi:h1", "no:n0"]
    assert reply[5::5] == [1, 1, 1]  # attempts
    leases = await redis.zrange(queue.keys("acme").leases, 0, -1, withscores=True)
    assert sorted(leases) == [(j, NOW + LEASE) for j in ("hi:h0", "hi:h1", "no:n0")]
    assert (await dequeue(queue, 1))[0] == 5


async def test_reclaim_keeps_a_dead_jobs_lease_for_a_minute(redis: Redis) -> None:
    """A job that used its attempts is answered for dead-lettering and its lease moved to
    now + 60 s (a crash before the ack only delays it); it is not requeued."""
    queue = await setup(redis)
    keys = queue.keys("acme")
    await queue.submit("acme", "b1", jobs(1))
    job = await lease_one(queue)
    later = NOW + LEASE + 1
    requeued, dead = await queue.reclaim("acme", max_attempts=1, now_ms=later)
    assert (requeued, dead) == (0, [job.id])
    assert await redis.zscore(keys.leases, job.id) == later + 60_000
    assert await redis.hget(keys.jstate, job.id) == "leased"
    assert await queue.queued("acme") == 0
    # not due again until that minute is over
    assert await queue.reclaim("acme", max_attempts=1, now_ms=later + 59_999) == (0, [])
