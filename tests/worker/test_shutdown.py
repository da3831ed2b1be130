"""Stopping a worker does not wait for its idle lanes' timeouts: every wait for work wakes
on stop (audited for issue 21: a lane said not to stop with ``idle_max_s=60``; no such bug
was found, and this test keeps it so)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for

# no lane may wait for these: a lane that did not wake on stop would keep run() for 600 s
LONG_S = 600.0


@pytest.mark.parametrize("moment", ["at-start", "all-idle", "tenant-parked"])
async def test_idle_lanes_stop_at_once_whatever_their_idle_timeout(
    redis: Redis, moment: str
) -> None:
    await TenantStore(redis).put("park", TenantPolicy(rate={"itpm": 1000}))
    store = BatchStore(redis)
    async with mock_upstream() as (url, _app), aiohttp.ClientSession() as session:
        config = WorkerConfig(concurrency=4, idle_max_s=LONG_S, drain_s=LONG_S)
        worker = Worker(
            redis=redis,
            upstream=UpstreamClient(session, url, "test-key"),
            config=config,
            metrics=Metrics(),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        if moment != "at-start":
            await asyncio.sleep(0.3)  # every lane in its (600 s) wait for work
        if moment == "tenant-parked":
            big, small = requests_for("park", 2, max_tokens=8)
            big.params.messages[0].content = "a" * 3800  # the rate window parks the other
            batch_id = await store.create("park", [big, small])
            async with asyncio.timeout(30):
                while (await store.status(batch_id)).succeeded < 1:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.05)
        stop.set()
        # bounded far below LONG_S, far above any real shutdown (milliseconds)
        await asyncio.wait_for(task, 20)
    assert worker._busy == 0
