"""``job.dead_lettered`` and ``batch.ended`` (issue 18, item 4), appended by queue/ack.lua and
batch/cancel.lua in the same call that stores the dead-lettered result or ends the batch:
exactly one per job and per batch ending, however the acks are retried or raced, only for a
tenant whose policy has ``notify``; asserted exactly on the outbox stream (these tests also
kill the mutants of the scripts' new lines: tools/mutate_lua.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.domain.results import canceled, error_body, errored, expired
from budgeter.notify.events import REQUEST_COUNTS, parse_fields
from budgeter.notify.outbox import Outbox
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, LeasedJob, NewJob
from budgeter.store.client import make_redis
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for

NOW = 1_764_201_600_000
LEASE = 30_000
NOTIFY = TenantPolicy.model_validate({"notify": {"thresholds": [0.8]}})
OUTBOX = "budgeter:{t:acme}:outbox"


def jobs(n: int) -> list[NewJob]:
    return [NewJob(f"r{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)]


async def setup(redis: Any, policy: TenantPolicy = NOTIFY) -> JobQueue:
    await TenantStore(redis).put("acme", policy)
    return JobQueue(redis)


async def lease(queue: JobQueue, n: int = 1) -> list[LeasedJob]:
    picks = await queue.pick_many(n, lease_ms=LEASE, now_ms=NOW)
    assert len(picks.jobs) == n
    return picks.jobs


async def events(redis: Any) -> list[tuple[str, dict[str, Any]]]:
    entries = await redis.xrange(OUTBOX)
    return [(f["type"], json.loads(f["data"])) for _, f in entries]


def counts(**some: int) -> dict[str, int]:
    return {name: some.get(name, 0) for name in REQUEST_COUNTS}


def failed(message: str = "upstream failed") -> dict[str, Any]:
    return errored(error_body("overloaded_error", message))


async def test_a_dead_lettered_job_appends_one_event_even_when_its_ack_is_retried(
    redis: Redis,
) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(2))
    first, second = await lease(queue, 2)
    assert await queue.ack(first, "errored", failed(), dead=True)
    assert await events(redis) == [
        (
            "job.dead_lettered",
            {
                "job_id": "b1:r0",
                "batch_id": "b1",
                "custom_id": "r0",
                "error_type": "overloaded_error",
                "attempts": 1,
            },
        )
    ]
    assert await Outbox(redis).hinted() == ["acme"]
    await redis.delete(Outbox(redis).hints)
    # the ack retried (its reply lost): refused, nothing appended, nothing hinted
    assert not await queue.ack(first, "errored", failed(), dead=True)
    assert len(await events(redis)) == 1
    assert await Outbox(redis).hinted() == []
    # an ordinary errored job is not dead-lettered: the batch's end is the only event
    assert await queue.ack(second, "errored", failed())
    got = await events(redis)
    assert [kind for kind, _ in got] == ["job.dead_lettered", "batch.ended"]
    assert got[1][1] == {"batch_id": "b1", "request_counts": counts(errored=2)}
    assert await Outbox(redis).hinted() == ["acme"]


async def test_the_attempts_and_a_result_without_an_error_type(redis: Redis) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(2))
    job, other = await lease(queue, 2)
    await redis.hset(queue.keys("acme").attempts, job.id, 3)
    assert await queue.ack(job, "errored", {"type": "errored"}, dead=True)
    ((kind, data),) = await events(redis)
    assert (kind, data["attempts"], data["error_type"]) == ("job.dead_lettered", 3, None)
    assert await queue.ack(other, "errored", {"type": "errored", "error": []}, dead=True)
    got = await events(redis)
    assert [kind for kind, _ in got] == ["job.dead_lettered", "job.dead_lettered", "batch.ended"]
    assert (got[1][1]["error_type"], got[1][1]["attempts"]) == (None, 1)


async def test_the_last_job_ends_the_batch_with_one_event_and_its_counts(redis: Redis) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(4))
    a, b, c, d = await lease(queue, 4)
    assert await queue.ack(a, "succeeded", {"type": "succeeded"})
    assert await queue.ack(b, "errored", failed())
    assert await queue.ack(c, "expired", expired())
    assert await events(redis) == []
    assert await Outbox(redis).hinted() == []
    assert await queue.ack(d, "canceled", canceled())
    assert await events(redis) == [
        (
            "batch.ended",
            {
                "batch_id": "b1",
                "request_counts": counts(succeeded=1, errored=1, expired=1, canceled=1),
            },
        )
    ]
    ended = await redis.hget(queue.keys("acme").batch("b1"), "ended_ms")
    assert not await queue.ack(d, "succeeded", {"type": "succeeded"})  # a retried ack
    assert len(await events(redis)) == 1
    assert await redis.hget(queue.keys("acme").batch("b1"), "ended_ms") == ended


async def test_racing_acks_on_two_clients_end_the_batch_once(redis: Redis, redis_url: str) -> None:
    queue = await setup(redis)
    other = make_redis(redis_url)
    try:
        rival = JobQueue(other)
        await queue.submit("acme", "b1", jobs(40))
        leased = await lease(queue, 40)
        acks = [
            (queue if n % 2 else rival).ack(job, "succeeded", {"type": "succeeded"})
            for n, job in enumerate(leased)
        ]
        assert all(await asyncio.gather(*acks))
        again = [rival.ack(job, "errored", failed(), dead=True) for job in leased]
        assert not any(await asyncio.gather(*again))  # every retry refused: no event
    finally:
        await other.aclose()
    assert await events(redis) == [
        ("batch.ended", {"batch_id": "b1", "request_counts": counts(succeeded=40)})
    ]


async def test_without_a_notify_policy_the_outbox_does_not_grow(redis: Redis) -> None:
    queue = await setup(redis, TenantPolicy())
    await queue.submit("acme", "b1", jobs(1))
    (job,) = await lease(queue)
    assert await queue.ack(job, "errored", failed(), dead=True)
    assert await redis.hget(queue.keys("acme").batch("b1"), "ended_ms") is not None
    assert await redis.exists(OUTBOX) == 0
    assert await Outbox(redis).hinted() == []


async def test_a_cancel_that_ends_the_batch_appends_one_event(redis: Redis) -> None:
    await setup(redis)
    store = BatchStore(redis)
    queue = store.queue
    await store.create("acme", requests_for("x", 3), batch_id="b1")
    await store.create("acme", requests_for("y", 2), batch_id="b2")
    status = await store.cancel("b2", tenant="acme")
    assert status.ended
    assert await events(redis) == [
        ("batch.ended", {"batch_id": "b2", "request_counts": counts(canceled=2)})
    ]
    assert await Outbox(redis).hinted() == ["acme"]
    lines = [line async for line in store.results("b2")]
    assert lines == [{"custom_id": f"y-{i}", "result": {"type": "canceled"}} for i in range(2)]
    await store.cancel("b2", tenant="acme")  # again: cancels nothing, tells nothing
    assert len(await events(redis)) == 1
    # a job of b1 in flight: the cancel does not end b1, that job's ack does
    (held,) = await lease(queue)
    assert not (await store.cancel("b1", tenant="acme")).ended
    assert len(await events(redis)) == 1
    assert await queue.ack(held, "succeeded", {"type": "succeeded"})
    assert (await events(redis))[1] == (
        "batch.ended",
        {"batch_id": "b1", "request_counts": counts(succeeded=1, canceled=2)},
    )


async def test_the_outbox_is_trimmed_to_about_10000_entries(redis: Redis) -> None:
    """As settle.lua trims it: MAXLEN ~ 10000 (whole stream nodes of 100 entries)."""
    queue = await setup(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(10_500):
            pipe.xadd(OUTBOX, {"type": "test", "data": str(n)})
        await pipe.execute()
    await queue.submit("acme", "b1", jobs(1))
    (job,) = await lease(queue)
    await queue.ack(job, "succeeded", {"type": "succeeded"})
    assert 10_000 <= await redis.xlen(OUTBOX) <= 10_100
    assert (await redis.xrevrange(OUTBOX, count=1))[0][1]["type"] == "batch.ended"


async def test_a_batch_undone_is_canceled_without_an_event(redis: Redis) -> None:
    await setup(redis)
    store = BatchStore(redis)
    await store.create("acme", requests_for("x", 2), batch_id="b1")
    assert (await store.cancel("b1", tenant="acme", notify=False)).ended
    assert await redis.exists(OUTBOX) == 0


async def test_a_batch_reopened_by_a_retried_submission_ends_again(redis: Redis) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(1))
    (job,) = await lease(queue)
    await queue.ack(job, "succeeded", {"type": "succeeded"})
    assert await queue.submit("acme", "b1", jobs(2)) == 1  # r1 added: processing again
    (job,) = await lease(queue)
    await queue.ack(job, "succeeded", {"type": "succeeded"})
    got = await events(redis)
    assert [data["request_counts"]["succeeded"] for _, data in got] == [1, 2]


async def test_the_entries_read_back_as_events(redis: Redis) -> None:
    queue = await setup(redis)
    await queue.submit("acme", "b1", jobs(1))
    (job,) = await lease(queue)
    await queue.ack(job, "errored", failed(), dead=True)
    entries = await redis.xrange(OUTBOX)
    read = [parse_fields("acme", entry_id, fields) for entry_id, fields in entries]
    assert [e.type for e in read] == ["job.dead_lettered", "batch.ended"]
    assert read[0].text() == (
        "budgeter: job r0 of batch b1 (acme) was dead-lettered after 1 attempts (overloaded_error)"
    )
    assert read[1].text() == "budgeter: batch b1 of acme ended: 1 errored"
    assert read[1].body()["data"] == {"batch_id": "b1", "request_counts": counts(errored=1)}


async def test_on_the_cluster_both_events_land_in_the_tenants_outbox(cluster_redis: Any) -> None:
    queue = await setup(cluster_redis)
    store = BatchStore(cluster_redis)
    await queue.submit("acme", "b1", jobs(2))
    await store.create("acme", requests_for("y", 1), batch_id="b2")
    first, second = await lease(queue, 2)
    assert await queue.ack(first, "errored", failed(), dead=True)
    assert await queue.ack(second, "succeeded", {"type": "succeeded"})
    assert (await store.cancel("b2", tenant="acme")).ended
    assert [(kind, data.get("batch_id")) for kind, data in await events(cluster_redis)] == [
        ("job.dead_lettered", "b1"),
        ("batch.ended", "b1"),
        ("batch.ended", "b2"),
    ]
    assert await Outbox(cluster_redis).hinted() == ["acme"]
