"""Issue 19 item 3: Redis failing never costs a served answer, and the count cache failing
never costs a job (real redis-server, the real mock upstream, a TCP relay between the
worker and Redis that the test cuts)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.admission.admission import Usage
from budgeter.domain.passthrough import Passthrough
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.token_counter import CountCacheIO, TokenCounter
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for, wait_ended
from tests.tcp_relay import TcpRelay


def quick_client(url: str) -> Redis:
    """A client that gives up on a dead connection at once (the tests' outages are the
    relay's, and the retries under test are the worker's own, not redis-py's)."""
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


worker_stop: dict[Worker, asyncio.Event] = {}  # the stop event of each running worker


@asynccontextmanager
async def worker_on(
    redis: Any, counter_redis: Any | None = None, **config: Any
) -> AsyncIterator[tuple[Worker, str]]:
    async with mock_upstream() as (url, _app), aiohttp.ClientSession() as session:
        metrics = Metrics()
        upstream = UpstreamClient(session, url, "test-key", backoff_base_s=0.001)
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(
                **{"concurrency": 1, "maintenance_interval_s": 0.2, "drain_s": 2.0, **config}
            ),
            metrics=metrics,
            counter=TokenCounter(counter_redis or redis, upstream, ttl_s=60, metrics=metrics),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        worker_stop[worker] = stop
        try:
            yield worker, url
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            worker_stop.pop(worker, None)


async def mock_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
        stats: dict[str, Any] = await resp.json()
    return stats


def cache_errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "budgeter_count_tokens_cache_total", {"result": "error"}
    )
    return value or 0.0


