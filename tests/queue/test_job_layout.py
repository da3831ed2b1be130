"""The compact job layout: no state while queued, per-batch meta (bmeta), the batch's order
as packed custom ids. Batches larger than one submit chunk, retried submissions,
cancel, results and delete must all see every job exactly once, in order."""

from __future__ import annotations

import json
import random

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import SUBMIT_CHUNK, NewJob
from budgeter.store.keys import batch_index_key
from budgeter.tenants.store import TenantStore

LEASE = 30_000


def jobs(cids: list[str]) -> list[NewJob]:
    return [NewJob(c, {"model": "m", "max_tokens": 8, "messages": [], "n": c}) for c in cids]


async def store_for(redis: Redis, tenant: str = "acme") -> BatchStore:
    """A BatchStore whose batch "b1" belongs to ``tenant`` (JobQueue.submit alone does not
    index a batch; BatchStore.create does, then calls it)."""
    await TenantStore(redis).put(tenant, TenantPolicy())
    await redis.hset(batch_index_key("budgeter"), "b1", tenant)
    return BatchStore(redis)


async def test_a_large_retried_batch_is_canceled_read_and_deleted_in_order(redis: Redis) -> None:
    store = await store_for(redis)
    queue, keys = store.queue, store.queue.keys("acme")
    first = [f"r{i}" for i in range(2 * SUBMIT_CHUNK + 500)]
    assert await queue.submit("acme", "b1", jobs(first)) == len(first)
    assert await redis.hlen(keys.jstate) == 0  # queued jobs carry no state
    assert await redis.hlen(keys.bmeta) == 1
    assert await redis.llen(keys.batch_jobs("b1")) == 3  # packed: one element per chunk
    # a retry with a superset in another order adds only what is missing, at the end
    extra = [f"x{i}" for i in range(100)]
    retry = first + extra
    random.Random(1).shuffle(retry)
    assert await queue.submit("acme", "b1", jobs(retry)) == 100
    assert await queue.submit("acme", "b1", jobs(retry)) == 0
    order = first + [c for c in retry if c.startswith("x")]
    assert await queue.queued("acme") == len(order)

    # serve three jobs: one succeeds, one stays leased, one is requeued (state 'queued')
    picked = [(await queue.pick(lease_ms=LEASE)).job for _ in range(3)]
    assert [j.custom_id for j in picked if j] == ["r0", "r1", "r2"]
    done, held, back = picked
    assert done and held and back
    assert done.params == {"model": "m", "max_tokens": 8, "messages": [], "n": "r0"}
    assert await queue.ack(done, "succeeded", {"type": "succeeded"})
    assert await queue.requeue(back, head=True, count_attempt=False) == "requeued"

    status = await store.cancel("b1", tenant="acme")
    assert (status.succeeded, status.canceled, status.processing) == (1, len(order) - 2, 1)
    assert await queue.ack(held, "canceled", {"type": "canceled"})
    assert not await queue.ack(held, "canceled", {"type": "canceled"})  # exactly once
    status = await store.status("b1")
    assert (status.canceled, status.processing, status.ended) == (len(order) - 1, 0, True)
    # nothing of the canceled batch is served any more
    assert (await queue.pick(lease_ms=LEASE)).job is None

    lines = [line async for line in store.results("b1", tenant="acme", chunk=300)]
    assert [line["custom_id"] for line in lines] == order
    assert lines[0]["result"]["type"] == "succeeded"
    assert {line["result"]["type"] for line in lines[1:]} == {"canceled"}

    await store.delete("b1", tenant="acme")
    for key in (keys.jobs, keys.jstate, keys.attempts, keys.results, keys.bmeta):
        assert await redis.hlen(key) == 0, key
    assert not await redis.exists(keys.batch("b1"), keys.batch_jobs("b1"))


async def test_a_retried_submission_keeps_the_batchs_priority_and_deadline(redis: Redis) -> None:
    store = await store_for(redis)
    queue, keys = store.queue, store.queue.keys("acme")
    await queue.submit("acme", "b1", jobs(["a"]), priority="high", ttl_ms=60_000)
    await queue.submit("acme", "b1", jobs(["a", "b"]), priority="low", ttl_ms=999_999_999)
    assert await redis.lrange(keys.queue_high, 0, -1) == ["b1:a", "b1:b"]
    first = (await queue.pick(lease_ms=LEASE)).job
    second = (await queue.pick(lease_ms=LEASE)).job
    assert first and second
    assert (first.priority, second.priority) == ("high", "high")
    assert first.deadline_ms == second.deadline_ms == first.enqueued_ms + 60_000
    # a requeued job goes back to its batch's queue
    assert await queue.requeue(second, head=False, count_attempt=True) == "requeued"
    assert await redis.lrange(keys.queue_high, 0, -1) == ["b1:b"]


async def test_finish_of_a_job_never_leased_and_of_an_unknown_job(redis: Redis) -> None:
    store = await store_for(redis)
    queue = store.queue
    await queue.submit("acme", "b1", jobs(["a", "b"]))
    assert await queue.job_body("acme", "b1:a") == {
        "batch_id": "b1",
        "custom_id": "a",
        "params": {"model": "m", "max_tokens": 8, "messages": [], "n": "a"},
    }
    assert await queue.job_body("acme", "b1:zz") is None
    assert await queue.finish("acme", "b1:a", "b1", "a", "errored", {"type": "errored"})
    assert not await queue.finish("acme", "b1:a", "b1", "a", "errored", {"type": "errored"})
    assert not await queue.finish("acme", "b1:zz", "b1", "zz", "errored", {"type": "errored"})
    status = await store.status("b1")
    assert (status.processing, status.errored) == (1, 1)
    # the finished job is not served; the other one is
    job = (await queue.pick(lease_ms=LEASE)).job
    assert job is not None and job.custom_id == "b"
    assert (await queue.pick(lease_ms=LEASE)).job is None


async def test_custom_ids_of_any_text_survive_cancel_results_and_delete(redis: Redis) -> None:
    store = await store_for(redis)
    odd = ["a b", "\u00fcber", '"q"', "x:y", "back\\slash", "nl\nx", "[1]", "\u65e5\u672c"]
    await store.queue.submit("acme", "b1", jobs(odd))
    job = (await store.queue.pick(lease_ms=LEASE)).job
    assert job is not None and job.custom_id == "a b" and job.batch_id == "b1"
    status = await store.cancel("b1", tenant="acme")
    assert (status.canceled, status.processing) == (len(odd) - 1, 1)
    assert await store.queue.ack(job, "canceled", {"type": "canceled"})
    lines = [line async for line in store.raw_results("b1", tenant="acme")]
    assert [json.loads(line)["custom_id"] for line in lines] == odd
    await store.delete("b1", tenant="acme")
    keys = store.queue.keys("acme")
    for key in (keys.jobs, keys.jstate, keys.results, keys.bmeta, keys.attempts):
        assert await redis.hlen(key) == 0, key
