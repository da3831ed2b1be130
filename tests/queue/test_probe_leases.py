"""Issue 20 item 3: a tenant that comes due off a park is leased one job per admission
decision (a probe), not one per free slot, and an admission that leaves its request rate no
room parks it until the bucket takes the next request: released by its bucket, it gets
exactly as many leases as the bucket admits, however many slots ask, and no lease is
deferred. The clock is passed in; nothing depends on timing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable

from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, LeasedJob, NewJob
from budgeter.tenants.store import TenantStore
from budgeter.worker.lease_pacing import ProbeTracker

NOW = 1_764_201_600_000
LEASE = 30_000
SLOTS = 16


def jobs(n: int) -> list[NewJob]:
    return [NewJob(f"r{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)]


class Leases:
    """What a worker does with the jobs it leases, at each one's decision (its
    ProbeTracker, the worker's own code), counting the decisions."""

    def __init__(self, queue: JobQueue, admission: Admission) -> None:
        self.queue, self.admission = queue, admission
        self.spawned: list[Awaitable[None]] = []
        self.tracker = ProbeTracker(queue, self.spawned.append)
        self.decisions: Counter[str] = Counter()

    async def decide(self, job: LeasedJob, now: int) -> str:
        decision = await self.admission.reserve(job.tenant, job.reservation_id, 1, 8, now_ms=now)
        self.decisions[decision.kind] += 1
        self.tracker.decided(job, decision)
        if decision.kind == "DEFER":
            await self.queue.defer(job, decision.until_ms)
        for spawned in self.spawned:
            await spawned
        self.spawned.clear()
        return decision.kind

    async def until_parked(self, now: int) -> list[int]:
        """Rounds of SLOTS lanes asking at once, each decided, until the tenant is
        parked: the number of jobs each round leased."""
        rounds = []
        while True:
            picks = await self.queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=now)
            self.tracker.leased(picks.jobs)
            rounds.append(len(picks.jobs))
            for job in picks.jobs:
                await self.decide(job, now)
            parked = await self.queue.redis.zscore(self.queue.sched.parked, "beta")
            if not picks.jobs or parked is not None:
                return rounds


async def test_a_tenant_released_by_its_bucket_gets_exactly_what_it_admits(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("beta", TenantPolicy(rate={"rpm": 60}))  # 1 per second
    queue, admission = JobQueue(redis), Admission(redis)
    leases = Leases(queue, admission)
    await queue.submit("beta", "b1", jobs(200))
    burst = await leases.until_parked(NOW)  # the full bucket: 60 fit, the 60th parks it
    assert leases.decisions["ADMIT"] == 60
    assert sum(burst) - 60 == leases.decisions["DEFER"] < SLOTS  # leased in that round
    until = int(await redis.zscore(queue.sched.parked, "beta") or 0)
    assert until == NOW + 1000  # when the bucket takes the next request
    for k in (1, 3, 5):  # released k - 1 s after its park end: the bucket admits k
        leases.decisions.clear()
        now = until + (k - 1) * 1000
        rounds = await leases.until_parked(now)
        assert sum(rounds) == k and set(rounds) == {1}  # one probe at a time, none deferred
        assert leases.decisions == {"ADMIT": k}
        assert await redis.hget(queue.sched.probe, "beta") == "0"  # still probing
        until = int(await redis.zscore(queue.sched.parked, "beta") or 0)
        assert until == now + 1000 and await redis.zscore(queue.sched.held, "beta") is None


async def test_a_deferral_still_parks_a_tenant_whose_admission_left_room(redis: Redis) -> None:
    """A budget of concurrency (not a rate) defers with no time: the DEFER parks it."""
    await TenantStore(redis).put("beta", TenantPolicy(rate={"rpm": 60}, max_concurrency=1))
    queue, admission = JobQueue(redis), Admission(redis)
    leases = Leases(queue, admission)
    await queue.submit("beta", "b1", jobs(3))
    await leases.until_parked(NOW)
    assert leases.decisions == {"ADMIT": 1, "DEFER": 2}
    assert await redis.zscore(queue.sched.parked, "beta") is not None


async def test_a_paced_tenant_with_nothing_left_leaves_ready_when_it_comes_due(
    redis: Redis,
) -> None:
    """Its last job left the bucket empty: parked, then due with nothing queued, it is
    picked once (a probe with nothing to lease) and leaves the ready set."""
    await TenantStore(redis).put("beta", TenantPolicy(rate={"rpm": 1}))
    queue, admission = JobQueue(redis), Admission(redis)
    leases = Leases(queue, admission)
    await queue.submit("beta", "b1", jobs(1))
    assert await leases.until_parked(NOW) == [1]
    assert leases.decisions == {"ADMIT": 1}
    due = NOW + 60_000
    assert await redis.zscore(queue.sched.parked, "beta") == due
    assert (await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=due)).jobs == []
    assert await redis.zscore(queue.sched.ready, "beta") is None
    assert await redis.zscore(queue.sched.held, "beta") is None
    assert (await queue.pick_many(SLOTS, lease_ms=LEASE, now_ms=due + 1)).jobs == []


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
