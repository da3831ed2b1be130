"""The heartbeat loop, exactly (issue 21, mutation testing): what one beat writes to Redis
(the lease and the reservation's deadline), what a failed beat logs, and, on an injected
clock and sleep, when the loop looks and which jobs it beats (no waiting on real time)."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.tenants.store import TenantStore
from budgeter.worker.heartbeat import Heartbeats
from tests.helpers import requests_for


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def leased_and_reserved(redis: Redis, tenant: str) -> tuple[BatchStore, LeasedJob]:
    await TenantStore(redis).put(tenant, TenantPolicy())
    store = BatchStore(redis)
    await store.create(tenant, requests_for(tenant, 1))
    job = (await store.queue.pick(lease_ms=1_000)).job
    assert job is not None
    decision = await Admission(redis).reserve(tenant, job.reservation_id, 10, 10, hold_ms=1_000)
    assert decision.kind == "ADMIT"
    return store, job


async def test_a_beat_extends_the_lease_by_the_lease_and_the_reservation_by_the_hold(
    redis: Redis,
) -> None:
    store, job = await leased_and_reserved(redis, "hb1")
    keys = store.queue.keys("hb1")
    beats = Heartbeats(store.queue, lease_ms=50_000, hold_ms=80_000)
    before = await server_ms(redis)
    assert await beats._beat(job, {"rid": job.reservation_id}) is True
    after = await server_ms(redis)
    lease = await redis.zscore(keys.leases, job.id)
    deadline = await redis.zscore(keys.resv_deadline, job.reservation_id)
    assert lease is not None and before + 50_000 <= lease <= after + 50_000
    assert deadline is not None and before + 80_000 <= deadline <= after + 80_000


async def test_a_beat_before_the_reservation_extends_the_lease_only(redis: Redis) -> None:
    store, job = await leased_and_reserved(redis, "hb2")
    keys = store.queue.keys("hb2")
    deadline = await redis.zscore(keys.resv_deadline, job.reservation_id)
    beats = Heartbeats(store.queue, lease_ms=50_000, hold_ms=80_000)
    assert await beats._beat(job, {"rid": ""}) is True
    assert await redis.zscore(keys.resv_deadline, job.reservation_id) == deadline
    lease = await redis.zscore(keys.leases, job.id)
    assert lease is not None and lease >= await server_ms(redis) + 49_000


class ScriptedQueue:
    """A queue whose heartbeat answers from a script (True held, False lost, an exception
    raised) and records each call: (job id, clock, lease_ms, reservation id, hold_ms)."""

    def __init__(self, clock: list[float], answers: dict[str, list[object]]) -> None:
        self.clock = clock
        self.answers = answers
        self.calls: list[tuple[str, float, int, str | None, int]] = []
        self.called = asyncio.Event()  # a beat was asked for
        self.held = asyncio.Event()  # cleared: the beats wait for the test before answering
        self.held.set()

    async def heartbeat(
        self, job: LeasedJob, *, lease_ms: int, reservation_id: str | None, hold_ms: int
    ) -> bool:
        self.calls.append((job.id, self.clock[0], lease_ms, reservation_id, hold_ms))
        self.called.set()
        await self.held.wait()
        script = self.answers.get(job.id, [])
        answer = script.pop(0) if script else True
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)


def job_named(name: str) -> LeasedJob:
    return LeasedJob(
        tenant="t",
        id=name,
        batch_id="b",
        custom_id=name,
        params={},
        validated=True,
        attempt=1,
        enqueued_ms=0,
        deadline_ms=0,
        leased_at_ms=0,
    )


class SteppedTime:
    """An injected clock and sleep: each sleep moves the clock on by what was asked, up to
    ``steps`` sleeps; then the loop waits there until the test lets it go."""

    def __init__(self, steps: int) -> None:
        self.clock = [0.0]
        self.steps = steps
        self.slept: list[float] = []
        self.stopped = asyncio.Event()  # the loop waits at its last step
        self.go = asyncio.Event()

    def now(self) -> float:
        return self.clock[0]

    async def sleep(self, seconds: float) -> None:
        if len(self.slept) == self.steps:
            self.stopped.set()
            await self.go.wait()
        self.slept.append(seconds)
        self.clock[0] += seconds
        await asyncio.sleep(0)


def stepped_beats(
    steps: int, answers: dict[str, list[object]] | None = None, lease_ms: int = 6_000
) -> tuple[Heartbeats, ScriptedQueue, SteppedTime]:
    time = SteppedTime(steps)
    queue = ScriptedQueue(time.clock, answers or {})
    beats = Heartbeats(
        cast(JobQueue, queue), lease_ms=lease_ms, hold_ms=9_000, clock=time.now, sleep=time.sleep
    )
    return beats, queue, time


async def ended(beats: Heartbeats, time: SteppedTime) -> None:
    """Let the loop go on from its last step: with nothing beating, it ends at its next look."""
    task = beats._task
    assert task is not None
    time.go.set()
    await asyncio.wait_for(task, 10)
    assert beats._task is None


async def test_the_loop_looks_every_sixth_of_a_lease_and_beats_every_third() -> None:
    beats, queue, time = stepped_beats(steps=7)  # a 6 s lease: looks every 1 s, beats at 2 s
    with beats.beat_for(job_named("a"), {"rid": "r-a"}):
        await asyncio.wait_for(time.stopped.wait(), 10)
    assert time.slept == [1.0] * 7
    # started at 0: due at exactly 2 s (a third of the lease), then every 2 s after a beat
    assert [(call[0], call[1]) for call in queue.calls] == [("a", 2.0), ("a", 4.0), ("a", 6.0)]
    assert {call[2:] for call in queue.calls} == {(6_000, "r-a", 9_000)}
    await ended(beats, time)


async def test_each_job_beats_on_its_own_schedule_and_none_after_its_block() -> None:
    beats, queue, time = stepped_beats(steps=7)
    late = job_named("late")
    with beats.beat_for(job_named("early"), {"rid": ""}):
        await asyncio.sleep(0)  # the loop's first sleep: the clock is at 1 s
        assert time.clock[0] == 1.0  # "late" starts at 1 s
        with beats.beat_for(late, {"rid": "r-late"}):
            await asyncio.wait_for(time.stopped.wait(), 10)
    beaten = [(call[0], call[1]) for call in queue.calls]
    assert [t for name, t in beaten if name == "early"] == [2.0, 4.0, 6.0]
    assert [t for name, t in beaten if name == "late"] == [3.0, 5.0, 7.0]
    assert {call[3] for call in queue.calls if call[0] == "early"} == {None}
    assert beats.beating == {}
    await ended(beats, time)
    assert len(queue.calls) == 6


async def test_a_lost_lease_stops_its_beats_and_is_logged_once_a_failed_beat_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: dict[str, list[object]] = {"lost": [False], "flaky": [RuntimeError("boom"), True]}
    beats, queue, time = stepped_beats(steps=6, answers=answers)
    with (
        caplog.at_level(logging.WARNING, logger="budgeter.worker"),
        beats.beat_for(job_named("lost"), {"rid": ""}),
        beats.beat_for(job_named("flaky"), {"rid": ""}),
    ):
        await asyncio.wait_for(time.stopped.wait(), 10)
        assert list(beats.beating) == [("flaky", 1)]
    beaten = [(call[0], call[1]) for call in queue.calls]
    assert [t for name, t in beaten if name == "lost"] == [2.0]  # not beaten again
    assert [t for name, t in beaten if name == "flaky"] == [2.0, 4.0, 6.0]  # kept beating
    records = [(r.levelno, r.getMessage(), getattr(r, "job", None)) for r in caplog.records]
    assert (logging.WARNING, "lease lost while the upstream call runs", "lost") in records
    failed = [r for r in caplog.records if r.getMessage() == "heartbeat failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert getattr(failed[0], "job", None) == "flaky" and failed[0].exc_info is not None
    await ended(beats, time)


async def test_a_lease_lost_for_a_job_whose_block_already_ended_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The block ends (the job is done) while its beat is in flight, and the beat then
    answers that the lease is lost: the loop goes on and ends normally."""
    beats, queue, time = stepped_beats(steps=4, answers={"done": [False]})
    queue.held.clear()
    with caplog.at_level(logging.WARNING, logger="budgeter.worker"):
        with beats.beat_for(job_named("done"), {"rid": ""}):
            await asyncio.wait_for(queue.called.wait(), 10)  # its beat is in flight
        task = beats._task
        assert task is not None
        queue.held.set()  # now it answers "lost"
        time.go.set()
        await asyncio.wait_for(task, 10)  # no KeyError: the loop ended by itself
    assert task.exception() is None and beats.beating == {}
    assert [r.getMessage() for r in caplog.records] == ["lease lost while the upstream call runs"]
