"""The worker's loops and one job's way through it, exactly (issue 21: mutmut's survivors
in the lane, lease, pick, give-back, idle and maintenance plumbing of ``Worker``, and in
``_process``, ``_handle``, ``_handle_leased`` and ``_forward``).

A lane that fails logs once, sleeps 1 s (or until the stop) and goes on; a lane answered
"try again" or idle goes on; a pick that fails answers every lane "no work" and has them
sleep rather than wait for work; a parked tenant shortens the idle wait to when it is due;
a job leased for a lane that is gone goes back to the head of its queue, no attempt
counted, and wakes one worker; the idle lanes share one wait for work, each no longer than
its own; a wake names the tenant to activate (a foreign name is ignored); the upkeep runs
every ``maintenance_interval_s`` times a jitter in [0.8, 1.2].

A job that fails unexpectedly is logged with its tenant and id and retried or
dead-lettered with "internal error in worker"; if even that fails, one warning names it; a
job cut off by the drain goes back to the head of its queue with the attempt counted and
wakes one worker, unless its answer is being kept; a job is beating with an empty
reservation id until it has one; a canceled, orphaned or invalid job ends with its exact
result; a served job reports its tokens to the scheduler and wakes the tenants that waited
for its settle.

The sleeps are recorded (``_sleep_or_stop`` replaced), so nothing here waits for a
timer to run out; queue calls are spied on and then made for real on the suite's Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.admission.decision import Decision, SettleResult, Usage, format_ms
from budgeter.domain.passthrough import Passthrough
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.results import canceled, error_body, errored
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import Picks
from budgeter.queue.leased import LeasedJob
from budgeter.tenants.store import TenantStore
from budgeter.worker import worker as worker_module
from budgeter.worker.worker import _RETRY, LeaseAnswer, Worker, _params_problem, _sleep_or_stop
from tests.helpers import requests_for
from tests.worker.test_dead_letter import idle_worker
from tests.worker.test_worker import results_of, sample

Call = tuple[str, tuple[Any, ...], dict[str, Any]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def spy(
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    name: str,
    calls: list[Call],
    *,
    fail: BaseException | None = None,
) -> None:
    """Record each call of ``target.name`` in ``calls``, then make it (or raise ``fail``)."""
    real: Callable[..., Awaitable[Any]] = getattr(target, name)

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, args, kwargs))
        if fail is not None:
            raise fail
        return await real(*args, **kwargs)

    monkeypatch.setattr(target, name, recorded)


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[asyncio.Event, float]]:
    """``_sleep_or_stop`` replaced: each call recorded, none waits."""
    slept: list[tuple[asyncio.Event, float]] = []

    async def sleep(stop: asyncio.Event, seconds: float) -> None:
        slept.append((stop, seconds))

    monkeypatch.setattr(worker_module, "_sleep_or_stop", sleep)
    return slept


async def leased_batch(
    redis: Redis, tenant: str, count: int, *, queued: int = 0, policy: TenantPolicy | None = None
) -> tuple[BatchStore, str, list[LeasedJob]]:
    """One batch of ``tenant``: ``count`` jobs leased, ``queued`` more left in its queue
    (the submit's wakes cleared: not the test's)."""
    await TenantStore(redis).put(tenant, policy or TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create(tenant, requests_for(tenant, count + queued))
    picks = await store.queue.pick_many(count, lease_ms=60_000)
    assert len(picks.jobs) == count
    await redis.delete(store.queue.sched.wake)
    return store, batch_id, picks.jobs


async def leased_jobs(redis: Redis, tenant: str, count: int, queued: int = 0) -> list[LeasedJob]:
    """``count`` jobs of ``tenant`` leased (``queued`` more left in its queue)."""
    return (await leased_batch(redis, tenant, count, queued=queued))[2]


def worker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "budgeter.worker"]


# give-back ----------------------------------------------------------------------------


async def test_a_job_leased_for_a_lane_gone_goes_back_at_the_head_with_no_attempt_counted(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "gb", 1, queued=1)
    worker = idle_worker(redis, session)
    calls: list[Call] = []
    spy(monkeypatch, worker.queue, "requeue", calls)
    spy(monkeypatch, worker.queue, "activate", calls)
    spy(monkeypatch, worker.probes, "done", calls)
    await worker._give_back([job])
    assert calls == [
        ("requeue", (job,), {"head": True, "count_attempt": False}),
        ("activate", ("gb",), {"wake": 1}),
        ("done", (job,), {"decided": False}),
    ]
    keys = worker.queue.keys("gb")
    assert await redis.lrange(keys.queue, 0, 0) == [job.id]  # at the head
    assert await redis.lrange(worker.queue.sched.wake, 0, -1) == ["gb"]  # one worker woken
    again = await worker.queue.pick(lease_ms=60_000)
    assert again.job is not None and again.job.id == job.id
    assert again.job.attempt == job.attempt  # the give-back counted no attempt


async def test_a_give_back_that_fails_is_logged_with_its_job_and_the_next_one_still_goes_back(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = await leased_jobs(redis, "gf", 2)
    worker = idle_worker(redis, session)
    real = worker.queue.requeue

    async def requeue(job: LeasedJob, *, head: bool, count_attempt: bool) -> str:
        if job.id == first.id:
            raise RuntimeError("requeue failed")
        return await real(job, head=head, count_attempt=count_attempt)

    monkeypatch.setattr(worker.queue, "requeue", requeue)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker._give_back([first, second])
    (record,) = worker_records(caplog)
    assert record.getMessage() == "could not give a job back"
    assert record.levelno == logging.WARNING
    assert record.__dict__["job"] == first.id
    assert await redis.lrange(worker.queue.keys("gf").queue, 0, -1) == [second.id]


# pick ---------------------------------------------------------------------------------


def lease_futures(count: int) -> list[asyncio.Future[LeaseAnswer]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(count)]


def scripted_picks(
    monkeypatch: pytest.MonkeyPatch, worker: Worker, answer: Picks | BaseException
) -> list[Call]:
    calls: list[Call] = []

    async def pick_many(slots: int, **kwargs: Any) -> Picks:
        calls.append(("pick_many", (slots,), kwargs))
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(worker.queue, "pick_many", pick_many)
    return calls


async def test_a_pick_that_fails_answers_every_lane_no_work_and_makes_them_sleep(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = idle_worker(redis, session, idle_max_s=2.0)
    scripted_picks(monkeypatch, worker, RuntimeError("pick down"))
    waiters = lease_futures(2)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker._pick_for(waiters)
    assert [w.result() for w in waiters] == [None, None]
    assert worker._idle_wait_s == -1.0  # the lanes sleep, they do not wait for work
    (record,) = worker_records(caplog)
    assert (record.getMessage(), record.levelno) == ("pick failed; retrying", logging.ERROR)


@pytest.mark.parametrize(
    ("next_parked_ms", "wait_s"),
    [(-1, 2.0), (1_000_300, 0.3), (1_000_000, 0.01), (999_000, 0.01), (1_005_000, 2.0)],
)
async def test_a_parked_tenant_shortens_the_idle_wait_to_when_it_is_due(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    next_parked_ms: int,
    wait_s: float,
) -> None:
    worker = idle_worker(redis, session, idle_max_s=2.0)
    worker._idle_wait_s = -1.0  # (a failed pick before): each pick starts from idle_max_s
    calls = scripted_picks(monkeypatch, worker, Picks([], next_parked_ms, 1_000_000))
    waiters = lease_futures(1)
    await worker._pick_for(waiters)
    assert waiters[0].result() is None
    assert worker._idle_wait_s == wait_s
    assert [c[1] for c in calls] == [(1,)]


async def test_lanes_beyond_the_jobs_picked_are_told_to_try_again_and_the_wait_is_kept(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "pk", 1)
    worker = idle_worker(redis, session, idle_max_s=2.0)
    calls = scripted_picks(monkeypatch, worker, Picks([job], 1_000_300, 1_000_000))
    waiters = lease_futures(3)
    await worker._pick_for(waiters)
    assert [w.result() for w in waiters] == [job, _RETRY, _RETRY]
    assert worker._idle_wait_s == 2.0  # jobs were picked: a parked tenant changes nothing
    assert [c[1] for c in calls] == [(3,)]


async def test_a_job_picked_for_a_lane_already_gone_is_given_back(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await leased_jobs(redis, "po", 2)
    worker = idle_worker(redis, session)
    scripted_picks(monkeypatch, worker, Picks([first, second], -1, 1_000_000))
    given: list[Call] = []
    spy(monkeypatch, worker, "_give_back", given)
    waiters = lease_futures(2)
    waiters[1].cancel()  # its lane was cancelled (drain)
    await worker._pick_for(waiters)
    assert waiters[0].result() == first
    assert given == [("_give_back", ([second],), {})]
    assert await redis.lrange(worker.queue.keys("po").queue, 0, -1) == [second.id]


# lease --------------------------------------------------------------------------------


async def test_one_lane_alone_gets_a_job_from_one_pick(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "l1", 1)
    worker = idle_worker(redis, session)
    calls = scripted_picks(monkeypatch, worker, Picks([job], -1, 1_000_000))
    assert await asyncio.wait_for(worker._lease(), 5) == job
    assert [c[1] for c in calls] == [(1,)]


async def test_lanes_asking_in_one_round_share_one_pick(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await leased_jobs(redis, "l2", 2)
    worker = idle_worker(redis, session)
    calls = scripted_picks(monkeypatch, worker, Picks([first, second], -1, 1_000_000))
    answers = await asyncio.wait_for(asyncio.gather(worker._lease(), worker._lease()), 5)
    assert answers == [first, second]
    assert [c[1] for c in calls] == [(2,)]


async def test_a_lane_cancelled_just_after_its_job_was_set_gives_the_job_back(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "lc", 1)
    worker = idle_worker(redis, session)
    scripted_picks(monkeypatch, worker, Picks([job], -1, 1_000_000))
    lane: asyncio.Task[LeaseAnswer] = asyncio.ensure_future(worker._lease())

    def leased(_jobs: list[LeasedJob]) -> None:  # runs before the job is handed to the lane
        asyncio.get_running_loop().call_soon(lane.cancel)  # so the cancel comes first

    monkeypatch.setattr(worker.probes, "leased", leased)
    given: list[Call] = []
    spy(monkeypatch, worker, "_give_back", given)
    with pytest.raises(asyncio.CancelledError):
        await lane
    await asyncio.wait(set(worker._picking), timeout=5)
    # the pick had no orphan (its lane took the job); the lane, cancelled then, gave it back
    assert given == [("_give_back", ([],), {}), ("_give_back", ([job],), {})]
    assert await redis.lrange(worker.queue.keys("lc").queue, 0, -1) == [job.id]


async def test_a_lane_cancelled_while_it_waits_is_cancelled_and_its_job_given_back(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "lw", 1)
    worker = idle_worker(redis, session)
    scripted_picks(monkeypatch, worker, Picks([job], -1, 1_000_000))
    lane: asyncio.Task[LeaseAnswer] = asyncio.ensure_future(worker._lease())
    await asyncio.sleep(0)  # it asked; the pick starts in the next round
    lane.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lane
    await asyncio.wait(set(worker._picking), timeout=5)
    assert await redis.lrange(worker.queue.keys("lw").queue, 0, -1) == [job.id]
    assert not worker._picking  # each spawned task is forgotten once done


# lane ---------------------------------------------------------------------------------


def scripted_leases(
    monkeypatch: pytest.MonkeyPatch,
    worker: Worker,
    stop: asyncio.Event,
    answers: list[LeaseAnswer | BaseException],
) -> list[int]:
    """``worker._lease`` answers ``answers`` in turn, then sets ``stop`` and answers None."""
    asked: list[int] = []

    async def lease() -> LeaseAnswer:
        asked.append(len(asked))
        if len(asked) > len(answers):
            stop.set()
            return None
        answer = answers[len(asked) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(worker, "_lease", lease)
    return asked


async def test_a_lane_that_fails_logs_sleeps_one_second_or_until_the_stop_and_goes_on(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = idle_worker(redis, session)
    stop = asyncio.Event()
    slept = record_sleeps(monkeypatch)
    asked = scripted_leases(monkeypatch, worker, stop, [RuntimeError("lease down")])
    idled: list[Call] = []

    async def idle(stop_: asyncio.Event) -> None:
        idled.append(("_idle", (stop_,), {}))

    monkeypatch.setattr(worker, "_idle", idle)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await asyncio.wait_for(worker._lane(stop), 5)
    assert slept == [(stop, 1.0)]
    assert len(asked) == 2  # it asked again after the failure
    assert idled == [("_idle", (stop,), {})]  # the second answer (no work): idle
    (record,) = worker_records(caplog)
    assert (record.getMessage(), record.levelno) == ("lane failed; retrying", logging.ERROR)


async def test_a_lane_told_to_try_again_asks_again_and_one_that_worked_counts_itself_free(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = await leased_jobs(redis, "ln", 1)
    worker = idle_worker(redis, session)
    stop = asyncio.Event()
    asked = scripted_leases(monkeypatch, worker, stop, [_RETRY, job])
    busy: list[int] = []

    async def process(_job: LeasedJob) -> None:
        busy.append(worker._busy)

    monkeypatch.setattr(worker, "_process", process)
    done: list[Call] = []
    spy(monkeypatch, worker.probes, "done", done)
    await asyncio.wait_for(worker._lane(stop), 5)
    assert len(asked) == 3
    assert busy == [1]  # busy while it processed the job
    assert worker._busy == 0  # and free after
    assert done == [("done", (job,), {})]


# idle ---------------------------------------------------------------------------------


async def test_after_a_failed_pick_an_idle_lane_sleeps_one_second_or_until_the_stop(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session)
    slept = record_sleeps(monkeypatch)
    waited: list[Call] = []
    spy(monkeypatch, worker, "_wait_for_work", waited)
    stop = asyncio.Event()
    worker._idle_wait_s = -1.0
    await asyncio.wait_for(worker._idle(stop), 5)
    assert slept == [(stop, 1.0)]
    assert waited == []


@pytest.mark.parametrize("wait_s", [0.0, 0.5])
async def test_an_idle_lane_waits_for_work_as_long_as_its_pick_said(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, wait_s: float
) -> None:
    worker = idle_worker(redis, session)
    slept = record_sleeps(monkeypatch)
    waited: list[Call] = []

    async def wait_for_work(stop: asyncio.Event, seconds: float) -> None:
        waited.append(("_wait_for_work", (stop, seconds), {}))

    monkeypatch.setattr(worker, "_wait_for_work", wait_for_work)
    stop = asyncio.Event()
    worker._idle_wait_s = wait_s
    await asyncio.wait_for(worker._idle(stop), 5)
    assert waited == [("_wait_for_work", (stop, wait_s), {})]
    assert slept == []


async def test_idle_lanes_share_one_wait_and_each_leaves_it_at_its_own_time(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session)
    waits: list[float] = []
    cancelled = asyncio.Event()

    async def wait_for_work(_stop: asyncio.Event, seconds: float) -> None:
        waits.append(seconds)
        try:
            await asyncio.Event().wait()  # no work ever comes
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(worker, "_wait_for_work", wait_for_work)
    stop = asyncio.Event()
    worker._idle_wait_s = 0.02
    await asyncio.wait_for(asyncio.gather(worker._idle(stop), worker._idle(stop)), 5)
    assert waits == [0.02]  # one wait for both lanes
    assert worker._idler is not None and not worker._idler.done()  # shielded: it goes on
    await asyncio.wait_for(worker._idle(stop), 5)  # a third lane joins the same wait
    assert waits == [0.02]
    worker._idler.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)


# wait for work ------------------------------------------------------------------------


async def test_a_wake_naming_a_tenant_activates_it_and_a_foreign_name_is_ignored(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session)
    activated: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", activated)
    waits: list[Call] = []
    spy(monkeypatch, worker.queue, "wait_for_work", waits)
    stop = asyncio.Event()
    wake = worker.queue.sched.wake
    await redis.delete(wake)
    await redis.rpush(wake, "ww", "not a tenant!", "")
    for _ in range(3):
        await asyncio.wait_for(worker._wait_for_work(stop, 3.0), 5)
    assert activated == [("activate", ("ww",), {})]
    assert waits == [("wait_for_work", (3.0,), {})] * 3
    assert all("Event.wait" not in repr(t.get_coro()) for t in asyncio.all_tasks())


@pytest.mark.parametrize("fails_on_cancel", [False, True])
async def test_a_stop_ends_the_wait_for_work_and_cancels_it(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    fails_on_cancel: bool,
) -> None:
    """True: the wait fails as the stop cancels it (a connection dropped): it ends quietly."""
    worker = idle_worker(redis, session)
    waiting = asyncio.Event()
    cancelled: list[bool] = []

    async def wait_for_work(_timeout_s: float) -> str | None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            if fails_on_cancel:
                raise RuntimeError("connection dropped on cancel") from None
            raise
        return None

    monkeypatch.setattr(worker.queue, "wait_for_work", wait_for_work)
    activated: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", activated)
    stop = asyncio.Event()
    ending = asyncio.ensure_future(worker._wait_for_work(stop, 60.0))
    await asyncio.wait_for(waiting.wait(), 5)
    stop.set()
    await asyncio.wait_for(ending, 5)  # no error
    assert cancelled == [True]
    assert activated == []


async def test_a_wait_for_work_that_fails_ends_quietly(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session)
    calls: list[Call] = []
    spy(monkeypatch, worker.queue, "wait_for_work", calls, fail=RuntimeError("blpop failed"))
    activated: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", activated)
    await asyncio.wait_for(worker._wait_for_work(asyncio.Event(), 1.0), 5)
    assert len(calls) == 1
    assert activated == []


async def test_an_activation_that_fails_after_a_wake_ends_the_wait_quietly(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session)
    calls: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", calls, fail=RuntimeError("activate failed"))
    await redis.delete(worker.queue.sched.wake)
    await redis.rpush(worker.queue.sched.wake, "wf")
    await asyncio.wait_for(worker._wait_for_work(asyncio.Event(), 1.0), 5)
    assert calls == [("activate", ("wf",), {})]


# upkeep, drain and the sleep ----------------------------------------------------------


async def test_the_upkeep_runs_every_interval_times_a_jitter_and_a_failure_is_logged(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = idle_worker(redis, session, maintenance_interval_s=5.0)
    stop = asyncio.Event()
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return 1.1

    monkeypatch.setattr(worker_module.random, "uniform", uniform)
    slept: list[tuple[asyncio.Event, float]] = []

    async def sleep(stop_: asyncio.Event, seconds: float) -> None:
        slept.append((stop_, seconds))
        if len(slept) == 2:
            stop.set()

    monkeypatch.setattr(worker_module, "_sleep_or_stop", sleep)
    maintained: list[Call] = []
    spy(monkeypatch, worker, "maintain", maintained, fail=RuntimeError("upkeep failed"))
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await asyncio.wait_for(worker._maintenance_loop(stop), 5)
    assert len(maintained) == 2
    assert drawn == [(0.8, 1.2)] * 2
    assert slept == [(stop, 5.0 * 1.1)] * 2
    records = worker_records(caplog)
    assert [(r.getMessage(), r.levelno) for r in records] == [
        ("maintenance failed", logging.ERROR)
    ] * 2


async def test_a_stop_during_an_upkeep_cancels_it_and_the_run_ends(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session, concurrency=1, idle_max_s=0.05)
    stop = asyncio.Event()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def maintain(**_: object) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(worker, "maintain", maintain)
    running = asyncio.ensure_future(worker.run(stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    assert await asyncio.wait_for(running, 10) is None
    assert cancelled.is_set()


async def test_a_drain_waits_for_give_backs_no_longer_than_its_bound(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session, drain_s=1.0)
    monkeypatch.setattr(worker_module, "PICKS_DRAIN_S", 0.05)
    lane = asyncio.ensure_future(asyncio.sleep(0))
    worker._tasks.add(lane)
    stuck = asyncio.Event()
    gave_back = asyncio.Event()

    async def give_back() -> None:
        await stuck.wait()  # a give-back Redis never answers

    async def quick() -> None:
        gave_back.set()

    worker._spawn(give_back())
    worker._spawn(quick())
    await asyncio.wait_for(worker.drain(), 5)
    assert gave_back.is_set()
    assert len(worker._picking) == 1  # the stuck one, left after the bound
    stuck.set()
    await asyncio.wait(set(worker._picking), timeout=5)
    assert not worker._picking


async def test_sleep_or_stop_returns_at_the_time_or_at_the_stop() -> None:
    stop = asyncio.Event()
    await asyncio.wait_for(_sleep_or_stop(stop, 0.01), 5)  # the time ran out: no error
    stop.set()
    await asyncio.wait_for(_sleep_or_stop(stop, 3600.0), 5)  # stopped: at once


async def test_a_tenant_whose_upkeep_fails_is_logged_and_the_others_still_kept(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for tenant in ("ua", "ub"):
        await TenantStore(redis).put(tenant, TenantPolicy())
    worker = idle_worker(redis, session)
    kept: list[str] = []

    async def maintain_tenant(tenant: str, _now_ms: int | None) -> None:
        if tenant == "ua":
            raise RuntimeError("upkeep of ua failed")
        kept.append(tenant)

    monkeypatch.setattr(worker, "_maintain_tenant", maintain_tenant)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker.maintain(now_ms=1_000_000)
    assert "ub" in kept and "ua" not in kept
    (record,) = worker_records(caplog)
    assert (record.getMessage(), record.levelno) == (
        "maintenance of a tenant failed",
        logging.ERROR,
    )
    assert record.__dict__["tenant"] == "ua"


@pytest.mark.parametrize("reaped", [0, 2])
async def test_account_reservations_reaped_are_logged_with_their_count(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reaped: int,
) -> None:
    worker = idle_worker(redis, session)
    asked: list[int | None] = []

    async def reap_global(*, now_ms: int | None = None) -> int:
        asked.append(now_ms)
        return reaped

    monkeypatch.setattr(worker.admission, "reap_global", reap_global)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker.maintain(now_ms=1_234)
    assert asked == [1_234]
    said = [(r.getMessage(), r.levelno, r.__dict__.get("charged")) for r in worker_records(caplog)]
    expected = ("reaped account reservations of a dead process", logging.WARNING, reaped)
    assert said == ([expected] if reaped else [])


async def test_the_upkeep_reaps_dead_reservations_counts_logs_and_wakes_the_waiting(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await TenantStore(redis).put("rp", TenantPolicy(max_concurrency=2))
    worker = idle_worker(redis, session)
    adm = worker.admission
    now = 1_700_000_000_000
    for rid in ("sent", "unsent"):
        decision = await adm.reserve("rp", rid, 10, 10, hold_ms=1_000, now_ms=now)
        assert decision.kind == "ADMIT"
    assert await adm.mark_sent("rp", "sent")
    waited = await adm.reserve("rp", "third", 10, 10, hold_ms=1_000, now_ms=now)
    assert (waited.kind, waited.reason) == ("DEFER", "concurrency")  # waits for a settle
    activated: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", activated)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker.maintain(now_ms=now + 2_000)
    for action, count in (("charged", 1), ("released", 1)):
        assert sample(
            worker.metrics, "budgeter_reaped_reservations_total", tenant="rp", action=action
        ) == (count)
    (record,) = [r for r in worker_records(caplog) if r.getMessage().startswith("reaped")]
    assert (record.getMessage(), record.levelno) == (
        "reaped reservations of a dead worker",
        logging.WARNING,
    )
    extra = record.__dict__
    assert (extra["tenant"], extra["charged"], extra["released"]) == ("rp", 1, 1)
    assert activated == [("activate", ("rp",), {"unpark": True, "wake": 1})]


async def test_results_past_their_retention_are_purged_as_of_the_workers_clock(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await TenantStore(redis).put("pr", TenantPolicy())
    worker = idle_worker(redis, session, results_retention_ms=5_000)
    worker.clock = lambda: 1_000.0  # seconds
    purged: list[Call] = []
    spy(monkeypatch, worker.batches, "purge_older_than", purged)
    await worker.maintain()
    assert ("purge_older_than", ("pr", 1_000_000 - 5_000), {}) in purged
    purged.clear()
    await worker.maintain(now_ms=2_000_000)
    assert ("purge_older_than", ("pr", 2_000_000 - 5_000), {}) in purged


# one job -------------------------------------------------------------------------------


async def one_leased(redis: Redis, tenant: str) -> tuple[BatchStore, str, LeasedJob]:
    store, batch_id, (job,) = await leased_batch(
        redis, tenant, 1, policy=TenantPolicy(budgets={"day": 100_000})
    )
    return store, batch_id, job


ANSWER: dict[str, object] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 10, "output_tokens": 3},
}


async def admitted_and_answered(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> tuple[BatchStore, str, LeasedJob, Worker]:
    """One leased job of ``tenant``, its reservation admitted (10 in, at most 64 out,
    marked sent) and an upstream that answers ANSWER (10 in, 3 out)."""
    store, batch_id, job = await one_leased(redis, tenant)
    worker = idle_worker(redis, session)
    decision = await worker.admission.reserve(tenant, job.reservation_id, 10, 64, sent_at_once=True)
    assert decision.kind == "ADMIT"

    async def create_message(_params: object, _passthrough: Passthrough) -> dict[str, object]:
        return ANSWER

    monkeypatch.setattr(worker.upstream, "create_message", create_message)
    return store, batch_id, job, worker


def failing_handle(monkeypatch: pytest.MonkeyPatch, worker: Worker, exc: BaseException) -> None:
    async def handle(_job: LeasedJob) -> None:
        raise exc

    monkeypatch.setattr(worker, "_handle", handle)


INTERNAL = errored(error_body("api_error", "internal error in worker"))


async def test_a_job_that_fails_unexpectedly_is_logged_and_dead_lettered_on_its_last_attempt(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, batch_id, job = await one_leased(redis, "pf")
    worker = idle_worker(redis, session, max_attempts=1)
    failing_handle(monkeypatch, worker, RuntimeError("a bug"))
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker._process(job)
    assert worker.processed == 1
    (line,) = await results_of(store, batch_id)
    assert line["result"] == INTERNAL
    assert sample(worker.metrics, "budgeter_dead_lettered_total", tenant="pf") == 1
    (record,) = worker_records(caplog)
    assert (record.getMessage(), record.levelno) == ("job failed", logging.ERROR)
    assert (record.__dict__["tenant"], record.__dict__["job"]) == ("pf", job.id)


async def test_a_job_that_cannot_even_be_given_back_is_one_warning_naming_it(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, job = await one_leased(redis, "pg")
    worker = idle_worker(redis, session)
    failing_handle(monkeypatch, worker, RuntimeError("a bug"))

    async def retry_or_dead(*_: Any) -> None:
        raise RuntimeError("Redis away too")

    monkeypatch.setattr(worker, "_retry_or_dead", retry_or_dead)
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        await worker._process(job)
    assert worker.processed == 1
    said = [(r.getMessage(), r.levelno, r.__dict__.get("job")) for r in worker_records(caplog)]
    assert said == [
        ("job failed", logging.ERROR, job.id),
        ("could not give the job back", logging.WARNING, job.id),
    ]


@pytest.mark.parametrize("kept", [False, True], ids=["given_back", "answer_kept"])
async def test_a_job_cut_off_by_the_drain_goes_back_at_the_head_with_its_attempt_counted(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    store, _, job = await one_leased(redis, "pc")
    worker = idle_worker(redis, session)
    failing_handle(monkeypatch, worker, asyncio.CancelledError())
    held: list[LeasedJob] = []

    def holds(asked: LeasedJob) -> bool:
        held.append(asked)
        return kept

    monkeypatch.setattr(worker.keeper, "holds", holds)
    calls: list[Call] = []
    spy(monkeypatch, worker.queue, "requeue", calls)
    spy(monkeypatch, worker.queue, "activate", calls)
    with pytest.raises(asyncio.CancelledError):
        await worker._process(job)
    assert worker.processed == 1
    assert held == [job]
    if kept:  # its upstream answer is being stored: never given back
        assert calls == []
        return
    assert calls == [
        ("requeue", (job,), {"head": True, "count_attempt": True}),
        ("activate", ("pc",), {"wake": 1}),
    ]
    assert await redis.lrange(worker.queue.sched.wake, 0, -1) == ["pc"]
    again = (await store.queue.pick(lease_ms=60_000)).job
    assert again is not None and again.id == job.id and again.attempt == job.attempt + 1


async def test_a_job_beats_with_an_empty_reservation_id_until_it_has_one(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, job = await one_leased(redis, "pb")
    worker = idle_worker(redis, session)
    seen: list[tuple[dict[str, str], bool]] = []

    async def handle_leased(leased: LeasedJob, lease: dict[str, str]) -> None:
        seen.append((dict(lease), (leased.id, leased.attempt) in worker.heartbeats.beating))

    monkeypatch.setattr(worker, "_handle_leased", handle_leased)
    await worker._handle(job)
    worker.heartbeats.cancel()
    assert seen == [({"rid": ""}, True)]
    assert worker.heartbeats.beating == {}


@pytest.mark.parametrize("kind", ["canceled", "orphaned", "invalid"])
async def test_a_canceled_orphaned_or_invalid_job_ends_with_its_exact_result(
    redis: Redis, session: aiohttp.ClientSession, kind: str
) -> None:
    store, batch_id, job = await one_leased(redis, "pj")
    params = {k: v for k, v in job.params.items() if k != "max_tokens"}
    leased = {
        "canceled": replace(job, canceled=True),
        "orphaned": replace(job, orphaned=True),
        "invalid": replace(job, validated=False, params=params),
    }[kind]
    problem = _params_problem(params)
    assert problem
    worker = idle_worker(redis, session)
    await worker._handle_leased(leased, {"rid": ""})
    (line,) = await results_of(store, batch_id)
    assert (
        line["result"]
        == {
            "canceled": canceled(),
            "orphaned": errored(error_body("not_found_error", "tenant has no policy")),
            "invalid": errored(error_body("invalid_request_error", problem)),
        }[kind]
    )
    outcome = "canceled" if kind == "canceled" else "errored"
    assert sample(worker.metrics, "budgeter_jobs_total", tenant="pj", outcome=outcome) == 1


async def test_a_served_job_reports_its_tokens_and_wakes_the_tenants_that_waited(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, batch_id, job, worker = await admitted_and_answered(redis, session, monkeypatch, "ps")
    rid = job.reservation_id
    asked: list[tuple[str, SettleResult]] = []

    async def to_wake(tenant: str, settled: SettleResult) -> list[str]:
        asked.append((tenant, settled))
        return ["waited"]

    monkeypatch.setattr(worker.admission, "to_wake", to_wake)
    activated: list[Call] = []
    spy(monkeypatch, worker.queue, "activate", activated)
    worker._served["ps"] = (100, 2)  # served before, not yet reported
    await worker._forward(job, dict(job.params), rid, 10, Passthrough())
    assert worker._served["ps"] == (113, 3)
    ((tenant, settled),) = asked
    assert tenant == "ps" and settled.settled == 1 and settled.actual_tokens == 13
    assert activated == [("activate", ("waited",), {"unpark": True, "wake": 1})]
    (line,) = await results_of(store, batch_id)
    assert line["result"]["type"] == "succeeded"


def test_a_worker_builds_its_parts_under_its_prefix_and_starts_idle(
    redis: Redis, session: aiohttp.ClientSession
) -> None:
    worker = idle_worker(redis, session, prefix="wp", lease_ms=7_000, reservation_grace_ms=3_000)
    assert worker.redis is redis
    assert (worker.queue.prefix, worker.tenants.prefix, worker.batches.prefix) == ("wp",) * 3
    assert (worker.counter.prefix, worker.counter.ttl_s) == ("wp", 0)  # counts not cached
    assert worker.keeper.queue is worker.queue
    assert (worker.keeper.lease_ms, worker.keeper.hold_ms) == (7_000, 10_000)
    assert worker._beating is worker.heartbeats.beating
    assert (worker._served, worker._idle_wait_s, worker.processed) == ({}, 2.0, 0)


NOW_MS = 1_700_000_000_000


def scripted_decision(
    monkeypatch: pytest.MonkeyPatch, worker: Worker, decision: Decision
) -> list[tuple[str, dict[str, Any]]]:
    """Counting answers 10 tokens and admission answers ``decision``; the forward is only
    recorded (its rid and params)."""
    forwarded: list[tuple[str, dict[str, Any]]] = []

    async def count_for(*_: object) -> int:
        return 10

    async def reserve_or_defer(*_: object) -> Decision:
        return decision

    async def forward(_job: LeasedJob, params: dict[str, Any], rid: str, *_: object) -> None:
        forwarded.append((rid, params))

    monkeypatch.setattr(worker.counter, "count_for", count_for)
    monkeypatch.setattr(worker_module, "reserve_or_defer", reserve_or_defer)
    monkeypatch.setattr(worker, "_forward", forward)
    return forwarded


@pytest.mark.parametrize(("queued_for_ms", "waited_s"), [(2_500, 2.5), (-1_000, 0.0)])
async def test_an_admitted_job_records_its_wait_and_beats_with_its_reservation(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    queued_for_ms: int,
    waited_s: float,
) -> None:
    _, _, job = await one_leased(redis, "pa")
    job = replace(job, enqueued_ms=NOW_MS - queued_for_ms, params={**job.params, "stream": True})
    worker = idle_worker(redis, session)
    forwarded = scripted_decision(monkeypatch, worker, Decision("ADMIT", 0, "", NOW_MS))
    lease = {"rid": ""}
    await worker._handle_leased(job, lease)
    assert lease == {"rid": job.reservation_id}  # the heartbeat extends it from here on
    ((rid, params),) = forwarded
    assert rid == job.reservation_id and "stream" not in params  # the worker never streams
    registry = worker.metrics.registry
    labels = {"tenant": "pa"}
    assert registry.get_sample_value("budgeter_admission_wait_seconds_sum", labels) == waited_s
    assert registry.get_sample_value("budgeter_admission_wait_seconds_count", labels) == 1


@pytest.mark.parametrize("kind", ["REJECT", "DEFER"])
async def test_a_refused_or_deferred_job_names_its_model(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    store, batch_id, job = await one_leased(redis, "pm")
    worker = idle_worker(redis, session)
    until = job.deadline_ms + 1 if kind == "DEFER" else 0  # a DEFER past the deadline: expired
    decision = Decision(kind, until, "rate:model:rpm", job.deadline_ms - 1_000)
    forwarded = scripted_decision(monkeypatch, worker, decision)
    await worker._handle_leased(job, {"rid": ""})
    assert forwarded == []
    (line,) = await results_of(store, batch_id)
    text = str(line["result"])
    assert "model claude-test" in text and "model None" not in text


async def test_a_job_whose_deadline_is_now_expires_naming_it(
    redis: Redis, session: aiohttp.ClientSession
) -> None:
    store, batch_id, job = await one_leased(redis, "pd")
    worker = idle_worker(redis, session)
    worker.clock = lambda: job.deadline_ms / 1000  # the very millisecond of the deadline
    await worker._handle_leased(job, {"rid": ""})
    (line,) = await results_of(store, batch_id)
    assert line["result"] == {
        "type": "expired",
        "reason": f"its deadline {format_ms(job.deadline_ms)} passed",
    }


# mutmut's survivors of 2026-12-07, second pass --------------------------------------


async def test_a_tenant_parked_until_the_epoch_itself_is_due_at_once(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = idle_worker(redis, session, idle_max_s=2.0)
    scripted_picks(monkeypatch, worker, Picks([], 0, 1_000_000))  # 0 is a time, -1 is none
    waiters = lease_futures(1)
    await worker._pick_for(waiters)
    assert waiters[0].result() is None
    assert worker._idle_wait_s == 0.01  # due long ago: the shortest wait


@pytest.mark.parametrize(
    ("wait_s", "timeout_s"), [(0.0, 0.01), (0.004, 0.01), (0.5, 0.5), (-1.0, 1.0)]
)  # -1: the pick failed, the lane pauses a second (it went on every 10 ms: a hot loop)
async def test_an_idle_lane_leaves_the_shared_wait_after_its_own_wait_of_at_least_10_ms(
    redis: Redis,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    wait_s: float,
    timeout_s: float,
) -> None:
    worker = idle_worker(redis, session)

    async def wait_for_work(_stop: asyncio.Event, _seconds: float) -> None:
        await asyncio.Event().wait()  # no work ever comes

    async def sleep_or_stop(_stop: asyncio.Event, _seconds: float) -> None:
        await asyncio.Event().wait()  # no stop ever comes

    monkeypatch.setattr(worker, "_wait_for_work", wait_for_work)
    monkeypatch.setattr(worker_module, "_sleep_or_stop", sleep_or_stop)
    timeouts: list[float | None] = []
    real_wait_for = asyncio.wait_for

    async def wait_for(  # asyncio.wait_for's signature: the timeout recorded
        awaitable: Awaitable[object],
        timeout: float | None,  # noqa: ASYNC109
    ) -> object:
        timeouts.append(timeout)
        return await real_wait_for(awaitable, 0)  # the time is up at once: no real wait

    monkeypatch.setattr(asyncio, "wait_for", wait_for)  # the worker's calls: recorded
    worker._idle_wait_s = wait_s
    await worker._idle(asyncio.Event())
    monkeypatch.undo()  # asyncio.wait_for is the real one again
    assert timeouts == [timeout_s]
    idler = worker._idler
    assert idler is not None and not idler.done()  # left, not ended: shielded
    idler.cancel()
    await asyncio.wait({idler}, timeout=5)
    assert idler.cancelled()


async def test_each_job_processed_counts_one_more(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, job = await one_leased(redis, "pn")
    worker = idle_worker(redis, session)
    handled: list[LeasedJob] = []

    async def handle(leased: LeasedJob) -> None:
        handled.append(leased)

    monkeypatch.setattr(worker, "_handle", handle)
    for _ in range(3):
        await worker._process(job)
    assert handled == [job] * 3
    assert worker.processed == 3


async def test_a_job_the_api_validated_is_not_validated_again(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, job = await one_leased(redis, "pv")
    assert job.validated
    worker = idle_worker(redis, session)
    asked: list[dict[str, Any]] = []

    def params_problem(params: dict[str, Any]) -> str | None:
        asked.append(params)
        return "not to be asked"

    monkeypatch.setattr(worker_module, "_params_problem", params_problem)
    forwarded = scripted_decision(monkeypatch, worker, Decision("ADMIT", 0, "", NOW_MS))
    await worker._handle_leased(job, {"rid": ""})
    assert asked == []
    assert forwarded == [(job.reservation_id, job.params)]


async def test_a_served_job_whose_settle_redis_missed_renews_its_reservation_until_settled(
    redis: Redis, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, batch_id, job, worker = await admitted_and_answered(redis, session, monkeypatch, "pz")
    rid = job.reservation_id
    real_settle = worker.admission.settle
    settles: list[str] = []

    async def settle(tenant: str, reservation_id: str, usage: Usage) -> SettleResult:
        settles.append(reservation_id)
        if len(settles) == 1:
            raise RedisConnectionError("node away")
        return await real_settle(tenant, reservation_id, usage)

    monkeypatch.setattr(worker.admission, "settle", settle)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    worker.keeper.sleep = sleep
    beats: list[Call] = []
    spy(monkeypatch, worker.queue, "heartbeat", beats)
    await worker._forward(job, dict(job.params), rid, 10, Passthrough())
    assert settles == [rid, rid]
    assert len(slept) == 1
    assert beats == [
        ("heartbeat", (job,), {"lease_ms": 60_000, "reservation_id": rid, "hold_ms": 90_000})
    ]
    (line,) = await results_of(store, batch_id)
    assert line["result"]["type"] == "succeeded"
