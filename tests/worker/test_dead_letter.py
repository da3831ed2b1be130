"""A job its workers abandoned ``max_attempts`` times is dead-lettered by the worker's
upkeep, exactly (issue 21: Worker._dead_letter_reclaimed had no test in mutmut's
selection): one errored result with the reason, its batch ended, the outcome and the
dead letter counted once."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.admission.decision import Decision, format_ms
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.queue.leased import LeasedJob
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.worker.worker import Worker, WorkerConfig, _params_problem, _refusal
from tests.helpers import requests_for
from tests.worker.test_worker import results_of, sample

FAR = 10**13  # a "now" after every lease expiry


def idle_worker(redis: Redis, session: aiohttp.ClientSession, **config: Any) -> Worker:
    """A worker that is not run: its methods are called by the test (no upstream)."""
    return Worker(
        redis=redis,
        upstream=UpstreamClient(session, "http://127.0.0.1:9", "unused"),
        config=WorkerConfig(**config),
        metrics=Metrics(),
    )


async def test_a_job_abandoned_max_attempts_times_is_dead_lettered_by_the_upkeep(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("ab", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("ab", requests_for("ab", 1))
    for attempt in (1, 2):  # leased and abandoned twice: requeued each time
        pick = await store.queue.pick(lease_ms=60_000)
        assert pick.job is not None and pick.job.attempt == attempt
        assert (await store.queue.reclaim("ab", max_attempts=3, now_ms=FAR))[0] == 1
    pick = await store.queue.pick(lease_ms=60_000)  # the third lease, abandoned too
    assert pick.job is not None and pick.job.attempt == 3
    async with aiohttp.ClientSession() as session:
        worker = idle_worker(redis, session, max_attempts=3)
        expired = pick.now_ms + 60_001  # past the lease, long before any retention ends
        await worker.maintain(now_ms=expired)
        await worker.maintain(now_ms=expired)  # a second upkeep finds nothing more to do
    (line,) = await results_of(store, batch_id)
    assert line["custom_id"] == "ab-0"
    assert line["result"] == {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "job abandoned by its worker 3 times (lease expired)",
            },
        },
    }
    status = await store.status(batch_id)
    assert (status.errored, status.processing, status.ended) == (1, 0, True)
    assert sample(worker.metrics, "budgeter_dead_lettered_total", tenant="ab") == 1
    assert sample(worker.metrics, "budgeter_jobs_total", tenant="ab", outcome="errored") == 1
    assert await redis.lrange("budgeter:{t:ab}:dead", 0, -1) == [pick.job.id]


NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("decision", "error"),
    [
        (
            Decision("REJECT", 0, "unknown_tenant", NOW),
            {"type": "not_found_error", "message": "tenant has no policy"},
        ),
        (
            Decision("REJECT", 0, "parent:org:model_not_allowed", NOW, "claude-x"),
            {
                "type": "permission_error",
                "message": "model 'claude-m' is not in the allowed_models"
                " of the parent tenant 'org'",
            },
        ),
        (
            Decision("REJECT", NOW + 86_400_000, "exhausted:model:day", NOW, "120/100"),
            {
                "type": "budget_exhausted_error",
                "message": "the day token budget of model claude-m exhausted (120 of 100 used);"
                " it resets at 2023-11-15T22:13:20Z",
            },
        ),
    ],
    ids=["unknown_tenant", "model_not_allowed", "exhausted"],
)
def test_a_refused_jobs_error_names_the_refusal(decision: Decision, error: object) -> None:
    assert _refusal(decision, "claude-m") == {"type": "error", "error": error}


def test_params_stored_without_max_tokens_are_a_problem_named_by_the_field() -> None:
    assert _params_problem({"model": "m", "messages": []}) == "max_tokens: Field required"
    fine = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert _params_problem(fine) is None


FAILED = {"type": "error", "error": {"type": "api_error", "message": "upstream 500"}}


async def leased_after(store: BatchStore, abandoned: int) -> LeasedJob:
    """The tenant's one job, leased again after ``abandoned`` leases that expired."""
    for _ in range(abandoned):
        assert (await store.queue.pick(lease_ms=60_000)).job is not None
        assert (await store.queue.reclaim("rd", max_attempts=9, now_ms=FAR))[0] == 1
    job = (await store.queue.pick(lease_ms=60_000)).job
    assert job is not None and job.attempt == abandoned + 1
    return job


