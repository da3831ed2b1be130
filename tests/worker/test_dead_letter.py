"""A job its workers abandoned ``max_attempts`` times is dead-lettered by the worker's
upkeep, exactly (issue 21: Worker._dead_letter_reclaimed had no test in mutmut's
selection): one errored result with the reason, its batch ended, the outcome and the
dead letter counted once."""

from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import requests_for
from tests.worker.test_worker import results_of, sample

FAR = 10**13  # a "now" after every lease expiry


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
        worker = Worker(
            redis=redis,
            upstream=UpstreamClient(session, "http://127.0.0.1:9", "unused"),
            config=WorkerConfig(max_attempts=3),
            metrics=Metrics(),
        )
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
