"""Workers and the API survive a Redis restart: /readyz says so meanwhile, and with AOF
no job is lost (real processes, loopback only, bounded in time)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, start_budgeter


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url) as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


async def test_workers_and_api_survive_a_redis_restart_without_losing_a_job(
    tmp_path: Path,
) -> None:
    data = tmp_path / "redis"
    server = EmbeddedRedis(data, extra_args=["--appendfsync", "always"])  # keeps its port
    server.start()
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": server.url,
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

    redis = make_redis(server.url)
    try:
        mock_port = await spawn("mock-upstream", "--latency-ms", "50")
        env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_port}"
        api_port = await spawn("api")
        await spawn("worker", "--concurrency", "4")
        async with aiohttp.ClientSession() as http:
            ready = f"http://127.0.0.1:{api_port}/readyz"
            async with asyncio.timeout(30):
                while await _status(http, ready) != 200:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.05)
            await TenantStore(redis).put("rr", TenantPolicy(budgets={"day": 10_000_000}))
            store = BatchStore(redis)
            batch_id = await store.create("rr", requests_for("rr", 150))
            async with asyncio.timeout(60):
                while (await store.status(batch_id)).succeeded < 20:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.02)

            await asyncio.to_thread(server.stop)
            async with asyncio.timeout(30):
                while await _status(http, ready) != 503:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.05)
            assert await _status(http, f"http://127.0.0.1:{api_port}/healthz") == 200
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)  # same port, same AOF

            async with asyncio.timeout(30):
                while await _status(http, ready) != 200:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(120):
                while not (await store.status(batch_id)).ended:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.1)
            status = await store.status(batch_id)
            assert status.total == 150
            assert (status.succeeded, status.processing) == (150, 0)
            lines = [line async for line in store.results(batch_id)]
            assert sorted(line["custom_id"] for line in lines) == sorted(
                f"rr-{i}" for i in range(150)
            )
            for proc in procs:
                assert proc.returncode is None, "a process died with Redis"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
        await redis.aclose()
        server.stop()
