"""Exact promises of the worker (issue 21): a call that timed out after it was sent is
charged in full (without the chaos run), a job is dead-lettered after exactly
``BUDGETER_MAX_ATTEMPTS`` attempts, the wait for in-flight work is capped by the job's
deadline, and a tenant parked by DEFER is not polled during its park."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore
from budgeter.upstream.mock import MockConfig, count_input_tokens
from budgeter.worker.main import worker_config
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import results_of, running_worker, sample


async def test_a_call_timed_out_after_it_was_sent_is_charged_in_full(redis: Redis) -> None:
    await TenantStore(redis).put("slow", TenantPolicy(budgets={"day": 100_000}))
    store = BatchStore(redis)
    (request,) = requests_for("slow", 1, max_tokens=64)
    counted = count_input_tokens(request.params.model_dump(exclude_none=True))
    async with running_worker(redis, MockConfig(latency_ms=1500), max_attempts=1) as (worker, _):
        # one HTTP attempt, and a timeout far below the mock's latency: sent, then no answer
        worker.upstream.timeout_s = 0.3
        worker.upstream.max_attempts = 1
        batch_id = await store.create("slow", [request])
        await wait_ended(store, [batch_id])
    (line,) = await results_of(store, batch_id)
    assert line["result"]["type"] == "errored"
    assert line["result"]["error"]["error"]["type"] == "timeout_error"
    budget = await redis.hgetall("budgeter:{t:slow}:budget")
    # it may have been generated and billed: the whole reservation, input + max_tokens
    assert (int(budget["day:used"]), budget["day:reserved"]) == (counted + 64, "0")
    assert await redis.hlen("budgeter:{t:slow}:resv") == 0


async def test_a_failing_job_is_dead_lettered_after_exactly_max_attempts(redis: Redis) -> None:
    config = worker_config(Settings(max_attempts=3), concurrency=2)
    assert config.max_attempts == 3  # BUDGETER_MAX_ATTEMPTS reaches the worker
    await TenantStore(redis).put("dl", TenantPolicy())
    store = BatchStore(redis)
    mock = MockConfig(fault_rate=1.0, fault_kinds=["500"], seed=3)
    async with running_worker(redis, mock, max_attempts=config.max_attempts) as (worker, url):
        worker.upstream.max_attempts = 1  # one HTTP request per attempt of the job
        batch_id = await store.create("dl", requests_for("dl", 1))
        await wait_ended(store, [batch_id])
        async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
            stats = await resp.json()
    (line,) = await results_of(store, batch_id)
    assert line["result"]["type"] == "errored"
    assert sample(worker.metrics, "budgeter_dead_lettered_total", tenant="dl") == 1
    assert stats["requests"]["messages"] == 3  # one per attempt: not one more, not one less
    assert await redis.hlen("budgeter:{t:dl}:resv") == 0


async def test_the_wait_for_in_flight_work_is_capped_by_the_jobs_deadline(redis: Redis) -> None:
    # max_concurrency 1 and a reservation held elsewhere: the job waits for a settle that
    # never comes; with a fallback of 10 minutes, only its deadline (1.5 s) ends the wait
    await TenantStore(redis).put("cap", TenantPolicy(max_concurrency=1))
    assert (await Admission(redis).reserve("cap", "held", 10, 10)).kind == "ADMIT"
    store = BatchStore(redis)
    async with running_worker(redis, settle_wait_fallback_ms=600_000) as (worker, _):
        batch_id = await store.create("cap", requests_for("cap", 1), ttl_ms=1500)
        await wait_ended(store, [batch_id], timeout_s=30)
    (line,) = await results_of(store, batch_id)
    assert line["result"]["type"] == "expired"
    assert sample(
        worker.metrics,
        "budgeter_admission_decisions_total",
        tenant="cap",
        decision="DEFER",
        reason="concurrency",
    ) in (1, 2)


async def test_a_tenant_parked_by_defer_is_asked_at_most_twice_over_its_park(
    redis: Redis,
) -> None:
    # as in test_worker: itpm 1000, prompts of 954 and 104 input tokens; the second waits
    # ~3.5 s for the window, parked: one DEFER, at most one more (a wake-up just early)
    await TenantStore(redis).put("pk", TenantPolicy(rate={"itpm": 1000}))
    store = BatchStore(redis)
    big, small = requests_for("pk", 2, max_tokens=8)
    big.params.messages[0].content = "a" * 3800
    small.params.messages[0].content = "b" * 400
    async with running_worker(redis) as (worker, _):
        batch_id = await store.create("pk", [big, small])
        await wait_ended(store, [batch_id], timeout_s=60)
    assert (await store.status(batch_id)).succeeded == 2
    deferred = sample(
        worker.metrics,
        "budgeter_admission_decisions_total",
        tenant="pk",
        decision="DEFER",
        reason="rate:itpm",
    )
    assert 1 <= deferred <= 2


async def test_calls_cut_off_by_the_workers_stop_are_charged_in_full(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The drain ends while the upstream works on two calls: the lanes are canceled
    mid-call, and each reservation (its count + max_tokens) is charged in full, never
    released: the upstream may finish and bill them. The drain says how many were in
    flight."""
    await TenantStore(redis).put("cut", TenantPolicy(budgets={"day": 100_000}))
    store = BatchStore(redis)
    mock = MockConfig(latency_ms=5_000)  # the calls outlive the drain
    with caplog.at_level(logging.INFO, logger="budgeter.worker"):
        async with running_worker(redis, mock, drain_s=0.05, concurrency=2) as (_, url):
            batch_id = await store.create("cut", requests_for("cut", 2))
            async with asyncio.timeout(30), aiohttp.ClientSession() as http:
                while True:  # until the upstream has both calls (a bounded poll)
                    async with http.get(f"{url}/mock/stats") as resp:
                        if (await resp.json())["requests"]["messages"] == 2:
                            break
                    await asyncio.sleep(0.01)
    one = requests_for("cut", 2)[0].params.model_dump(exclude_none=True)  # both count the same
    state = await redis.hgetall("budgeter:{t:cut}:budget")
    assert (int(state["day:used"]), state["day:reserved"]) == (
        2 * (count_input_tokens(one) + 64),
        "0",
    )
    assert await redis.hlen("budgeter:{t:cut}:resv") == 0
    assert (await store.status(batch_id)).succeeded == 0
    draining = [r for r in caplog.records if r.getMessage() == "draining"]
    assert [r.__dict__["inflight"] for r in draining] == [2]


