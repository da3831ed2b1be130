"""batch/cancel.lua and batch/delete.lua bookkeeping, asserted exactly on the Redis keys
(issue 21, item 3: each test kills named mutants of tools/mutate_lua.py that the
behavioural tests let live).
"""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.keys import batch_index_key
from budgeter.tenants.store import TenantStore

LEASE = 30_000
NOW = 1_764_201_600_000


def requests(n: int) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"r{i}",
                "params": {
                    "model": "m",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
        )
        for i in range(n)
    ]


async def setup(redis: Redis) -> BatchStore:
    await TenantStore(redis).put("acme", TenantPolicy())
    return BatchStore(redis)


async def cancel_at(store: BatchStore, batch_id: str, now_ms: int) -> int:
    """batch/cancel.lua at a given moment; its answer (jobs canceled by this call)."""
    k = store.queue.keys("acme")
    keys = [k.batch(batch_id), k.batch_jobs(batch_id), k.jstate, k.results, k.jobs]
    keys += [k.canceled_batches, k.outcomes]
    return int((await store._cancel(keys=keys, args=[str(now_ms), batch_id]))[0])


async def test_a_batch_canceled_whole_ends_at_once_and_only_once(redis: Redis) -> None:
    store = await setup(redis)
    batch_id = await store.create("acme", requests(3))
    keys = store.queue.keys("acme")
    assert await cancel_at(store, batch_id, NOW) == 3
    raw = await redis.hgetall(keys.batch(batch_id))
    assert (raw["processing"], raw["canceled"]) == ("0", "3")
    assert (raw["ended_ms"], raw["cancel_initiated_ms"]) == (str(NOW), str(NOW))
    assert await redis.sismember(keys.canceled_batches, batch_id)
    assert (await redis.hgetall(keys.outcomes))["canceled"] == "3"
    assert set((await redis.hgetall(keys.jstate)).values()) == {"canceled"}
    # a second cancel, later, cancels nothing and moves neither moment nor count
    assert await cancel_at(store, batch_id, NOW + 5000) == 0
    again = await redis.hgetall(keys.batch(batch_id))
    assert again == raw
    assert (await redis.hgetall(keys.outcomes))["canceled"] == "3"


async def test_a_batch_with_a_job_in_flight_ends_when_that_job_does(redis: Redis) -> None:
    store = await setup(redis)
    batch_id = await store.create("acme", requests(2))
    keys = store.queue.keys("acme")
    held = (await store.queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert held is not None
    assert await cancel_at(store, batch_id, NOW) == 1
    raw = await redis.hgetall(keys.batch(batch_id))
    assert (raw["processing"], raw["canceled"], "ended_ms" in raw) == ("1", "1", False)
    assert await store.queue.ack(held, "succeeded", {"type": "succeeded"})
    assert (await store.status(batch_id)).ended


async def test_delete_removes_the_batch_from_every_index(redis: Redis) -> None:
    store = await setup(redis)
    keep = await store.create("acme", requests(1))
    gone = await store.create("acme", requests(2))
    keys = store.queue.keys("acme")
    await store.cancel(gone, tenant="acme")
    await store.delete(gone, tenant="acme")
    assert await redis.zrange(keys.batches, 0, -1) == [keep]
    assert not await redis.sismember(keys.canceled_batches, gone)
    assert await redis.hkeys(keys.bmeta) == [keep]
    assert await redis.hkeys(batch_index_key("budgeter")) == [keep]
    page, more = await store.list_batches("acme")
    assert [b.id for b in page] == [keep] and not more
    assert not await redis.exists(keys.batch(gone), keys.batch_jobs(gone))
    assert sorted(await redis.hkeys(keys.jobs)) == [f"{keep}:r0"]