@pytest.mark.parametrize(
    ("abandoned", "canceled", "outcome", "result", "queued"),
    [
        (2, False, "errored", {"type": "errored", "error": FAILED}, 0),  # its last attempt
        (0, True, "canceled", {"type": "canceled"}, 0),  # its batch canceled meanwhile
        (0, False, None, None, 1),  # attempts left: back in its queue, no result
    ],
    ids=["dead", "canceled", "retried"],
)
async def test_a_failed_attempt_is_dead_lettered_canceled_or_retried(
    redis: Redis,
    abandoned: int,
    canceled: bool,
    outcome: str | None,
    result: dict[str, object] | None,
    queued: int,
) -> None:
    await TenantStore(redis).put("rd", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("rd", requests_for("rd", 1))
    job = await leased_after(store, abandoned)
    if canceled:
        await store.cancel(batch_id, tenant="rd")
    async with aiohttp.ClientSession() as session:
        worker = idle_worker(redis, session, max_attempts=3)
        await worker._retry_or_dead(job, FAILED)
    lines = await results_of(store, batch_id)
    assert [line["result"] for line in lines] == ([result] if result else [])
    dead = await redis.lrange("budgeter:{t:rd}:dead", 0, -1)
    assert dead == ([job.id] if outcome == "errored" else [])
    assert sample(worker.metrics, "budgeter_dead_lettered_total", tenant="rd") == (
        1 if outcome == "errored" else 0
    )
    for kind in ("errored", "canceled"):
        counted = sample(worker.metrics, "budgeter_jobs_total", tenant="rd", outcome=kind)
        assert counted == (1 if kind == outcome else 0)
    assert await redis.llen("budgeter:{t:rd}:queue") == queued


@pytest.mark.parametrize("past", [True, False], ids=["after_deadline", "at_deadline"])
async def test_a_job_that_cannot_be_admitted_before_its_deadline_expires_then(
    redis: Redis, past: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Deferred past its deadline, a job ends expired at once, naming the deadline and the
    limit; deferred to the deadline itself, it waits (and expires there if still refused)."""
    await TenantStore(redis).put("dd", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("dd", requests_for("dd", 1), ttl_ms=60_000)
    job = (await store.queue.pick(lease_ms=60_000)).job
    assert job is not None and job.deadline_ms
    until = job.deadline_ms + (1 if past else 0)
    decision = Decision("DEFER", until, "rate:model:rpm", job.deadline_ms - 1000)
    async with aiohttp.ClientSession() as session:
        worker = idle_worker(redis, session)
        with caplog.at_level(logging.INFO, logger="budgeter.worker"):
            await worker._defer(job, decision, "claude-m")
    lines = await results_of(store, batch_id)
    expired = [r for r in caplog.records if r.getMessage().startswith("expired")]
    if not past:
        assert lines == [] and expired == []
        assert await redis.lrange("budgeter:{t:dd}:queue", 0, -1) == [job.id]  # back
        assert await redis.zscore("budgeter:{sched}:parked", "dd") == until  # parked until
        return
    deadline = format_ms(job.deadline_ms)
    assert [line["result"] for line in lines] == [
        {
            "type": "expired",
            "reason": f"cannot be admitted before its deadline {deadline}: the rpm rate"
            f" limit of model claude-m reached; fits again at {format_ms(until)}",
        }
    ]
    assert [r.getMessage() for r in expired] == ["expired: cannot be admitted before its deadline"]
    extra = expired[0].__dict__
    assert (extra["tenant"], extra["job"], extra["reason"]) == ("dd", job.id, "rate:model:rpm")


@pytest.mark.parametrize("ttl_ms", [None, 60_000, 2_000], ids=["no_ttl", "far", "near"])
async def test_a_job_waiting_for_settles_is_parked_until_the_fallback_or_its_deadline(
    redis: Redis, ttl_ms: int | None
) -> None:
    """A DEFER with no time (it waits for in-flight work to settle) parks the tenant for
    ``settle_wait_fallback_ms``, or until the job's deadline when that comes sooner."""
    await TenantStore(redis).put("sw", TenantPolicy())
    store = BatchStore(redis)
    await store.create("sw", requests_for("sw", 1), **({"ttl_ms": ttl_ms} if ttl_ms else {}))
    job = (await store.queue.pick(lease_ms=60_000)).job
    assert job is not None
    now = job.leased_at_ms
    async with aiohttp.ClientSession() as session:
        worker = idle_worker(redis, session, settle_wait_fallback_ms=5_000)
        await worker._defer(job, Decision("DEFER", 0, "concurrency", now), "claude-m")
    until = now + 5_000 if ttl_ms != 2_000 else job.deadline_ms
    assert await redis.zscore("budgeter:{sched}:parked", "sw") == until
    assert await redis.lrange("budgeter:{t:sw}:queue", 0, -1) == [job.id]


async def test_a_job_deferred_after_its_batch_was_canceled_ends_canceled(redis: Redis) -> None:
    await TenantStore(redis).put("dc", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("dc", requests_for("dc", 1))
    job = (await store.queue.pick(lease_ms=60_000)).job
    assert job is not None
    await store.cancel(batch_id, tenant="dc")
    async with aiohttp.ClientSession() as session:
        worker = idle_worker(redis, session)
        decision = Decision("DEFER", job.leased_at_ms + 1_000, "rate:rpm", job.leased_at_ms)
        await worker._defer(job, decision, "claude-m")
    assert [line["result"] for line in await results_of(store, batch_id)] == [{"type": "canceled"}]
    assert sample(worker.metrics, "budgeter_jobs_total", tenant="dc", outcome="canceled") == 1
    assert await redis.llen("budgeter:{t:dc}:queue") == 0
    assert (await store.status(batch_id)).ended
