"""Regression tests for problems found in review."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.api.proxy import StreamUsage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue
from budgeter.serving import serve_app
from budgeter.settings import Settings, load_settings
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient, UpstreamError
from tests.helpers import requests_for


async def test_empty_admin_token_disables_the_admin_api(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGETER_ADMIN_TOKEN", "")
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    settings = load_settings()
    assert settings.admin_token is None
    async with TestClient(TestServer(create_app(settings, redis=redis))) as client:
        resp = await client.put("/admin/tenants/acme", json={})
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "permission_error"


async def test_deeply_nested_json_is_a_400_not_a_500(redis: Redis, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, admin_token="t")  # type: ignore[arg-type]
    async with TestClient(TestServer(create_app(settings, redis=redis))) as client:
        await client.put("/admin/tenants/n", json={}, headers={"authorization": "Bearer t"})
        key = (
            await (
                await client.post("/admin/tenants/n/keys", headers={"authorization": "Bearer t"})
            ).json()
        )["key"]
        for path in ("/v1/messages/batches", "/v1/messages"):
            resp = await client.post(path, data="[" * 100_000, headers={"x-api-key": key})
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


def test_a_stream_left_before_its_first_event_is_charged_its_input() -> None:
    assert StreamUsage(120).usage().input_tokens == 120
    seen = StreamUsage(120)
    seen.feed({"type": "message_start", "message": {"usage": {"input_tokens": 118}}})
    assert seen.usage().input_tokens == 118


async def test_a_messages_call_that_timed_out_after_sending_is_not_sent_again() -> None:
    calls = 0

    async def slow(_request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/messages", slow)
    async with serve_app(app, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        client = UpstreamClient(session, f"http://127.0.0.1:{port}", "k", timeout_s=0.2)
        with pytest.raises(UpstreamError) as info:
            await client.create_message({"model": "m", "max_tokens": 1, "messages": []})
    assert info.value.maybe_served and info.value.status == 0
    assert calls == 1


async def test_an_invalid_tenant_name_in_the_ready_set_is_dropped(redis: Redis) -> None:
    await TenantStore(redis).put("good", TenantPolicy())
    queue = JobQueue(redis)
    from budgeter.queue.batches import BatchStore

    await BatchStore(redis).create("good", requests_for("g", 1))
    await redis.zadd(queue.sched.ready, {"Not A Tenant!": -1})
    pick = await queue.pick(lease_ms=1000)
    assert pick.job is not None and pick.job.tenant == "good"
    assert await redis.zscore(queue.sched.ready, "Not A Tenant!") is None


async def test_a_deleted_tenants_leased_jobs_still_end(redis: Redis) -> None:
    from budgeter.metrics import Metrics
    from budgeter.queue.batches import BatchStore
    from budgeter.worker.worker import Worker, WorkerConfig

    store = BatchStore(redis)
    tenants = TenantStore(redis)
    await tenants.put("gone", TenantPolicy())
    batch_id = await store.create("gone", requests_for("x", 1))
    leased = await store.queue.pick(lease_ms=1)  # its worker dies right away
    assert leased.job is not None
    await tenants.delete("gone")
    async with aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, "http://127.0.0.1:9", "k", max_attempts=1)
        worker = Worker(redis=redis, upstream=upstream, config=WorkerConfig(), metrics=Metrics())
        await asyncio.sleep(0.01)
        await worker.maintain()  # reclaims the expired lease although the tenant is gone
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        async with asyncio.timeout(30):
            while not (await store.status(batch_id)).ended:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                await asyncio.sleep(0.05)
        stop.set()
        await task
    lines = [line async for line in store.results(batch_id)]
    assert lines[0]["result"]["type"] == "errored"
    assert lines[0]["result"]["error"]["error"]["type"] == "not_found_error"


async def test_two_deleters_of_one_batch_race_without_an_error(redis: Redis) -> None:
    """Two workers purge the same old batch (or the client deletes it while a worker
    purges it): the loser sees 'not found', never a raw script error in its log."""
    from budgeter.queue.batches import BatchNotFoundError, BatchStore

    await TenantStore(redis).put("race", TenantPolicy())
    store = BatchStore(redis)
    batch_id = await store.create("race", [])
    results = await asyncio.gather(
        *(store.delete(batch_id, tenant="race") for _ in range(5)), return_exceptions=True
    )
    assert results.count(None) == 1
    assert all(isinstance(r, BatchNotFoundError) for r in results if r is not None)
    purged = await asyncio.gather(*(store.purge_older_than("race", 2**62) for _ in range(3)))
    assert purged == [0, 0, 0]
