"""``job.dead_lettered`` and ``batch.ended`` end to end (issue 18, item 4): real workers (two
of them racing on one batch) against the mock upstream on loopback, a real Redis, and the
events delivered to a real receiver process that fails its first attempts. The outbox is
read exactly once every batch has ended (before delivery starts), then every event must
arrive, signed, with the id it was appended under."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.notify.delivery import Delivery, DeliveryConfig
from budgeter.notify.events import parse_fields
from budgeter.notify.signing import verify
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.mock import MockConfig
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for, wait_ended

SECRET = "whsec-queue-events"
NOTIFY = TenantPolicy.model_validate({"notify": {"thresholds": [1.0]}})


@contextlib.asynccontextmanager
async def workers(
    redis_url: str, mock: MockConfig, count: int, **config: Any
) -> AsyncIterator[list[Worker]]:
    """``count`` workers, each with its own Redis client, serving until the block ends."""
    async with mock_upstream(mock) as (url, _), aiohttp.ClientSession() as session:
        clients = [make_redis(redis_url) for _ in range(count)]
        stop = asyncio.Event()
        running: list[Worker] = []
        for client in clients:
            upstream = UpstreamClient(
                session, url, "test-key", backoff_base_s=0.001, backoff_max_s=0.01, max_attempts=1
            )
            options = {"concurrency": 4, "maintenance_interval_s": 0.2, "drain_s": 2.0, **config}
            worker = Worker(
                redis=client, upstream=upstream, config=WorkerConfig(**options), metrics=Metrics()
            )
            running.append(worker)
        tasks = [asyncio.create_task(w.run(stop)) for w in running]
        try:
            yield running
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            for client in clients:
                await client.aclose()


async def outbox(redis: Redis, tenant: str) -> list[tuple[str, str, dict[str, Any]]]:
    entries = await redis.xrange(f"budgeter:{{t:{tenant}}}:outbox")
    return [(entry_id, f["type"], json.loads(f["data"])) for entry_id, f in entries]


def read_log(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def deliver_all(
    redis: Redis, url: str, log: Path, expected: set[str]
) -> list[dict[str, Any]]:
    """Run a delivery until every expected event id got a 2xx (bounded); the records."""
    config = DeliveryConfig(url, SECRET, retry_base_s=0.05, retry_max_s=0.2, poll_s=0.05)

    def delivered() -> set[str]:
        return {r["event_id"] for r in read_log(log) if r["status"] == 200}

    async with aiohttp.ClientSession() as session:
        delivery = Delivery(redis, session, config, consumer="test")
        async with asyncio.timeout(60):
            while not expected <= delivered():
                await delivery.deliver_once()
                await asyncio.sleep(0.02)
    records = read_log(log)
    for record in records:
        verify(SECRET, record["signature"], record["body"].encode(), now=int(time.time()))
    assert delivered() == expected  # nothing else was ever appended
    return records


async def test_dead_lettered_jobs_and_their_batch_end_are_delivered(
    redis: Redis, redis_url: str, receiver: tuple[str, Path]
) -> None:
    url, log = receiver
    await TenantStore(redis).put("dl", NOTIFY)
    store = BatchStore(redis)
    mock = MockConfig(fault_rate=1.0, fault_kinds=["500"], seed=3)
    async with workers(redis_url, mock, 1, max_attempts=2):
        batch_id = await store.create("dl", requests_for("dl", 3))
        await wait_ended(store, [batch_id])
    got = await outbox(redis, "dl")
    kinds = [kind for _, kind, _ in got]
    assert sorted(kinds) == ["batch.ended", *["job.dead_lettered"] * 3]
    assert kinds[-1] == "batch.ended"  # appended by the last job's ack, after its own event
    dead = sorted((d["custom_id"], d["attempts"], d["error_type"]) for _, k, d in got[:-1])
    assert dead == [(f"dl-{i}", 2, "api_error") for i in range(3)]
    assert got[-1][2]["request_counts"]["errored"] == 3
    ids = {parse_fields("dl", entry_id, {"type": kind}).id for entry_id, kind, _ in got}
    records = await deliver_all(redis, url, log, ids)
    assert [r["status"] for r in records[:2]] == [500, 500]  # the receiver's first failures


async def test_two_racing_workers_end_a_batch_once_and_a_canceled_batch_once(
    redis: Redis, redis_url: str, receiver: tuple[str, Path]
) -> None:
    url, log = receiver
    await TenantStore(redis).put("race", NOTIFY)
    store = BatchStore(redis)
    async with workers(redis_url, MockConfig(latency_ms=5), 2):
        served = await store.create("race", requests_for("s", 60))
        stopped = await store.create("race", requests_for("c", 30))
        await store.cancel(stopped, tenant="race")
        await wait_ended(store, [served, stopped])
    got = await outbox(redis, "race")
    ended = {d["batch_id"]: d["request_counts"] for _, kind, d in got if kind == "batch.ended"}
    assert len(got) == len(ended) == 2
    assert ended[served] == {
        "processing": 0,
        "succeeded": 60,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    counts = ended[stopped]
    assert counts["processing"] == 0 and counts["succeeded"] + counts["canceled"] == 30
    ids = {parse_fields("race", entry_id, {"type": kind}).id for entry_id, kind, _ in got}
    records = await deliver_all(redis, url, log, ids)
    bodies = {json.loads(r["body"])["data"]["batch_id"] for r in records if r["status"] == 200}
    assert bodies == {served, stopped}