async def test_a_cache_that_fails_is_a_miss_logged_once(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with TcpRelay("127.0.0.1", redis_server.port) as relay:
        client = quick_client(relay.url)
        metrics = Metrics()
        cache = CountCacheIO(client, metrics)
        try:
            await cache.set("budgeter:{ct:x}", 7, 60)
            assert await cache.get("budgeter:{ct:x}") == "7"
            await relay.pause(drop=True)
            with caplog.at_level(logging.INFO, logger="budgeter.upstream.token_counter"):
                assert await cache.get("budgeter:{ct:x}") is None  # a miss, not an error
                assert await cache.get("budgeter:{ct:y}") is None
                await cache.set("budgeter:{ct:y}", 3, 60)  # not waited for, never raises
                await asyncio.sleep(0)  # lets the round pipeline send (no timing)
                await relay.resume()
                assert await cache.get("budgeter:{ct:x}") == "7"
        finally:
            await client.aclose()
    failed = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failed) == 1 and "count cache" in failed[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert cache_errors(metrics) >= 2


async def test_a_job_succeeds_when_its_count_cache_cannot_be_read_or_written(
    redis: Redis, redis_server: Any
) -> None:
    await TenantStore(redis).put("cc", TenantPolicy(budgets={"day": 1_000_000}))
    store = BatchStore(redis)
    async with TcpRelay("127.0.0.1", redis_server.port) as relay:
        cache_client = quick_client(relay.url)  # the count cache's Redis only
        await relay.pause(drop=True)
        try:
            async with worker_on(redis, cache_client) as (worker, url):
                batch_id = await store.create("cc", requests_for("cc", 3))
                await wait_ended(store, [batch_id])
                stats = await mock_stats(url)
        finally:
            await cache_client.aclose()
    status = await store.status(batch_id)
    assert (status.succeeded, status.errored) == (3, 0)
    assert stats["requests"]["count_tokens"] == 3  # counted by the upstream instead
    assert cache_errors(worker.metrics) >= 3


async def test_an_answer_held_while_redis_is_away_ends_succeeded_exactly_once(
    redis: Redis, redis_server: Any
) -> None:
    """Redis goes away between the upstream's answer and the settle, for several of the
    worker's retries: the worker keeps the answer, retries, and when Redis is back the
    job ends succeeded once, served once, charged once."""
    await TenantStore(redis).put("hk", TenantPolicy(budgets={"day": 1_000_000}))
    store = BatchStore(redis)
    batch_id = await store.create("hk", requests_for("hk", 1))
    async with TcpRelay("127.0.0.1", redis_server.port) as relay:
        client = quick_client(relay.url)
        try:
            async with worker_on(client) as (worker, url):
                answered = asyncio.Event()
                create = worker.upstream.create_message

                async def create_then_cut(params: dict[str, Any], p: Passthrough) -> Any:
                    message = await create(params, p)
                    await relay.pause(drop=True)  # Redis "dies" with the answer in hand
                    answered.set()
                    return message

                sleeps: list[float] = []

                async def sleep(seconds: float) -> None:
                    sleeps.append(seconds)
                    if len(sleeps) == 4:  # past the first steps of the backoff
                        await relay.resume()
                    await asyncio.sleep(0)

                worker.upstream.create_message = create_then_cut  # type: ignore[method-assign, assignment]
                worker.keeper.sleep = sleep
                await wait_ended(store, [batch_id])
                stats = await mock_stats(url)
        finally:
            await client.aclose()
    assert answered.is_set()
    assert len(sleeps) >= 4
    assert worker.keeper.retried >= 4
    status = await store.status(batch_id)
    assert (status.succeeded, status.errored, status.processing) == (1, 0, 0)
    lines = [line async for line in store.results(batch_id)]
    assert [line["result"]["type"] for line in lines] == ["succeeded"]
    assert stats["messages_served"] == 1 and stats["requests"]["messages"] == 1
    budget = await redis.hgetall("budgeter:{t:hk}:budget")
    assert int(budget["day:used"]) == stats["input_tokens"] + stats["output_tokens"]
    assert budget["day:reserved"] == "0"
    assert await redis.hlen("budgeter:{t:hk}:resv") == 0
    assert await redis.hget("budgeter:{t:hk}:attempts", f"{batch_id}:hk-0") in (None, "0", "1")


async def test_a_settle_and_ack_that_ran_but_lost_their_reply_charge_once(redis: Redis) -> None:
    """redis-py may run a call again after a connection error, and the keeper tries again
    a step whose reply was lost: settle.lua and ack.lua do nothing the second time."""
    await TenantStore(redis).put("lr", TenantPolicy(budgets={"day": 1_000_000}))
    store = BatchStore(redis)
    batch_id = await store.create("lr", requests_for("lr", 1))
    async with worker_on(redis) as (worker, url):
        settle, ack = worker.admission.settle, worker.queue.ack
        lost: list[str] = []

        async def settle_reply_lost(tenant: str, rid: str, usage: Usage, **kw: Any) -> Any:
            result = await settle(tenant, rid, usage, **kw)
            if "settle" not in lost:
                lost.append("settle")
                raise RedisConnectionError("reply lost")
            return result

        async def ack_reply_lost(*args: Any, **kw: Any) -> bool:
            done = await ack(*args, **kw)
            if "ack" not in lost:
                lost.append("ack")
                raise RedisConnectionError("reply lost")
            return done

        async def no_sleep(_seconds: float) -> None:
            await asyncio.sleep(0)

        worker.admission.settle = settle_reply_lost  # type: ignore[method-assign, assignment]
        worker.queue.ack = ack_reply_lost  # type: ignore[method-assign]
        worker.keeper.sleep = no_sleep
        await wait_ended(store, [batch_id])
        stats = await mock_stats(url)
    assert sorted(lost) == ["ack", "settle"]
    status = await store.status(batch_id)
    assert (status.succeeded, status.errored, status.processing) == (1, 0, 0)
    assert len([line async for line in store.results(batch_id)]) == 1
    budget = await redis.hgetall("budgeter:{t:lr}:budget")
    assert stats["messages_served"] == 1
    assert int(budget["day:used"]) == stats["input_tokens"] + stats["output_tokens"]
    assert budget["day:reserved"] == "0"
    outcomes = await redis.hgetall("budgeter:{t:lr}:outcomes")
    assert outcomes.get("succeeded") == "1"


async def test_a_worker_stopped_hard_while_holding_an_answer_tries_once_more_never_gives_it_back(
    redis: Redis, redis_server: Any
) -> None:
    """The drain times out while the keeper waits to try again: one last try (Redis is
    back by then) stores the answer, and the job is not put back in its queue."""
    await TenantStore(redis).put("hs", TenantPolicy(budgets={"day": 1_000_000}))
    store = BatchStore(redis)
    batch_id = await store.create("hs", requests_for("hs", 1))
    async with TcpRelay("127.0.0.1", redis_server.port) as relay:
        client = quick_client(relay.url)
        try:
            async with worker_on(client, drain_s=0.01) as (worker, url):
                create = worker.upstream.create_message
                waiting = asyncio.Event()

                async def create_then_cut(params: dict[str, Any], p: Passthrough) -> Any:
                    message = await create(params, p)
                    await relay.pause(drop=True)
                    return message

                async def sleep_until_stopped(_seconds: float) -> None:
                    await relay.resume()  # back, but the keeper waits: the drain cancels it
                    waiting.set()
                    await asyncio.Event().wait()

                worker.upstream.create_message = create_then_cut  # type: ignore[method-assign, assignment]
                worker.keeper.sleep = sleep_until_stopped
                async with asyncio.timeout(30):
                    await waiting.wait()
                    worker_stop[worker].set()  # its drain (10 ms) cancels the lane
                    while worker.keeper.holds_any():  # noqa: ASYNC110 - a bounded poll of state the worker changes
                        await asyncio.sleep(0.01)
                stats = await mock_stats(url)
        finally:
            await client.aclose()
    assert worker.keeper.last_tries == 1
    status = await store.status(batch_id)
    assert (status.succeeded, status.processing) == (1, 0)
    assert stats["messages_served"] == 1
    keys = "budgeter:{t:hs}"
    assert await redis.llen(f"{keys}:queue") == 0  # not given back
    assert await redis.hget(f"{keys}:attempts", f"{batch_id}:hs-0") in (None, "0", "1")
    budget = await redis.hgetall(f"{keys}:budget")
    assert int(budget["day:used"]) == stats["input_tokens"] + stats["output_tokens"]
