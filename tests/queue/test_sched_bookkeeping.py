"""sched/activate.lua and sched/pick.lua bookkeeping, asserted exactly on the scheduler's
keys (issue 21, item 3: each test kills named mutants of tools/mutate_lua.py that the
behavioural tests let live): the parked set, the virtual times and the virtual clock, the
job sizes folded from the workers' reports. The clock is passed in.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000
LEASE = 30_000


def jobs(n: int, prefix: str = "r") -> list[NewJob]:
    return [
        NewJob(f"{prefix}{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)
    ]


async def setup(redis: Redis, **weights: float) -> JobQueue:
    for tenant, weight in weights.items():
        await TenantStore(redis).put(tenant, TenantPolicy(weight=weight))
    return JobQueue(redis)


async def floats(redis: Redis, key: str) -> dict[str, float]:
    return {k: float(v) for k, v in (await redis.hgetall(key)).items()}


async def test_a_park_ended_early_leaves_the_parked_set(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(2))
    job = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert job is not None
    assert await queue.defer(job, NOW + 60_000) == "requeued"
    assert await redis.zscore(queue.sched.parked, "acme") == NOW + 60_000
    assert await redis.zscore(queue.sched.ready, "acme") is None
    await queue.activate("acme")  # work, but no early end: it stays parked
    assert await redis.zscore(queue.sched.ready, "acme") is None
    await queue.activate("acme", unpark=True)
    assert await redis.zcard(queue.sched.parked) == 0
    assert await redis.zscore(queue.sched.ready, "acme") is not None
    pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
    assert pick.job is not None and pick.next_parked_ms == -1


async def test_a_park_that_is_due_moves_the_tenant_back_to_ready(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(2))
    job = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert job is not None
    await queue.defer(job, NOW + 10_000)
    early = await queue.pick(lease_ms=LEASE, now_ms=NOW + 9_999)
    assert early.job is None and early.next_parked_ms == NOW + 10_000
    due = await queue.pick(lease_ms=LEASE, now_ms=NOW + 10_000)
    assert due.job is not None and due.job.custom_id == "r0"
    assert due.next_parked_ms == -1
    assert await redis.zcard(queue.sched.parked) == 0


async def test_each_pick_advances_the_virtual_time_and_the_clock(redis: Redis) -> None:
    """Weight 2, job size 1 (nothing reported yet): each pick adds 0.5 to the tenant's
    time; the clock is the chosen tenant's time before it advanced."""
    queue = await setup(redis, acme=2)
    await queue.submit("acme", "b1", jobs(3))
    assert await redis.zscore(queue.sched.ready, "acme") == 0
    await queue.pick(lease_ms=LEASE, now_ms=NOW)
    assert await floats(redis, queue.sched.vtime) == {"acme": 0.5, "_v": 0.0}
    assert await redis.zscore(queue.sched.ready, "acme") == 0.5
    await queue.pick(lease_ms=LEASE, now_ms=NOW)
    assert await floats(redis, queue.sched.vtime) == {"acme": 1.0, "_v": 0.5}
    assert await redis.zscore(queue.sched.ready, "acme") == 1.0


async def test_a_tenant_back_from_idle_enters_at_the_clock_or_the_lowest_ready(
    redis: Redis,
) -> None:
    """acme drains its queue at time 1 and leaves; while it is idle, beta is served at
    0, 1, 2 and 3 and drains too: acme's new work enters at the clock (3), not at its own
    1; then beta's enters at the lowest ready time (acme's 3), not at its own 4."""
    queue = await setup(redis, acme=1, beta=1)
    await queue.submit("acme", "a1", jobs(1))
    assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is not None
    assert await redis.zscore(queue.sched.ready, "acme") is None  # drained: left ready
    assert await floats(redis, queue.sched.vtime) == {"acme": 1.0, "_v": 0.0}
    await queue.submit("beta", "b1", jobs(4))
    assert await redis.zscore(queue.sched.ready, "beta") == 0  # the clock, 0
    for _ in range(4):
        assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is not None
    assert await redis.zcard(queue.sched.ready) == 0
    assert await floats(redis, queue.sched.vtime) == {"acme": 1.0, "beta": 4.0, "_v": 3.0}
    await queue.submit("acme", "a2", jobs(1))
    assert await redis.zscore(queue.sched.ready, "acme") == 3.0
    await queue.submit("beta", "b2", jobs(1))
    assert await redis.zscore(queue.sched.ready, "beta") == 4.0  # its own time is later
    await redis.hset(queue.sched.vtime, "beta", 2.0)
    await redis.zrem(queue.sched.ready, "beta")
    await queue.activate("beta")
    assert await redis.zscore(queue.sched.ready, "beta") == 3.0  # the lowest ready one


async def test_the_workers_reports_set_each_tenants_job_size(redis: Redis) -> None:
    """Two reports in one pick: sizes are tokens / jobs / 1000; a later report moves the
    size by a fifth of the way; a report of no jobs changes nothing."""
    queue = await setup(redis, a=1, b=1)
    await queue.pick(lease_ms=LEASE, now_ms=NOW, served={"a": (4000, 2), "b": (9000, 3)})
    assert await floats(redis, queue.sched.cost) == {"a": 2.0, "b": 3.0}
    await queue.pick(lease_ms=LEASE, now_ms=NOW, served={"a": (1000, 1), "c": (500, 0)})
    cost = await floats(redis, queue.sched.cost)
    assert cost == {"a": pytest.approx(1.8), "b": 3.0}
