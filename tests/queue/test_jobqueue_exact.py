"""The job queue's small parts, exactly (issue 21: mutmut's survivors in ``JobQueue``):
leases the replicas did not acknowledge go back at the head with their attempt refunded
and wake one worker (a probing tenant's hold ends instead), a give-back that fails is one
warning; the wait for work blocks as long as asked (at least 10 ms); the heartbeats'
``cancel`` stops their loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue
from budgeter.queue.leased import LeasedJob
from budgeter.store.durability import NotReplicated
from budgeter.tenants.store import TenantStore
from budgeter.worker.heartbeat import Heartbeats
from tests.helpers import UnreplicatedAfter, requests_for

Call = tuple[tuple[Any, ...], dict[str, Any]]


async def submitted(redis: Redis, tenant: str, count: int) -> BatchStore:
    await TenantStore(redis).put(tenant, TenantPolicy())
    store = BatchStore(redis)
    await store.create(tenant, requests_for(tenant, count))
    await redis.delete(store.queue.sched.wake)  # the submit's wakes: not the test's
    return store


async def test_unreplicated_leases_go_back_at_the_head_refunded_and_wake_one_worker(
    redis: Redis,
) -> None:
    store = await submitted(redis, "ur", 3)
    queue = store.queue
    order = await redis.lrange(queue.keys("ur").queue, 0, -1)
    plain = queue._dequeue
    queue._dequeue = UnreplicatedAfter(plain)  # type: ignore[assignment]
    with pytest.raises(NotReplicated):
        await queue.pick_many(2, lease_ms=60_000)
    assert await redis.zcard(queue.keys("ur").leases) == 0  # no lease is left held
    assert sorted(await redis.lrange(queue.keys("ur").queue, 0, -1)) == sorted(order)
    assert await redis.lrange(queue.sched.wake, 0, -1) == ["ur"]  # one worker woken
    queue._dequeue = plain
    picks = await queue.pick_many(3, lease_ms=60_000)
    assert [job.attempt for job in picks.jobs] == [1, 1, 1]  # the attempts were refunded


async def leased(store: BatchStore, count: int) -> list[LeasedJob]:
    picks = await store.queue.pick_many(count, lease_ms=60_000)
    assert len(picks.jobs) == count
    return picks.jobs


@pytest.mark.parametrize("probe", [False, True])
async def test_a_give_back_wakes_a_worker_or_ends_a_probes_hold(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, probe: bool
) -> None:
    store = await submitted(redis, "gp", 2)
    queue = store.queue
    jobs = await leased(store, 2)
    calls: dict[str, list[Call]] = {"activate": [], "end_probe": []}

    async def activate(*args: Any, **kwargs: Any) -> None:
        calls["activate"].append((args, kwargs))

    async def end_probe(*args: Any, **kwargs: Any) -> None:
        calls["end_probe"].append((args, kwargs))

    monkeypatch.setattr(queue, "activate", activate)
    monkeypatch.setattr(queue, "end_probe", end_probe)
    await queue._give_back("gp", jobs, probe=probe)
    woke = [(("gp",), {"wake": 1})]
    ended = [(("gp",), {"decided": False})]
    assert calls == {"activate": [] if probe else woke, "end_probe": ended if probe else []}
    assert await redis.lrange(queue.keys("gp").queue, 0, -1) == [jobs[1].id, jobs[0].id]


async def test_a_give_back_that_fails_is_one_warning_with_its_count_and_cause(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = await submitted(redis, "gw", 2)
    queue = store.queue
    jobs = await leased(store, 2)

    async def requeue(*_: Any, **__: Any) -> str:
        raise RuntimeError("requeue failed")

    monkeypatch.setattr(queue, "requeue", requeue)
    with caplog.at_level(logging.INFO, logger="budgeter.jobqueue"):
        await queue._give_back("gw", jobs, probe=False)
        await queue._give_back("gw", [], probe=False)  # nothing to give back: nothing said
    records = [r for r in caplog.records if r.name == "budgeter.jobqueue"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "giving back 2 unreplicated leases failed: requeue failed")
    ]


@pytest.mark.parametrize(("asked", "blocks"), [(0.0, 0.01), (-1.0, 0.01), (0.5, 0.5)])
async def test_the_wait_for_work_blocks_as_long_as_asked_and_at_least_10_ms(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, asked: float, blocks: float
) -> None:
    queue = JobQueue(redis)
    timeouts: list[object] = []
    real = redis.blpop

    async def blpop(keys: list[str], **options: Any) -> Any:
        timeouts.append(options.get("timeout"))
        return await real(keys, timeout=0.01)

    monkeypatch.setattr(redis, "blpop", blpop)
    await redis.delete(queue.sched.wake)
    assert await queue.wait_for_work(asked) is None
    await redis.rpush(queue.sched.wake, "wt")
    assert await queue.wait_for_work(asked) == "wt"
    assert timeouts == [blocks, blocks]


async def test_cancelling_the_heartbeats_stops_their_loop(redis: Redis) -> None:
    store = await submitted(redis, "hb", 1)
    (job,) = await leased(store, 1)
    slept = asyncio.Event()

    async def sleep(_seconds: float) -> None:
        slept.set()
        await asyncio.Event().wait()  # the next look never comes by itself

    beats = Heartbeats(store.queue, lease_ms=60_000, hold_ms=90_000, sleep=sleep)
    beats.cancel()  # no loop yet: nothing to cancel
    with beats.beat_for(job, {}):
        await asyncio.wait_for(slept.wait(), 5)
        task = beats._task
        assert task is not None
        beats.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert task.cancelled()


async def test_an_ack_is_not_a_dead_letter_unless_said_and_a_bad_state_is_named(
    redis: Redis,
) -> None:
    store = await submitted(redis, "ak", 2)
    first, second = await leased(store, 2)
    assert await store.queue.ack(first, "errored", {"type": "errored"})
    assert await redis.lrange(store.queue.keys("ak").dead, 0, -1) == []
    assert await store.queue.ack(second, "errored", {"type": "errored"}, dead=True)
    assert await redis.lrange(store.queue.keys("ak").dead, 0, -1) == [second.id]
    with pytest.raises(ValueError, match=r"^not a terminal state: running$"):
        await store.queue.finish("ak", "j", "b", "c", "running", {})


async def test_a_reclaimed_lease_wakes_one_worker(redis: Redis) -> None:
    store = await submitted(redis, "rc", 1)
    (job,) = await leased(store, 1)
    requeued, dead = await store.queue.reclaim("rc", max_attempts=5, now_ms=10**13)
    assert (requeued, dead) == (1, [])
    assert await redis.lrange(store.queue.sched.wake, 0, -1) == ["rc"]
    assert await redis.lrange(store.queue.keys("rc").queue, 0, -1) == [job.id]


@pytest.mark.parametrize("left", [0, 1])
async def test_a_tenant_found_empty_leaves_the_ready_set_unless_a_job_came_meanwhile(
    redis: Redis, left: int
) -> None:
    store = await submitted(redis, "dz", 1)
    queue = store.queue
    await leased(store, 1)
    if left:
        await redis.rpush(queue.keys("dz").queue, "a-job-pushed-meanwhile")
    await queue._deactivate("dz")
    assert (await redis.zscore(queue.sched.ready, "dz") is not None) is bool(left)
