"""Queues and the fair scheduler against a real Redis server (clock passed in)."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, NewJob, UnknownTenantError
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000
LEASE = 30_000


def jobs(n: int, prefix: str = "r") -> list[NewJob]:
    return [
        NewJob(f"{prefix}{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)
    ]


async def setup(redis: Redis, **weights: float) -> JobQueue:
    store = TenantStore(redis)
    for tenant, weight in weights.items():
        await store.put(tenant, TenantPolicy(weight=weight))
    return JobQueue(redis)


async def test_fifo_within_a_tenant(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(5))
    seen = []
    for _ in range(5):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None
        seen.append(pick.job.custom_id)
    assert seen == ["r0", "r1", "r2", "r3", "r4"]
    assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is None
    assert await redis.zcard(queue.sched.ready) == 0


async def test_weighted_fair_share_between_backlogged_tenants(redis: Redis) -> None:
    queue = await setup(redis, big=3, small=1)
    await queue.submit("big", "b1", jobs(300))
    await queue.submit("small", "b2", jobs(300))
    served = Counter()
    for _ in range(200):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None
        served[pick.job.tenant] += 1
    assert served["big"] == 150 and served["small"] == 50


async def test_pick_many_leases_in_the_same_fair_order_as_single_picks(redis: Redis) -> None:
    """One pick_many call for 40 slots gives each backlogged tenant its weighted share,
    every job leased once and in FIFO order per tenant; a tenant whose queue runs out
    gets what it has, and nothing is leased twice."""
    queue = await setup(redis, big=3, small=1, tiny=1)
    await queue.submit("big", "b1", jobs(300))
    await queue.submit("small", "b2", jobs(300))
    await queue.submit("tiny", "b3", jobs(2))
    picks = await queue.pick_many(40, lease_ms=LEASE, now_ms=NOW)
    served = Counter(job.tenant for job in picks.jobs)
    assert served["tiny"] == 2  # its share is 8 of 40, but it has 2 jobs
    assert served["big"] + served["small"] <= 38 and served["big"] == 3 * served["small"]
    ids = [job.id for job in picks.jobs]
    assert len(set(ids)) == len(ids)
    for tenant in ("big", "small"):
        mine = [job.custom_id for job in picks.jobs if job.tenant == tenant]
        assert mine == [f"r{i}" for i in range(len(mine))]
    assert all(job.leased_at_ms == NOW and job.attempt == 1 for job in picks.jobs)
    again = await queue.pick_many(40, lease_ms=LEASE, now_ms=NOW)
    assert not {job.id for job in again.jobs} & set(ids)
    assert "tiny" not in {job.tenant for job in again.jobs}


async def test_small_tenant_is_not_stuck_behind_a_big_one(redis: Redis) -> None:
    queue = await setup(redis, big=1, small=1)
    await queue.submit("big", "b1", jobs(1000))
    for _ in range(100):  # big has been served alone for a while
        await queue.pick(lease_ms=LEASE, now_ms=NOW)
    await queue.submit("small", "b2", jobs(3))
    tenants = [(await queue.pick(lease_ms=LEASE, now_ms=NOW)).job.tenant for _ in range(6)]  # type: ignore[union-attr]
    assert tenants.count("small") == 3  # idle time earned no credit, none was lost either


async def test_submit_is_idempotent_per_batch_and_custom_id(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    assert await queue.submit("acme", "b1", jobs(3)) == 3
    assert await queue.submit("acme", "b1", jobs(5)) == 2
    assert await redis.llen(queue.keys("acme").queue) == 5
    assert await redis.hget(queue.keys("acme").batch("b1"), "processing") == "5"


async def test_unknown_tenant_is_refused_and_nothing_is_queued(redis: Redis) -> None:
    queue = JobQueue(redis)
    with pytest.raises(UnknownTenantError):
        await queue.submit("ghost", "b1", jobs(3))
    assert await redis.dbsize() == 0


async def test_deferred_tenant_is_parked_and_others_go_on(redis: Redis) -> None:
    queue = await setup(redis, **{"a-slow": 1, "b-fast": 1})
    await queue.submit("a-slow", "b1", jobs(2))
    await queue.submit("b-fast", "b2", jobs(2))
    pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
    assert pick.job is not None and pick.job.tenant == "a-slow"
    await queue.defer(pick.job, NOW + 10_000)
    # until then only "b-fast" is served, and the parked tenant costs no work at all
    served = [(await queue.pick(lease_ms=LEASE, now_ms=NOW + 5)).job for _ in range(3)]
    assert [j.tenant if j else None for j in served] == ["b-fast", "b-fast", None]
    idle = await queue.pick(lease_ms=LEASE, now_ms=NOW + 5)
    assert idle.next_parked_ms == NOW + 10_000  # an idle worker sleeps exactly this long
    back = await queue.pick(lease_ms=LEASE, now_ms=NOW + 10_000)
    assert back.job is not None and back.job.custom_id == "r0"  # head of queue kept
    assert back.job.attempt == 1  # a DEFER is not an attempt


async def test_expired_lease_is_reclaimed_and_dead_lettered_after_max_attempts(
    redis: Redis,
) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(1))
    for attempt in (1, 2):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None and pick.job.attempt == attempt
        # the worker dies: nothing happens before the lease expires
        assert await queue.reclaim("acme", max_attempts=2, now_ms=NOW + LEASE - 1) == (0, [])
        requeued, dead = await queue.reclaim("acme", max_attempts=2, now_ms=NOW + LEASE)
        if attempt == 1:
            assert (requeued, dead) == (1, [])
        else:
            assert (requeued, dead) == (0, [pick.job.id])
    assert await queue.finish(
        "acme", "b1:r0", "b1", "r0", "errored", {"type": "errored"}, dead=True
    )
    assert await redis.lrange(queue.keys("acme").dead, 0, -1) == ["b1:r0"]
    assert await redis.hget(queue.keys("acme").jstate, "b1:r0") == "errored"


async def test_ack_exactly_once_and_batch_counts(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(2))
    first = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    second = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert first and second
    assert await queue.ack(first, "succeeded", {"type": "succeeded"})
    assert not await queue.ack(first, "errored", {"type": "errored"})
    batch = await redis.hgetall(queue.keys("acme").batch("b1"))
    assert batch["processing"] == "1" and "ended_ms" not in batch
    assert await queue.ack(second, "expired", {"type": "expired"})
    batch = await redis.hgetall(queue.keys("acme").batch("b1"))
    assert (batch["succeeded"], batch["expired"], batch["processing"]) == ("1", "1", "0")
    assert "ended_ms" in batch


async def test_stale_worker_cannot_requeue_a_reclaimed_job(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(1))
    job = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert job
    await queue.reclaim("acme", max_attempts=5, now_ms=NOW + LEASE)
    again = (await queue.pick(lease_ms=LEASE, now_ms=NOW + LEASE)).job
    assert again and again.attempt == 2
    assert await queue.requeue(job, head=True, count_attempt=False) == "lost"
    assert await redis.llen(queue.keys("acme").queue) == 0
    assert await queue.requeue(again, head=True, count_attempt=False) == "requeued"


async def test_wake_list_signals_idle_workers(redis: Redis) -> None:
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(2))
    assert await queue.wait_for_work(0.5) == "acme"


async def test_a_job_leased_while_its_batch_is_canceled_is_not_requeued(redis: Redis) -> None:
    from budgeter.queue.batches import BatchStore
    from tests.helpers import requests_for

    await TenantStore(redis).put("acme", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("acme", requests_for("c", 3))
    leased = (await store.queue.pick(lease_ms=LEASE)).job
    assert leased is not None
    status = await store.cancel(batch_id, tenant="acme")
    assert (status.canceled, status.processing, status.processing_status) == (2, 1, "canceling")
    assert await store.queue.defer(leased, NOW) == "canceled"
    assert await store.queue.ack(leased, "canceled", {"type": "canceled"})
    status = await store.status(batch_id)
    assert (status.canceled, status.processing, status.processing_status) == (3, 0, "ended")
    assert await redis.zcard(store.queue.sched.parked) == 0


async def test_a_tenant_with_history_is_not_starved_by_a_newcomer(redis: Redis) -> None:
    queue = await setup(redis, old=1, new=1)
    await queue.submit("old", "b1", jobs(300, "o"))
    for _ in range(300):  # 'old' is served alone for a long time
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None and pick.job.tenant == "old"
    assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is None  # all idle now
    await queue.submit("new", "b2", jobs(100, "n"))  # a newcomer enters at the clock,
    await queue.submit("old", "b3", jobs(10, "p"))  # not at 0: 'old' is not made to wait
    served = Counter()
    for _ in range(20):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None
        served[pick.job.tenant] += 1
    assert served["old"] >= 9 and served["new"] >= 9  # before the clock: 0 for "old"


async def test_a_returning_tenant_gets_half_of_waves_while_a_newcomer_floods(
    redis: Redis,
) -> None:
    """Benchmark row (a'): B was served alone, then A arrived and was served alone, then B
    returns. Leasing in waves (pick_many, sizes reported), B gets exactly half."""
    queue = await setup(redis, a=1, b=1)
    served: dict[str, tuple[int, int]] = {}

    async def wave(n: int) -> Counter[str]:
        nonlocal served
        picks = await queue.pick_many(n, lease_ms=LEASE, now_ms=NOW, served=served)
        got = Counter(job.tenant for job in picks.jobs)
        served = {t: (110 * k, k) for t, k in got.items()}  # every job 110 tokens
        return got

    await queue.submit("b", "history", jobs(500, "h"))
    while await wave(32):
        pass
    await queue.submit("a", "flood", jobs(5000, "a"))
    for _ in range(20):
        assert await wave(32) == Counter(a=32)
    await queue.submit("b", "small", jobs(200, "s"))
    total: Counter[str] = Counter()
    for _ in range(10):
        total += await wave(32)
    assert total == Counter(a=160, b=160)


async def test_tenants_share_tokens_not_job_counts_once_their_job_sizes_are_known(
    redis: Redis,
) -> None:
    queue = await setup(redis, big=1, small=1)
    await queue.submit("big", "b1", jobs(200, "b"))
    await queue.submit("small", "s1", jobs(200, "s"))
    # workers report what they served: big's jobs are 8,000 tokens, small's 1,000
    first = await queue.pick(
        lease_ms=LEASE, now_ms=NOW, served={"big": (80_000, 10), "small": (10_000, 10)}
    )
    assert first.job is not None
    served = Counter([first.job.tenant])
    for _ in range(89):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None
        served[pick.job.tenant] += 1
    # equal token shares: small gets about 8 jobs for each of big's
    assert 7 <= served["small"] / served["big"] <= 9, served


async def test_pick_many_returns_what_it_leased_when_one_tenant_call_fails(
    redis: Redis,
) -> None:
    """One tenant's dequeue failing does not lose the jobs leased for the others; with
    nothing leased at all, the failure is raised."""
    queue = await setup(redis, ok=1, bad=1)
    await queue.submit("ok", "b1", jobs(5))
    await queue.submit("bad", "b2", jobs(5))
    real_take = queue._take

    async def take(tenant: str, count: int, **kw: object) -> list:
        if tenant == "bad":
            raise ConnectionError("lost")
        return await real_take(tenant, count, **kw)  # type: ignore[arg-type]

    queue._take = take  # type: ignore[method-assign]
    picks = await queue.pick_many(4, lease_ms=LEASE, now_ms=NOW)
    assert [job.tenant for job in picks.jobs] == ["ok", "ok"]
    queue._take = lambda *_a, **_kw: take("bad", 1)  # type: ignore[method-assign, assignment]
    with pytest.raises(ConnectionError):
        await queue.pick_many(4, lease_ms=LEASE, now_ms=NOW)


async def test_a_job_body_that_is_not_json_strands_none_of_the_jobs_leased_with_it(
    redis: Redis,
) -> None:
    """A foreign producer's body no JSON reader takes: the job is leased with empty
    params (the worker ends it as errored), and the jobs leased in the same call are
    served as usual."""
    queue = await setup(redis, acme=1)
    await queue.submit("acme", "b1", jobs(5))
    await redis.hset(queue.keys("acme").jobs, "b1:r0", "{not json")
    picks = await queue.pick_many(5, lease_ms=LEASE, now_ms=NOW)
    assert [job.custom_id for job in picks.jobs] == ["r0", "r1", "r2", "r3", "r4"]
    assert picks.jobs[0].params == {} and picks.jobs[1].params["model"] == "m"
