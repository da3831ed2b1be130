"""Real worker processes: SIGTERM drains, SIGKILL loses nothing (bounded, loopback only)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.mock import MockConfig
from tests.helpers import mock_upstream, requests_for, wait_ended


@asynccontextmanager
async def upstream(latency_ms: float) -> AsyncIterator[str]:
    async with mock_upstream(MockConfig(latency_ms=latency_ms)) as (url, _):
        yield url


def worker_starter(
    redis_url: str, upstream_url: str, **env: str
) -> Callable[[], asyncio.Future[asyncio.subprocess.Process]]:
    full_env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_UPSTREAM_URL": upstream_url,
        "BUDGETER_LOG_LEVEL": "WARNING",
        **env,
    }

    def start() -> asyncio.Future[asyncio.subprocess.Process]:
        return asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "budgeter",
                "worker",
                "--concurrency",
                "4",
                "--metrics-port",
                "0",
                env=full_env,
            )
        )

    return start


async def until(predicate: Callable[[], object], timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # type: ignore[misc]  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
            await asyncio.sleep(0.05)


async def test_sigterm_drains_without_losing_a_job_or_leaking_a_reservation(
    redis: Redis, redis_url: str
) -> None:
    await TenantStore(redis).put("d", TenantPolicy(budgets={"day": 10_000_000}))
    store = BatchStore(redis)
    async with upstream(latency_ms=300) as url:
        start = worker_starter(redis_url, url, BUDGETER_DRAIN_SECONDS="20")
        batch_id = await store.create("d", requests_for("d", 20))
        proc = await start()

        async def some_done() -> bool:
            return (await store.status(batch_id)).succeeded >= 1

        await until(some_done)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert await redis.hlen("budgeter:{t:d}:resv") == 0
        assert await redis.zcard("budgeter:{t:d}:leases") == 0
        status = await store.status(batch_id)
        states = await redis.hvals("budgeter:{t:d}:jstate")
        assert "leased" not in states  # (a job never leased has no state: it is queued)
        assert await redis.llen("budgeter:{t:d}:queue") == status.processing
        # another worker finishes the rest, each job exactly once
        proc = await start()
        await wait_ended(store, [batch_id])
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    status = await store.status(batch_id)
    assert (status.succeeded, status.processing) == (20, 0)


async def test_sigkilled_worker_loses_nothing_and_its_reservations_are_charged(
    redis: Redis, redis_url: str
) -> None:
    await TenantStore(redis).put("k", TenantPolicy(budgets={"day": 10_000_000}))
    store = BatchStore(redis)
    async with upstream(latency_ms=400) as url:
        start = worker_starter(
            redis_url,
            url,
            BUDGETER_LEASE_SECONDS="1",
            BUDGETER_RESERVATION_GRACE_SECONDS="0.5",
            BUDGETER_MAINTENANCE_SECONDS="0.3",
        )
        batch_id = await store.create("k", requests_for("k", 24))
        victim = await start()

        async def in_flight() -> bool:
            return await redis.hlen("budgeter:{t:k}:resv_sent") >= 2

        await until(in_flight)
        victim.kill()
        await victim.wait()
        survivor = await start()
        await wait_ended(store, [batch_id])
        await until(lambda: _empty(redis, "budgeter:{t:k}:resv"))
        survivor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(survivor.wait(), 60) == 0
    status = await store.status(batch_id)
    assert (status.succeeded, status.processing, status.total) == (24, 0, 24)
    lines = [line async for line in store.results(batch_id)]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"k-{i}" for i in range(24))
    budget = await redis.hgetall("budgeter:{t:k}:budget")
    reported = sum(
        line["result"]["message"]["usage"]["input_tokens"]
        + line["result"]["message"]["usage"]["output_tokens"]
        for line in lines
    )
    # the killed worker's requests may have been served: charged in full on top
    assert int(budget["day:used"]) > reported
    assert budget["day:reserved"] == "0"


async def _empty(redis: Redis, key: str) -> bool:
    return await redis.hlen(key) == 0
