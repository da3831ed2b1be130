"""The worker end to end: real Redis, the real mock upstream on loopback, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.token_counter import TokenCounter
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for, wait_ended


@asynccontextmanager
async def running_worker(
    redis: Redis, mock: MockConfig | None = None, **config: Any
) -> AsyncIterator[tuple[Worker, Any]]:
    async with mock_upstream(mock) as (url, _app), aiohttp.ClientSession() as session:
        metrics = Metrics()
        upstream = UpstreamClient(
            session,
            url,
            "test-key",
            backoff_base_s=0.001,
            backoff_max_s=0.01,
            observe=metrics.observe_upstream,
        )
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(
                **{"concurrency": 8, "maintenance_interval_s": 0.2, "drain_s": 2.0, **config}
            ),
            metrics=metrics,
            counter=TokenCounter(redis, upstream, ttl_s=60, metrics=metrics),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker, url
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)  # drains in 2 s (drain_s), then gives jobs back


async def results_of(store: BatchStore, batch_id: str) -> list[dict[str, Any]]:
    return [line async for line in store.results(batch_id)]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_batches_of_three_tenants_all_succeed_and_usage_matches_upstream(
    redis: Redis,
) -> None:
    tenants = TenantStore(redis)
    store = BatchStore(redis)
    for name in ("a", "b", "c"):
        await tenants.put(name, TenantPolicy(budgets={"day": 10_000_000}))
    async with running_worker(redis) as (worker, url):
        ids = [await store.create(name, requests_for(name, 40)) for name in ("a", "b", "c")]
        await wait_ended(store, ids)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
            stats = await resp.json()
    reported_total = 0
    for batch_id in ids:
        lines = await results_of(store, batch_id)
        assert len(lines) == 40
        assert {line["result"]["type"] for line in lines} == {"succeeded"}
        for line in lines:
            usage = line["result"]["message"]["usage"]
            reported_total += usage["input_tokens"] + usage["output_tokens"]
    used = 0
    for name in ("a", "b", "c"):
        budget = await redis.hgetall(f"budgeter:{{t:{name}}}:budget")
        used += int(budget["day:used"])
        assert budget["day:reserved"] == "0"
        assert await redis.hlen(f"budgeter:{{t:{name}}}:resv") == 0
    assert used == reported_total == stats["input_tokens"] + stats["output_tokens"]
    assert sample(worker.metrics, "budgeter_jobs_total", tenant="a", outcome="succeeded") == 40


async def test_budget_is_never_exceeded_and_refusals_name_the_budget(redis: Redis) -> None:
    await TenantStore(redis).put("small", TenantPolicy(budgets={"day": 1500}))
    store = BatchStore(redis)
    async with running_worker(redis) as _:
        batch_id = await store.create("small", requests_for("s", 30, max_tokens=100))
        await wait_ended(store, [batch_id])
    lines = await results_of(store, batch_id)
    kinds = [line["result"]["type"] for line in lines]
    assert "succeeded" in kinds and "errored" in kinds
    refused = [line["result"]["error"] for line in lines if line["result"]["type"] == "errored"]
    assert refused[0]["type"] == "error"
    assert refused[0]["error"]["type"] == "budget_exhausted_error"
    assert "day token budget exhausted" in refused[0]["error"]["message"]
    assert "resets at" in refused[0]["error"]["message"]
    budget = await redis.hgetall("budgeter:{t:small}:budget")
    assert int(budget["day:used"]) <= 1500  # the mock counts exactly: no counting error


async def test_rate_window_defers_and_every_job_still_succeeds(redis: Redis) -> None:
    # itpm 1000 and two prompts of 954 and 104 input tokens (the mock counts exactly, and
    # input is never refunded): whichever is admitted first, the other must wait ~3.5 s
    await TenantStore(redis).put("r", TenantPolicy(rate={"itpm": 1000}))
    store = BatchStore(redis)
    big, small = requests_for("r", 2, max_tokens=8)
    big.params.messages[0].content = "a" * 3800
    small.params.messages[0].content = "b" * 400
    async with running_worker(redis) as (worker, _):
        batch_id = await store.create("r", [big, small])
        await wait_ended(store, [batch_id], timeout_s=90)
    assert {line["result"]["type"] for line in await results_of(store, batch_id)} == {"succeeded"}
    deferred = sample(
        worker.metrics,
        "budgeter_admission_decisions_total",
        tenant="r",
        decision="DEFER",
        reason="rate:itpm",
    )
    assert deferred >= 1


async def test_final_upstream_4xx_is_an_errored_result_with_the_upstream_body(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("t", TenantPolicy())
    store = BatchStore(redis)
    bad = requests_for("t", 1)[0].model_copy(deep=True)
    bad.params.system = 5  # type: ignore[attr-defined]  # passed through; the upstream refuses it
    async with running_worker(redis) as _:
        batch_id = await store.create("t", [bad, *requests_for("ok", 1)])
        await wait_ended(store, [batch_id])
    lines = {line["custom_id"]: line["result"] for line in await results_of(store, batch_id)}
    assert lines["ok-0"]["type"] == "succeeded"
    error = lines["t-0"]
    assert error["type"] == "errored"
    assert error["error"]["type"] == "error"
    assert error["error"]["error"]["type"] == "invalid_request_error"
    assert await redis.hlen("budgeter:{t:t}:resv") == 0


async def test_transient_faults_are_retried_and_no_result_is_duplicated(redis: Redis) -> None:
    await TenantStore(redis).put("f", TenantPolicy(budgets={"day": 10_000_000}))
    store = BatchStore(redis)
    mock = MockConfig(fault_rate=0.3, retry_after_s=0.001, seed=7)
    async with running_worker(redis, mock, max_attempts=10) as _:
        batch_id = await store.create("f", requests_for("f", 40))
        await wait_ended(store, [batch_id])
    lines = await results_of(store, batch_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"f-{i}" for i in range(40))
    assert {line["result"]["type"] for line in lines} == {"succeeded"}
    status = await store.status(batch_id)
    assert (status.succeeded, status.processing) == (40, 0)
    budget = await redis.hgetall("budgeter:{t:f}:budget")
    assert budget["day:reserved"] == "0"


async def test_expired_jobs_end_as_expired(redis: Redis) -> None:
    await TenantStore(redis).put("e", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("e", requests_for("e", 3), ttl_ms=1)
    await asyncio.sleep(0.01)
    async with running_worker(redis) as _:
        await wait_ended(store, [batch_id])
    assert {line["result"]["type"] for line in await results_of(store, batch_id)} == {"expired"}


async def test_on_exhausted_wait_expires_jobs_whose_deadline_comes_before_the_reset(
    redis: Redis,
) -> None:
    from budgeter.admission.admission import Admission, Usage

    policy = TenantPolicy(budgets={"month": 200}, on_exhausted="wait")
    await TenantStore(redis).put("w", policy)
    admission = Admission(redis)
    assert (await admission.reserve("w", "pre", 100, 100)).kind == "ADMIT"
    await admission.settle("w", "pre", Usage(100, 100))
    store = BatchStore(redis)
    batch_id = await store.create("w", requests_for("w", 3), ttl_ms=60_000)
    async with running_worker(redis) as (worker, _):
        await wait_ended(store, [batch_id])
    assert {line["result"]["type"] for line in await results_of(store, batch_id)} == {"expired"}
    assert (
        sample(
            worker.metrics,
            "budgeter_admission_decisions_total",
            tenant="w",
            decision="DEFER",
            reason="exhausted:month",
        )
        >= 1
    )


async def test_batches_past_retention_are_deleted_by_maintenance(redis: Redis) -> None:
    await TenantStore(redis).put("old", TenantPolicy())
    store = BatchStore(redis)
    async with running_worker(redis) as (worker, _):
        batch_id = await store.create("old", requests_for("o", 2))
        await wait_ended(store, [batch_id])
        created = (await store.status(batch_id)).created_ms
        await worker.maintain(now_ms=created + worker.config.results_retention_ms - 1)
        assert (await store.status(batch_id)).succeeded == 2
        await worker.maintain(now_ms=created + worker.config.results_retention_ms + 1)
    assert await redis.zcard("budgeter:{t:old}:batches") == 0
    assert await redis.hlen("budgeter:{t:old}:results") == 0


async def test_one_heartbeat_loop_keeps_long_calls_leased(redis: Redis) -> None:
    """Upstream calls that outlast several leases keep their jobs: the worker's single
    heartbeat loop extends every lease in flight, so maintenance reclaims none of them and
    the upstream is called once per job."""
    await TenantStore(redis).put("slow", TenantPolicy(budgets={"day": 10_000_000}))
    store = BatchStore(redis)
    mock = MockConfig(latency_ms=4000)
    async with running_worker(redis, mock, lease_ms=1500) as (worker, url):
        batch_id = await store.create("slow", requests_for("slow", 4))
        await wait_ended(store, [batch_id], timeout_s=60)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
            stats = await resp.json()
    assert not worker._beating  # the worker stopped: no job left to beat for
    assert (await store.status(batch_id)).succeeded == 4
    assert stats["requests"]["messages"] == 4
    assert await redis.zcard("budgeter:{t:slow}:leases") == 0


async def test_a_job_leased_for_a_lane_that_was_cancelled_goes_back_uncounted(
    redis: Redis,
) -> None:
    """A lane cancelled (drain) while its lease was being taken: the job it would have
    got is given back at the head of its queue, and the lease does not count as an
    attempt (it never started)."""
    await TenantStore(redis).put("lane", TenantPolicy(budgets={"day": 10_000}))
    store = BatchStore(redis)
    await store.create("lane", requests_for("lane", 1))
    async with mock_upstream() as (url, _app), aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, url, "test-key")
        worker = Worker(redis=redis, upstream=upstream, config=WorkerConfig(), metrics=Metrics())
        gone = asyncio.get_running_loop().create_future()
        gone.cancel()
        await worker._pick_for([gone])
    pick = await store.queue.pick(lease_ms=60_000)
    assert pick.job is not None and pick.job.custom_id == "lane-0"
    assert pick.job.attempt == 1


async def test_a_parked_tenant_is_served_when_its_park_ends_not_at_the_idle_timeout(
    redis: Redis,
) -> None:
    """Lanes with nothing to do share one wait for work, but each waits no longer than
    its own pick said: with idle waits of 60 s, a job parked by the rate window for about
    3.5 s (as in the test above) is served when the window allows (30 s allowed here)."""
    await TenantStore(redis).put("park", TenantPolicy(rate={"itpm": 1000}))
    store = BatchStore(redis)
    big, small = requests_for("park", 2, max_tokens=8)
    big.params.messages[0].content = "a" * 3800
    small.params.messages[0].content = "b" * 400
    async with running_worker(redis, idle_max_s=60.0) as (worker, _):
        await asyncio.sleep(0.3)  # every lane idle, in a 60 s wait for work
        batch_id = await store.create("park", [big, small])
        await wait_ended(store, [batch_id], timeout_s=30)
    assert (await store.status(batch_id)).succeeded == 2
    assert sample(
        worker.metrics,
        "budgeter_admission_decisions_total",
        tenant="park",
        decision="DEFER",
        reason="rate:itpm",
    )