async def test_a_served_job_is_reported_to_the_scheduler_and_counted_under_its_model(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker served since its last pick goes with its next pick (the tokens and
    jobs of each tenant: the scheduler's job size), and the tokens are counted under the
    job's model, with actual / reserved."""
    await TenantStore(redis).put("sv", TenantPolicy(budgets={"day": 100_000}))
    store = BatchStore(redis)
    reports: list[dict[str, tuple[int, int]]] = []
    pick_many = JobQueue.pick_many

    async def recorded(queue: JobQueue, *args: Any, **kw: Any) -> Any:
        if kw.get("served"):
            reports.append(dict(kw["served"]))
        return await pick_many(queue, *args, **kw)

    monkeypatch.setattr(JobQueue, "pick_many", recorded)
    batch_id = await store.create("sv", requests_for("sv", 2))  # both leased in one pick
    async with running_worker(redis, concurrency=2) as (worker, url):
        await wait_ended(store, [batch_id])
        async with asyncio.timeout(30):
            while sum(jobs for r in reports for _, jobs in r.values()) < 2:  # noqa: ASYNC110 - a bounded poll: the next pick carries the report
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
            stats = await resp.json()
    total = stats["input_tokens"] + stats["output_tokens"]
    # each pick carries what was served since the one before (here most often one report
    # of both jobs, leased together; two of one each when the lanes asked apart)
    assert sum(r["sv"][0] for r in reports) == total
    assert sum(r["sv"][1] for r in reports) == 2
    assert (
        sample(
            worker.metrics, "budgeter_tokens_total", tenant="sv", model="claude-test", kind="input"
        )
        == stats["input_tokens"]
    )
    assert worker.metrics.registry.get_sample_value("budgeter_estimate_error_ratio_count") == 2
    one = requests_for("sv", 2)[0].params.model_dump(exclude_none=True)  # both count the same
    ratios = worker.metrics.registry.get_sample_value("budgeter_estimate_error_ratio_sum")
    assert ratios == pytest.approx(total / (count_input_tokens(one) + 64))
