"""``BUDGETER_REDIS_WAIT_REPLICAS`` against a real master with two replicas (and a real
Sentinel set): durable writes succeed while the replicas acknowledge; with one replica
stopped (SIGSTOP: connected, silent), WAIT_REPLICAS=2 fails them like a Redis error,
with nothing half-done (no reservation held, no batch left, the upstream never called),
and WAIT_REPLICAS=1 keeps serving."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.admission.admission import Admission, Usage
from budgeter.api.app import create_app
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.settings import Settings, SettingsError, load_settings
from budgeter.store.client import make_redis, redis_from_settings
from budgeter.store.durability import Durability, NotReplicated, configure, durability_of
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import mock_upstream, requests_for
from tests.store.replicated import Replicated
from tests.store.sentinel_cluster import SentinelSet

TIMEOUT_MS = 300  # how long a WAIT may take here (loopback replicas answer in < 1 ms)
KEYS = TenantKeys.of("budgeter", "acme")
ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    servers = Replicated(tmp_path_factory.mktemp("replicated"), replicas=2)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
async def fresh(replicated: Replicated) -> AsyncIterator[Replicated]:
    """The servers, flushed, every replica running and in sync; resumed after the test."""
    plain = make_redis(replicated.url)
    await plain.flushall()
    await plain.aclose()
    replicated.wait_in_sync()
    yield replicated
    for index in range(replicated.count):
        replicated.resume(index)


async def _client(url: str, replicas: int) -> Redis:
    client = make_redis(url)
    assert isinstance(client, Redis)
    configure(client, replicas, TIMEOUT_MS)
    await TenantStore(client).put("acme", TenantPolicy(budgets={"day": 1_000_000}))
    return client


async def _lease(queue: JobQueue) -> LeasedJob:
    pick = await queue.pick(lease_ms=30_000)
    assert pick.job is not None
    return pick.job


async def _given_back(client: Redis, batch_id: str) -> None:
    """The batch's one job is queued again at the head, not leased, no attempt used up,
    its tenant ready: a lease the replicas did not acknowledge is given back."""
    job_id = f"{batch_id}:k-0"
    assert await client.lindex(KEYS.queue, 0) == job_id
    assert await client.zscore(KEYS.leases, job_id) is None
    assert await client.hget(KEYS.attempts, job_id) in (None, "0")
    assert await client.zscore(SchedKeys("budgeter").ready, "acme") is not None


def test_the_setting_reaches_the_client() -> None:
    assert Settings().redis_wait_replicas == 0
    with pytest.raises(SettingsError, match="BUDGETER_REDIS_WAIT_REPLICAS"):
        load_settings(redis_wait_replicas=-1)


async def test_redis_from_settings_configures_the_wait(fresh: Replicated) -> None:
    settings = Settings(redis_url=fresh.url, redis_wait_replicas=2, redis_wait_timeout_ms=250)
    async with redis_from_settings(settings) as client:
        assert durability_of(client) == Durability(2, 250)
    async with redis_from_settings(Settings(redis_url=fresh.url)) as client:
        assert durability_of(client) is None


async def test_with_two_replicas_every_durable_write_is_on_both(fresh: Replicated) -> None:
    client = await _client(fresh.url, 2)
    try:
        store, admission = BatchStore(client), Admission(client)
        batch_id = await store.create("acme", requests_for("d", 2))
        job = await _lease(store.queue)
        decision = await admission.reserve(
            "acme", job.reservation_id, 10, 16, hold_ms=60_000, sent_at_once=True
        )
        assert decision.kind == "ADMIT"
        settled = await admission.settle("acme", job.reservation_id, Usage(10, 5))
        assert settled.settled == 1
        assert await store.queue.ack(job, "succeeded", {"type": "succeeded"})
        # WAIT 2 answered: each replica already holds all of it (no polling needed)
        for index in range(2):
            with fresh.replica_client(index) as replica:
                assert replica.hget(KEYS.batch(batch_id), "succeeded") == "1"
                assert replica.hget(KEYS.results, job.id) is not None
                assert replica.hget(KEYS.budget, "day:used") == "15"
    finally:
        await client.aclose()


async def test_a_silent_replica_fails_durable_writes_and_leaves_nothing_half_done(
    fresh: Replicated,
) -> None:
    strict, lenient = await _client(fresh.url, 2), await _client(fresh.url, 1)
    try:
        kept = await BatchStore(strict).create("acme", requests_for("k", 1))  # both running
        fresh.pause(1)
        store, admission = BatchStore(strict), Admission(strict)

        with pytest.raises(NotReplicated, match="too few replicas: 1 of 2 acknowledged") as raised:
            await store.create("acme", requests_for("lost", 3))
        assert isinstance(raised.value, RedisConnectionError)  # "fails like a Redis error"
        ids = await strict.zrange(KEYS.batches, 0, -1)
        assert ids == [kept]  # the new batch was undone on the master: nothing queued

        with pytest.raises(NotReplicated):  # the lease is durable: given back at once
            await store.queue.pick(lease_ms=30_000)
        await _given_back(strict, kept)
        job = await _lease(JobQueue(lenient))  # leased with one replica's acknowledgement
        with pytest.raises(NotReplicated):
            await admission.reserve(
                "acme", job.reservation_id, 10, 16, hold_ms=60_000, sent_at_once=True
            )
        assert await strict.hlen(KEYS.resv) == 0  # released: nothing held, nothing to reap
        assert await strict.hget(KEYS.budget, "day:reserved") in (None, "0")
        with pytest.raises(NotReplicated):
            await store.queue.ack(job, "succeeded", {"type": "succeeded"})

        # one replica is enough for WAIT_REPLICAS=1
        batch_id = await BatchStore(lenient).create("acme", requests_for("one", 1))
        assert batch_id in await lenient.zrange(KEYS.batches, 0, -1)
        decision = await Admission(lenient).reserve("acme", "r-one", 10, 16, hold_ms=60_000)
        assert decision.kind == "ADMIT"
        assert (await Admission(lenient).settle("acme", "r-one", Usage(10, 1))).settled == 1

        fresh.resume(1)
        fresh.wait_in_sync()
        decision = await admission.reserve("acme", "r-back", 10, 16, hold_ms=60_000)
        assert decision.kind == "ADMIT"
    finally:
        await strict.aclose()
        await lenient.aclose()


async def test_a_script_loaded_again_after_noscript_waits_too(fresh: Replicated) -> None:
    """After a SCRIPT FLUSH (a restart, a promoted replica), a durable call is loaded,
    made and WAITed for in its own pipeline: still refused when a replica is silent."""
    client = await _client(fresh.url, 2)
    try:
        admission = Admission(client)
        await client.script_flush()
        assert (await admission.reserve("acme", "r1", 10, 16, hold_ms=60_000)).kind == "ADMIT"
        fresh.pause(0)
        await client.script_flush()
        with pytest.raises(NotReplicated):
            await admission.reserve("acme", "r2", 10, 16, hold_ms=60_000)
        assert await client.hkeys(KEYS.resv) == ["r1"]  # r2 released
    finally:
        await client.aclose()


async def test_the_api_answers_503_and_the_worker_never_calls_upstream(
    fresh: Replicated,
) -> None:
    client = await _client(fresh.url, 2)
    try:
        async with mock_upstream() as (url, _), aiohttp.ClientSession() as session:
            settings = Settings(redis_url=fresh.url, admin_token="admin-secret", upstream_url=url)
            async with TestClient(TestServer(create_app(settings, redis=client))) as api:
                resp = await api.post("/admin/tenants/acme/keys", headers=ADMIN)
                assert resp.status == 201
                auth = {"x-api-key": (await resp.json())["key"], "anthropic-version": "2023-06-01"}
                body = {"requests": [r.model_dump() for r in requests_for("api", 1)]}
                resp = await api.post("/v1/messages/batches", json=body, headers=auth)
                assert resp.status == 200, await resp.text()
                fresh.pause(0)
                resp = await api.post("/v1/messages/batches", json=body, headers=auth)
                message = body["requests"][0]["params"]
                proxied = await api.post("/v1/messages", json=message, headers=auth)
                for answer in (resp, proxied):
                    assert answer.status == 503, await answer.text()
                    assert int(answer.headers["retry-after"]) > 0
                    assert (await answer.json())["error"]["type"] == "overloaded_error"
                assert await client.zcard(KEYS.batches) == 1
                assert await client.hlen(KEYS.resv) == 0

                worker = Worker(
                    redis=client,
                    upstream=UpstreamClient(session, url, "test-key"),
                    config=WorkerConfig(max_attempts=5),
                    metrics=Metrics(),
                    clock=lambda: time.time() - 60,  # its 1 s deferral is due at once
                )
                with pytest.raises(NotReplicated):  # the lease not acknowledged: given back
                    await worker.queue.pick(lease_ms=30_000)
                assert await client.zcard(KEYS.leases) == 0
                # leased with one replica's acknowledgement, then the reserve is refused
                lenient = await _client(fresh.url, 1)
                try:
                    job = await _lease(JobQueue(lenient))
                finally:
                    await lenient.aclose()
                await worker._process(job)  # reserve not acknowledged: the job goes back
                stats = await (await session.get(f"{url}/mock/stats")).json()
                assert stats["requests"]["messages"] == 0
                assert await client.hlen(KEYS.resv) == 0
                # deferred: at the head of its queue, no attempt used up, counted as such
                assert await client.lindex(KEYS.queue, 0) == job.id
                assert await client.hget(KEYS.attempts, job.id) in (None, "0")
                labels = {"tenant": "acme", "decision": "DEFER", "reason": "not_replicated"}
                deferred = worker.metrics.registry.get_sample_value(
                    "budgeter_admission_decisions_total", labels
                )
                assert deferred == 1

                fresh.resume(0)
                fresh.wait_in_sync()
                again = await _lease(worker.queue)
                assert again.id == job.id
                await worker._process(again)
                stats = await (await session.get(f"{url}/mock/stats")).json()
                assert stats["requests"]["messages"] == 1
                assert await client.hget(KEYS.jstate, job.id) == "succeeded"
    finally:
        await client.aclose()


async def test_through_sentinel_the_wait_goes_to_the_master(tmp_path: Path) -> None:
    servers = SentinelSet(tmp_path)
    servers.start()
    try:
        settings = Settings(redis_url=servers.url, redis_wait_replicas=1)
        async with redis_from_settings(settings) as client:
            await TenantStore(client).put("acme", TenantPolicy(budgets={"day": 1000}))
            await BatchStore(client).create("acme", requests_for("s", 1))
            assert (await Admission(client).reserve("acme", "r1", 10, 16)).kind == "ADMIT"
            assert servers.replica is not None and servers.replica.process is not None
            servers.replica.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(NotReplicated):
                    await Admission(client).settle("acme", "r1", Usage(10, 1))
            finally:
                servers.replica.process.send_signal(signal.SIGCONT)
    finally:
        servers.stop()
