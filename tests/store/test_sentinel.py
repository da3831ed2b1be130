"""``redis+sentinel://`` against a real Sentinel set on loopback (a master, a replica,
three Sentinels): the client finds the master, admission and the queue work through it,
and after the master is SIGKILLed and the replica promoted, the same client object
carries on (commands retried, Lua scripts loaded again on NOSCRIPT)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.settings import Settings
from budgeter.store.client import SentinelRedis, make_redis, redis_from_settings
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, start_budgeter, wait_http
from tests.store.sentinel_cluster import SentinelSet

NOW = 1_764_201_600_000
LEASE = 30_000
T = TypeVar("T")


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    servers = SentinelSet(tmp_path)
    servers.start()
    yield servers
    servers.stop()


def _jobs(n: int) -> list[NewJob]:
    return [NewJob(f"r{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)]


async def _connected_port(client: Redis) -> int:
    """The port of the server that answers ``client`` (its INFO server section)."""
    info = await client.info("server")
    return int(info["tcp_port"])


async def _eventually(call: Callable[[], Awaitable[T]], timeout_s: float = 90) -> T:
    """``call()`` once it succeeds: Redis unreachable meanwhile (the failover is under
    way and the client's own retries ran out) is tried again, bounded by ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError):
                await asyncio.sleep(0.2)


async def test_the_client_reaches_the_master_through_the_sentinels(
    sentinel_set: SentinelSet,
) -> None:
    settings = Settings(redis_url=sentinel_set.url)
    async with redis_from_settings(settings) as client:
        assert isinstance(client, SentinelRedis)
        assert await client.ping()
        assert sentinel_set.master is not None
        assert await _connected_port(client) == sentinel_set.master.port
        await client.set("k", "v")
        assert await client.get("k") == "v"

        await _store_policy(client)
        admission = Admission(client)
        decision = await admission.reserve("acme", "r1", 100, 50, now_ms=NOW)
        assert decision.kind == "ADMIT"
        settled = await admission.settle("acme", "r1", Usage(100, 20), now_ms=NOW)
        assert settled.settled == 1 and settled.actual_tokens == 120

        queue = JobQueue(client)
        assert await queue.submit("acme", "b1", _jobs(3)) == 3
        seen = []
        for _ in range(3):
            pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
            assert pick.job is not None
            seen.append(pick.job.custom_id)
        assert seen == ["r0", "r1", "r2"]


async def _store_policy(client: Redis) -> None:
    await TenantStore(client).put("acme", TenantPolicy(budgets={"day": 1_000_000}))


async def test_the_same_client_follows_a_failover(sentinel_set: SentinelSet) -> None:
    """SIGKILL the master: the Sentinels promote the replica, and the client made before
    keeps working: what was written before is there, scripts run (loaded again after the
    new master's script cache is flushed), the queue hands out the rest of its jobs."""
    client = make_redis(sentinel_set.url)
    assert isinstance(client, Redis)
    try:
        await _store_policy(client)
        admission = Admission(client)
        queue = JobQueue(client)
        assert (await admission.reserve("acme", "r1", 100, 50, now_ms=NOW)).kind == "ADMIT"
        await admission.settle("acme", "r1", Usage(100, 20), now_ms=NOW)
        await queue.submit("acme", "b1", _jobs(5))
        first = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert first.job is not None and first.job.custom_id == "r0"
        assert await client.wait(1, 10_000) == 1  # the replica has it all

        old_port = await asyncio.to_thread(sentinel_set.kill_master)
        # a command made while the failover is under way waits for it (retried)
        during = asyncio.ensure_future(_eventually(lambda: client.incr("budgeter:during")))
        new_port = await asyncio.to_thread(sentinel_set.wait_failover, old_port)
        assert await during >= 1
        assert sentinel_set.replica is not None and new_port == sentinel_set.replica.port
        # the new master may hold the scripts (replicated) or not: make sure it does not
        with sync_redis.Redis(port=new_port, socket_timeout=5) as direct:
            direct.script_flush()

        decision = await _eventually(lambda: admission.reserve("acme", "r2", 100, 50, now_ms=NOW))
        assert decision.kind == "ADMIT"
        assert await _connected_port(client) == new_port
        settled = await admission.settle("acme", "r2", Usage(100, 30), now_ms=NOW)
        assert settled.settled == 1 and settled.actual_tokens == 130
        rest = []
        for _ in range(4):
            pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
            assert pick.job is not None
            rest.append(pick.job.custom_id)
        assert rest == ["r1", "r2", "r3", "r4"]
        assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is None
    finally:
        await client.aclose()


async def test_a_worker_and_the_api_serve_a_batch_across_a_failover(
    sentinel_set: SentinelSet, tmp_path: Path
) -> None:
    """Real processes with ``BUDGETER_REDIS_URL=redis+sentinel://...``: the master is
    SIGKILLed mid-batch, and every request still ends, served by the promoted replica."""
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": sentinel_set.url,
        "BUDGETER_LEASE_SECONDS": "2",
        "BUDGETER_RESERVATION_GRACE_SECONDS": "1",
        "BUDGETER_MAINTENANCE_SECONDS": "0.5",
        "BUDGETER_MAX_ATTEMPTS": "20",
        "BUDGETER_LOG_LEVEL": "ERROR",
    }
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(*args: str) -> int:
        proc, port = await start_budgeter(*args, port_dir=tmp_path, env=env)
        procs.append(proc)
        return port

    client = make_redis(sentinel_set.url)
    try:
        mock_port = await spawn("mock-upstream", "--latency-ms", "100")
        env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_port}"
        api_port = await spawn("api")
        await spawn("worker", "--concurrency", "4")
        await wait_http(f"http://127.0.0.1:{api_port}/readyz", timeout_s=60)
        await TenantStore(client).put("fo", TenantPolicy(budgets={"day": 10_000_000}))
        store = BatchStore(client)
        batch_id = await store.create("fo", requests_for("fo", 80))
        async with asyncio.timeout(60):
            while (await store.status(batch_id)).succeeded < 10:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state other processes change
                await asyncio.sleep(0.02)

        assert (await store.status(batch_id)).succeeded < 80  # the kill is mid-batch
        old_port = await asyncio.to_thread(sentinel_set.kill_master)
        await asyncio.to_thread(sentinel_set.wait_failover, old_port)
        async with asyncio.timeout(120):
            while not (await _eventually(lambda: store.status(batch_id))).ended:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state other processes change
                await asyncio.sleep(0.1)
        await wait_http(f"http://127.0.0.1:{api_port}/readyz", timeout_s=60)
        status = await store.status(batch_id)
        assert (status.total, status.processing) == (80, 0)
        lines = [line async for line in store.results(batch_id)]
        assert sorted(line["custom_id"] for line in lines) == sorted(f"fo-{i}" for i in range(80))
        for proc in procs:
            assert proc.returncode is None, "a process died in the failover"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
        await client.aclose()
