"""The job queue's small parts, exactly (issue 21: mutmut's survivors in ``JobQueue``):
leases the replicas did not acknowledge go back at the head with their attempt refunded
and wake one worker (a probing tenant's hold ends instead), a give-back that fails is one
warning; the wait for work blocks as long as asked (at least 10 ms); the heartbeats'
``cancel`` stops their loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import NotifyPolicy, TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, NewJob, Picks, UnknownTenantError
from budgeter.queue.leased import LeasedJob
from budgeter.store.durability import NotReplicated
from budgeter.store.keys import notify_pending_key
from budgeter.store.types import ScriptArg, ScriptReply
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


NOW = 1_764_201_600_000
TTL = 3_600_000
PARAMS: dict[str, object] = {"model": "m", "max_tokens": 8, "messages": []}


def fixed_clock(
    monkeypatch: pytest.MonkeyPatch, on_call: Callable[[int], Awaitable[None]] | None = None
) -> list[int]:
    """Redis server time as ``submit`` reads it, fixed at NOW; ``on_call`` (awaited with
    the call's number, 1 first) runs inside each submission's WATCH. Returns the calls."""
    calls: list[int] = []

    async def server_time_ms(_redis: object) -> int:
        calls.append(len(calls) + 1)
        if on_call is not None:
            await on_call(len(calls))
        return NOW

    monkeypatch.setattr("budgeter.queue.jobqueue.server_time_ms", server_time_ms)
    return calls


async def queue_of(redis: Redis, monkeypatch: pytest.MonkeyPatch, tenant: str) -> JobQueue:
    """A queue whose clock stands at NOW, ``tenant`` given a plain policy."""
    await TenantStore(redis).put(tenant, TenantPolicy())
    fixed_clock(monkeypatch)
    return JobQueue(redis)


async def test_a_new_batch_holds_its_id_times_and_zero_counts_at_normal_priority(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await queue_of(redis, monkeypatch, "nb")
    jobs = [NewJob("a", PARAMS, validated=True), NewJob("b", PARAMS)]
    assert await queue.submit("nb", "b1", jobs, ttl_ms=TTL) == 2
    keys = queue.keys("nb")
    assert await redis.hgetall(keys.batch("b1")) == {
        "id": "b1",
        "created_ms": str(NOW),
        "expires_ms": str(NOW + TTL),
        "processing": "2",
        "succeeded": "0",
        "errored": "0",
        "canceled": "0",
        "expired": "0",
    }
    assert await redis.hgetall(keys.bmeta) == {"b1": f"{NOW} {NOW + TTL}"}  # normal: no 3rd
    assert await redis.lrange(keys.queue, 0, -1) == ["b1:a", "b1:b"]
    body = '{"model":"m","max_tokens":8,"messages":[]}'
    assert await redis.hgetall(keys.jobs) == {
        "b1:a": "v1 " + body,  # validated by the producer: tagged, not validated again
        "b1:b": body,
    }


async def test_more_jobs_for_an_ended_batch_reopen_it_at_its_first_priority(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await queue_of(redis, monkeypatch, "eb")
    keys = queue.keys("eb")
    assert await queue.submit("eb", "b1", [NewJob("a", PARAMS)], priority="high") == 1
    (job,) = (await queue.pick_many(1, lease_ms=60_000, now_ms=NOW)).jobs
    assert await queue.finish("eb", job.id, "b1", "a", "succeeded", {}) is True
    assert await redis.hexists(keys.batch("b1"), "ended_ms")
    assert await queue.submit("eb", "b1", [NewJob("a", PARAMS), NewJob("b", PARAMS)]) == 1
    batch = await redis.hgetall(keys.batch("b1"))
    assert "ended_ms" not in batch  # open again: it can end again
    assert (batch["processing"], batch["succeeded"]) == ("1", "1")
    assert await redis.lrange(keys.queue_high, 0, -1) == ["b1:b"]  # the batch's priority
    assert await redis.lrange(keys.queue, 0, -1) == []


async def test_a_retried_submission_of_a_batch_without_meta_takes_the_priority_given(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await queue_of(redis, monkeypatch, "bm")
    keys = queue.keys("bm")
    assert await queue.submit("bm", "b1", [NewJob("a", PARAMS)]) == 1
    await redis.hdel(keys.bmeta, "b1")  # e.g. written by an older producer
    assert await queue.submit("bm", "b1", [NewJob("b", PARAMS)], priority="low") == 1
    assert await redis.lrange(keys.queue_low, 0, -1) == ["b1:b"]
    assert await redis.lrange(keys.queue, 0, -1) == ["b1:a"]


async def test_work_for_a_tenant_without_a_policy_is_refused_by_name(redis: Redis) -> None:
    queue = JobQueue(redis)
    with pytest.raises(UnknownTenantError, match=r"^tenant 'np' has no policy$"):
        await queue.submit("np", "b1", [NewJob("a", PARAMS)])
    assert await redis.keys("*") == []


async def test_a_policy_deleted_during_a_submission_makes_it_retry_and_be_refused(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await TenantStore(redis).put("pd", TenantPolicy())
    queue = JobQueue(redis)

    async def delete_policy(call: int) -> None:
        if call == 1:
            await redis.delete(queue.keys("pd").policy)

    calls = fixed_clock(monkeypatch, delete_policy)
    with pytest.raises(UnknownTenantError, match=r"^tenant 'pd' has no policy$"):
        await queue.submit("pd", "b1", [NewJob("a", PARAMS)])
    assert calls == [1]  # the retry found no policy before reading the clock
    keys = queue.keys("pd")
    assert await redis.exists(keys.batch("b1"), keys.jobs, keys.queue, keys.bmeta) == 0


async def test_a_batch_submitted_concurrently_is_retried_and_adds_no_job_twice(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await TenantStore(redis).put("cs", TenantPolicy())
    queue, other = JobQueue(redis), JobQueue(redis)
    jobs = [NewJob("a", PARAMS), NewJob("b", PARAMS)]

    async def submit_meanwhile(call: int) -> None:
        if call == 1:
            assert await other.submit("cs", "b1", jobs) == 2

    calls = fixed_clock(monkeypatch, submit_meanwhile)
    assert await queue.submit("cs", "b1", jobs) == 0  # the other one added them
    assert calls == [1, 2, 3]  # this one, the other one, this one again
    keys = queue.keys("cs")
    assert await redis.lrange(keys.queue, 0, -1) == ["b1:a", "b1:b"]
    assert await redis.hget(keys.batch("b1"), "processing") == "2"


async def test_a_submission_that_always_meets_a_concurrent_change_gives_up_after_20(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await TenantStore(redis).put("gu", TenantPolicy())
    queue = JobQueue(redis)

    async def touch_batch(call: int) -> None:
        await redis.hset(queue.keys("gu").batch("b1"), "touched", call)

    calls = fixed_clock(monkeypatch, touch_batch)
    message = r"^batch 'b1': too many concurrent submissions, try again$"
    with pytest.raises(RuntimeError, match=message):
        await queue.submit("gu", "b1", [NewJob("a", PARAMS)])
    assert calls == list(range(1, 21))
    assert await redis.hgetall(queue.keys("gu").batch("b1")) == {"touched": "20"}


@pytest.mark.parametrize(("foreign", "left"), [(1, []), (9, ["Foreign 8"])])
async def test_foreign_tenants_in_the_ready_set_are_dropped_for_eight_rounds_at_most(
    redis: Redis, foreign: int, left: list[str]
) -> None:
    queue = JobQueue(redis)
    names = [f"Foreign {i}" for i in range(foreign)]  # not tenant ids: a foreign producer's
    await redis.zadd(queue.sched.ready, dict.fromkeys(names, 0))
    await redis.zadd(queue.sched.parked, {"pk": NOW + 5_000})
    picks = await queue.pick_many(1, lease_ms=60_000, now_ms=NOW)
    # one dropped per round; after eight fruitless rounds: nothing, and the park end told
    # (it told none: the worker then waited for a wake signal, not the park's end)
    assert picks == Picks([], NOW + 5_000, NOW)
    assert await redis.zrange(queue.sched.ready, 0, -1) == left


async def test_a_tenant_whose_lease_fails_is_one_warning_when_another_tenant_leased(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    queue = (await submitted(redis, "lo", 1)).queue
    await submitted(redis, "lf", 1)
    plain = queue._dequeue

    async def dequeue(*, keys: list[str], args: list[ScriptArg]) -> ScriptReply:
        if keys[0] == queue.keys("lf").queue:
            raise RuntimeError("dequeue failed")
        return await plain(keys=keys, args=args)

    queue._dequeue = dequeue  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="budgeter.jobqueue"):
        picks = await queue.pick_many(2, lease_ms=60_000)
    assert [job.tenant for job in picks.jobs] == ["lo"]
    records = [r for r in caplog.records if r.name == "budgeter.jobqueue"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "leasing a tenant's jobs failed: dequeue failed")
    ]


async def probing(redis: Redis, tenant: str, count: int) -> JobQueue:
    """A tenant with ``count`` jobs whose park ends at NOW: its next pick is a probe."""
    await TenantStore(redis).put(tenant, TenantPolicy())
    store = BatchStore(redis)
    if count:
        await store.create(tenant, requests_for(tenant, count))
    await redis.delete(store.queue.sched.wake)  # the submit's wakes: not the test's
    await store.queue.pace(tenant, NOW)
    return store.queue


async def test_an_unreplicated_probe_lease_given_back_ends_the_probes_hold(
    redis: Redis,
) -> None:
    queue = await probing(redis, "pu", 2)
    queue._dequeue = UnreplicatedAfter(queue._dequeue)  # type: ignore[assignment]
    with pytest.raises(NotReplicated):
        await queue.pick_many(4, lease_ms=60_000, now_ms=NOW)
    s = queue.sched
    assert await redis.zrange(s.held, 0, -1) == []  # the hold ended: ready again
    assert await redis.zrange(s.ready, 0, -1) == ["pu"]
    assert await redis.hget(s.probe, "pu") == "0"  # given back unserved: not counted
    assert await redis.lrange(s.wake, 0, -1) == ["pu"]
    assert await redis.llen(queue.keys("pu").queue) == 2


async def test_a_probe_with_nothing_to_lease_ends_its_hold_uncounted(redis: Redis) -> None:
    queue = await probing(redis, "pn", 0)
    picks = await queue.pick_many(4, lease_ms=60_000, now_ms=NOW)
    assert picks == Picks([], -1, NOW)
    s = queue.sched
    assert await redis.hget(s.probe, "pn") == "0"  # still probing, this one not counted
    assert await redis.zrange(s.held, 0, -1) == []
    assert await redis.zrange(s.ready, 0, -1) == []  # nothing queued: not ready
    assert await redis.lrange(s.wake, 0, -1) == ["pn"]


async def test_a_finished_job_is_not_dead_unless_said_and_names_its_tenant_for_delivery(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = await submitted(redis, "fn", 1)
    await TenantStore(redis).put("fn", TenantPolicy(notify=NotifyPolicy(thresholds=[0.5])))
    queue = store.queue
    (job,) = await leased(store, 1)
    with caplog.at_level(logging.INFO):
        done = await queue.finish("fn", job.id, job.batch_id, job.custom_id, "errored", {})
    assert done is True
    assert await redis.lrange(queue.keys("fn").dead, 0, -1) == []
    assert await redis.smembers(notify_pending_key("budgeter")) == {"fn"}  # batch.ended
    assert await redis.keys("*notify*pending*") == [notify_pending_key("budgeter")]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
