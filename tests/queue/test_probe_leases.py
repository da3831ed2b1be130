"""Issue 20 item 3: a tenant that comes due off a park is leased one job per admission
decision (a probe), not one per free slot: released by its bucket, it gets exactly as many
leases as the bucket admits, plus one (the deferral that re-parks it), however many slots
ask. The clock is passed in; nothing depends on timing."""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, LeasedJob, NewJob
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000
LEASE = 30_000
SLOTS = 16


def jobs(n: int) -> list[NewJob]:
    return [NewJob(f"r{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)]


async def decide(queue: JobQueue, admission: Admission, job: LeasedJob, now: int) -> int:
    """What a worker does with a leased job at its decision: 0 admitted, else park end."""
    decision = await admission.reserve(job.tenant, job.reservation_id, 1, 8, now_ms=now)
    if decision.kind == "DEFER":
        await queue.defer(job, decision.until_ms)
        return decision.until_ms
    assert decision.kind == "ADMIT"
    if job.probe:
        assert await queue.end_probe(job.tenant, decided=True)
    return 0


async def leases_until_parked(queue: JobQueue, admission: Admission, now: int) -> list[int]:
    """Rounds of SLOTS lanes asking at once, each decided, until the tenant is parked:
    the number of jobs each round leased."""
    rounds = []
    while True:
        picks = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=now)
        rounds.append(len(picks.jobs))
        untils = [await decide(queue, admission, job, now) for job in picks.jobs]
        if any(untils) or not picks.jobs:
            return rounds


async def test_a_tenant_released_by_its_bucket_gets_what_it_admits_plus_one(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("beta", TenantPolicy(rate={"rpm": 60}))  # 1 per second
    queue, admission = JobQueue(redis), Admission(redis)
    await queue.submit("beta", "b1", jobs(200))
    burst = await leases_until_parked(queue, admission, NOW)  # the full bucket: 60 fit
    assert sum(burst) > 60  # the round that ran out deferred the rest it leased
    until = int(await redis.zscore(queue.sched.parked, "beta") or 0)
    assert until > NOW
    for k in (1, 3, 5):  # released k - 1 s after its park end: the bucket admits k
        now = until + (k - 1) * 1000
        rounds = await leases_until_parked(queue, admission, now)
        assert sum(rounds) == k + 1 and set(rounds) == {1}
        assert await redis.hget(queue.sched.probe, "beta") == "0"  # deferred: count reset
        until = int(await redis.zscore(queue.sched.parked, "beta") or 0)
        assert until > now and await redis.zscore(queue.sched.held, "beta") is None


async def test_a_probe_holds_its_tenant_until_its_decision_or_the_hold_ends(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", jobs(5))
    first = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert first is not None and not first.probe
    await queue.defer(first, NOW + 10)
    probe = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW + 10)
    assert [(j.custom_id, j.probe) for j in probe.jobs] == [("r0", True)]
    assert await redis.zscore(queue.sched.held, "acme") == NOW + 10 + LEASE
    assert await redis.zscore(queue.sched.ready, "acme") is None
    await queue.activate("acme")  # new work does not end a hold
    assert (await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW + 11)).jobs == []
    assert await queue.end_probe("acme", decided=True)
    assert not await queue.end_probe("acme", decided=True)  # once
    assert await redis.hget(queue.sched.probe, "acme") == "1"
    assert await redis.lrange(queue.sched.wake, 0, -1) == ["acme"] * 6  # submit 5, end 1
    again = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW + 12)
    assert [(j.custom_id, j.probe) for j in again.jobs] == [("r1", True)]
    assert await queue.end_probe("acme", decided=False)  # given back: not counted
    assert await redis.hget(queue.sched.probe, "acme") == "1"
    await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW + 13)  # r2 probe, then dies
    lapsed = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW + 13 + LEASE)
    assert len(lapsed.jobs) == 2 and not any(j.probe for j in lapsed.jobs)  # full speed
    assert await redis.hget(queue.sched.probe, "acme") is None
    assert await redis.zscore(queue.sched.held, "acme") is None  # the lapsed hold is gone


async def test_an_early_unpark_ends_a_probe_hold(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", jobs(3))
    first = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert first is not None
    await queue.defer(first, NOW)
    assert len((await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW)).jobs) == 1
    await queue.activate("acme", unpark=True)  # e.g. in-flight work settled
    assert await redis.zscore(queue.sched.held, "acme") is None
    assert await redis.zscore(queue.sched.ready, "acme") is not None
    assert not await queue.end_probe("acme", decided=True)  # nothing held any more


async def test_probes_not_deferred_eight_times_in_a_row_end_probing(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", jobs(20))
    first = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert first is not None
    await queue.defer(first, NOW)
    for i in range(8):
        picks = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW)
        assert len(picks.jobs) == 1 and picks.jobs[0].probe
        await queue.end_probe("acme", decided=True)
        assert await redis.hget(queue.sched.probe, "acme") == (str(i + 1) if i < 7 else None)
    picks = await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=NOW)
    assert len(picks.jobs) == 20 - 8 and not any(j.probe for j in picks.jobs)
