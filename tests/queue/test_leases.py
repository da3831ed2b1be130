"""Leases kept exactly (issue 21): a heartbeat extends a job's lease and its reservation's
deadline to now + their lengths (Redis time), a lost lease is not revived, and a job given
back leaves the leases."""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_heartbeat_extends_the_lease_and_the_reservation_deadline(redis: Redis) -> None:
    await TenantStore(redis).put("hb", TenantPolicy())
    store = BatchStore(redis)
    await store.create("hb", requests_for("hb", 1))
    pick = await store.queue.pick(lease_ms=1_000)
    job = pick.job
    assert job is not None
    rid = job.reservation_id
    assert (await Admission(redis).reserve("hb", rid, 10, 10, hold_ms=1_000)).kind == "ADMIT"
    keys = store.queue.keys("hb")
    before = await server_ms(redis)
    assert await store.queue.heartbeat(job, lease_ms=50_000, reservation_id=rid, hold_ms=80_000)
    after = await server_ms(redis)
    lease = await redis.zscore(keys.leases, job.id)
    deadline = await redis.zscore(keys.resv_deadline, rid)
    assert lease is not None and before + 50_000 <= lease <= after + 50_000
    assert deadline is not None and before + 80_000 <= deadline <= after + 80_000
    # the lease lost (reclaimed): a heartbeat neither revives it nor touches the deadline
    await store.queue.reclaim("hb", max_attempts=5, now_ms=10**13)
    assert not await store.queue.heartbeat(job, lease_ms=50_000, reservation_id=rid, hold_ms=1)
    assert await redis.zscore(keys.leases, job.id) is None
    assert await redis.zscore(keys.resv_deadline, rid) == deadline


async def test_a_job_given_back_leaves_the_leases(redis: Redis) -> None:
    await TenantStore(redis).put("gb", TenantPolicy())
    store = BatchStore(redis)
    await store.create("gb", requests_for("gb", 1))
    pick = await store.queue.pick(lease_ms=60_000)
    assert pick.job is not None
    assert await store.queue.defer(pick.job, pick.now_ms) == "requeued"
    assert await redis.zcard(store.queue.keys("gb").leases) == 0
