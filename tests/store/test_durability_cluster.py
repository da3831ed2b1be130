"""``BUDGETER_REDIS_WAIT_REPLICAS`` on a real Redis Cluster (3 masters, one replica each,
its own servers): the WAIT goes on the node that holds the keys, on the connection that
wrote, in the round pipeline of each node and after a durable MULTI/EXEC. Durable writes
succeed and are on the replica when they answer; with the replica of the tenant's
master stopped (SIGSTOP: connected, silent), they fail like a Redis error with nothing
half-done, while the tenants of the other masters go on; a durable call that had to go
again on its own is not proven replicated and says so."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, LeasedJob
from budgeter.settings import load_settings
from budgeter.store.client import make_redis
from budgeter.store.durability import Durability, NotReplicated, configure, durability_of
from budgeter.store.embedded import EmbeddedRedis, EmbeddedRedisCluster
from budgeter.store.keys import TenantKeys
from budgeter.store.scripts import _on_node
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for

TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    servers = EmbeddedRedisCluster(tmp_path_factory.mktemp("wait-cluster"), replicas=1)
    servers.start()
    yield servers
    servers.stop()


def _tenant_of(cluster: EmbeddedRedisCluster, port: int, *, same: bool) -> str:
    """A tenant whose keys are (``same``) or are not on the master at ``port``."""
    for i in range(200):
        name = f"t{i}"
        on = cluster.master_of(TenantKeys.of("budgeter", name).queue).port == port
        if on == same:
            return name
    raise AssertionError("no such tenant")


@pytest.fixture
async def client(cluster: EmbeddedRedisCluster) -> AsyncIterator[Any]:
    redis: Any = make_redis(cluster.url)
    await redis.flushall()  # every master: no job of an earlier test left to lease
    configure(redis, 1, TIMEOUT_MS)
    try:
        yield redis
    finally:
        await redis.aclose()


async def _lease(queue: JobQueue) -> LeasedJob:
    for _ in range(50):
        pick = await queue.pick(lease_ms=30_000)
        if pick.job is not None:
            return pick.job
        await asyncio.sleep(0.01)
    raise AssertionError("nothing to lease")


def _replica_hget(replica: EmbeddedRedis, key: str, field: str) -> str | None:
    """``HGET`` on a cluster replica itself (READONLY: it answers instead of MOVED)."""
    import redis as sync_redis

    with sync_redis.Redis(port=replica.port, decode_responses=True) as direct:
        direct.execute_command("READONLY")
        value = direct.hget(key, field)
    return value if isinstance(value, str) or value is None else str(value)


def test_the_setting_is_taken_with_a_cluster() -> None:
    settings = load_settings(redis_url="redis+cluster://127.0.0.1:7000", redis_wait_replicas=1)
    assert (settings.cluster_mode, settings.redis_wait_replicas) == (True, 1)


async def test_every_durable_write_is_on_the_replica_when_it_answers(
    cluster: EmbeddedRedisCluster, client: Any
) -> None:
    assert durability_of(client) == Durability(1, TIMEOUT_MS)
    name = "acme"
    keys = TenantKeys.of("budgeter", name)
    await TenantStore(client).put(name, TenantPolicy(budgets={"day": 1_000_000}))
    store, admission = BatchStore(client), Admission(client)
    batch_id = await store.create(name, requests_for("d", 2))  # durable MULTI/EXEC
    job = await _lease(store.queue)
    decision = await admission.reserve(
        name, job.reservation_id, 10, 16, hold_ms=60_000, sent_at_once=True
    )
    assert decision.kind == "ADMIT"
    settled = await admission.settle(name, job.reservation_id, Usage(10, 5))
    assert settled.settled == 1
    assert await store.queue.ack(job, "succeeded", {"type": "succeeded"})
    # each WAIT 1 answered: the replica already holds all of it (no polling)
    master = cluster.master_of(keys.queue)
    (replica,) = cluster.replicas_of(master)
    assert _replica_hget(replica, keys.batch(batch_id), "succeeded") == "1"
    assert _replica_hget(replica, keys.results, job.id) is not None
    assert _replica_hget(replica, keys.budget, "day:used") == "15"


async def test_a_silent_replica_fails_its_masters_durable_writes_only(
    cluster: EmbeddedRedisCluster, client: Any
) -> None:
    probe = cluster.master_of(TenantKeys.of("budgeter", "t0").queue)
    assert probe.port is not None
    stuck, calm = (_tenant_of(cluster, probe.port, same=s) for s in (True, False))
    for name in (stuck, calm):
        await TenantStore(client).put(name, TenantPolicy(budgets={"day": 1_000_000}))
    store, admission = BatchStore(client), Admission(client)
    kept = await store.create(stuck, requests_for("k", 1))
    (replica,) = cluster.replicas_of(probe)
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        keys = TenantKeys.of("budgeter", stuck)
        with pytest.raises(NotReplicated, match="too few replicas: 0 of 1") as raised:
            await store.create(stuck, requests_for("lost", 3))
        assert isinstance(raised.value, RedisConnectionError)  # "fails like a Redis error"
        assert await client.zrange(keys.batches, 0, -1) == [kept]  # undone: nothing queued

        with pytest.raises(NotReplicated):  # the lease is durable: given back at once
            await _lease(store.queue)
        job_id = f"{kept}:k-0"
        assert await client.lindex(keys.queue, 0) == job_id
        assert await client.zscore(keys.leases, job_id) is None
        assert await client.hget(keys.attempts, job_id) in (None, "0")
        with pytest.raises(NotReplicated):
            await admission.reserve(stuck, f"{job_id}#1", 10, 16, hold_ms=60_000, sent_at_once=True)
        assert await client.hlen(keys.resv) == 0  # released: nothing held, nothing to reap
        assert await client.hget(keys.budget, "day:reserved") in (None, "0")

        # the other masters' tenants go on, durably, in the same rounds
        other = await store.create(calm, requests_for("c", 1))
        assert (await store.status(other)).processing == 1
    finally:
        replica.process.send_signal(signal.SIGCONT)


async def test_a_durable_call_sent_to_the_wrong_node_is_not_proven_replicated(
    cluster: EmbeddedRedisCluster, client: Any
) -> None:
    """Through a stale slot table: MOVED, the call goes again on its own (and succeeds)
    without a WAIT on its connection: it answers NotReplicated; a non-durable one its
    reply."""
    key = TenantKeys.of("budgeter", "moved").budget
    master = cluster.master_of(key)
    await client.delete(key)  # the client knows the topology from here on
    wrong = next(n for n in client.get_primaries() if n.port != master.port)
    wanted = Durability(1, TIMEOUT_MS)
    calls: list[tuple[str | int, ...]] = [("HINCRBY", key, "n", 1), ("HINCRBY", key, "n", 1)]
    replies, failure = await _on_node(client, wrong, calls, wanted, {0})
    assert failure is None  # the WAIT on ``wrong`` itself answered (nothing written there)
    assert isinstance(replies[0], NotReplicated)
    assert replies[1] == 2
    assert await client.hget(key, "n") == "2"  # both went, once each


async def test_after_noscript_a_durable_call_is_loaded_called_once_and_waited_for(
    cluster: EmbeddedRedisCluster, client: Any
) -> None:
    name = "flushed"
    await TenantStore(client).put(name, TenantPolicy(budgets={"day": 1_000_000}))
    store, admission = BatchStore(client), Admission(client)
    await store.create(name, requests_for("f", 1))
    job = await _lease(store.queue)
    for port in cluster.master_ports():
        direct = Redis(port=port)
        await direct.script_flush()
        await direct.aclose()
    decision = await admission.reserve(
        name, job.reservation_id, 10, 16, hold_ms=60_000, sent_at_once=True
    )
    assert decision.kind == "ADMIT"
    keys = TenantKeys.of("budgeter", name)
    assert await client.hlen(keys.resv) == 1  # reserved once, not twice
    assert await client.hget(keys.budget, "day:reserved") == "26"
