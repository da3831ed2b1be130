"""Priorities within a tenant's fair share and per-batch deadlines (real Redis)."""

from __future__ import annotations

from collections import Counter

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from tests.api.test_app import client, expect_error, new_tenant, request_line
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import results_of, running_worker

__all__ = ["client"]  # the API fixture

NOW = 1_764_201_600_000
LEASE = 30_000


def jobs(n: int, prefix: str) -> list[NewJob]:
    return [
        NewJob(f"{prefix}{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)
    ]


async def _drain(queue: JobQueue, n: int, now_ms: int = NOW) -> list[str]:
    seen = []
    for _ in range(n):
        pick = await queue.pick(lease_ms=LEASE, now_ms=now_ms)
        assert pick.job is not None
        seen.append(pick.job.custom_id)
    return seen


async def test_high_jobs_go_first_and_low_last_within_a_tenant(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", jobs(3, "n"))
    await queue.submit("acme", "b2", jobs(2, "l"), priority="low")
    await queue.submit("acme", "b3", jobs(2, "h"), priority="high")
    assert await queue.queued("acme") == 7
    assert await _drain(queue, 7) == ["h0", "h1", "n0", "n1", "n2", "l0", "l1"]
    assert (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job is None


async def test_a_deferred_or_reclaimed_job_keeps_its_priority(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("acme", "b1", jobs(2, "n"))
    await queue.submit("acme", "b2", jobs(2, "h"), priority="high")
    first = (await queue.pick(lease_ms=LEASE, now_ms=NOW)).job
    assert first is not None and (first.custom_id, first.priority) == ("h0", "high")
    assert await queue.defer(first, NOW) == "requeued"  # back to the head of 'high'
    second = (await queue.pick(lease_ms=LEASE, now_ms=NOW + 1)).job
    assert second is not None and second.custom_id == "h0"
    # its lease expires: reclaimed into 'high' again, ahead of h1? no: h1 is next in line,
    # and a reclaimed job goes back to the head of its own priority's queue
    requeued, dead = await queue.reclaim("acme", max_attempts=5, now_ms=NOW + LEASE + 10)
    assert (requeued, dead) == (1, [])
    assert await _drain(queue, 4, NOW + LEASE + 20) == ["h0", "h1", "n0", "n1"]


async def test_priority_never_takes_another_tenants_share(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("urgent", TenantPolicy(default_priority="high"))
    await store.put("steady", TenantPolicy())
    queue = JobQueue(redis)
    await queue.submit("urgent", "u", jobs(50, "u"), priority="high")
    await queue.submit("steady", "s", jobs(50, "s"))
    served = Counter()
    for _ in range(40):
        pick = await queue.pick(lease_ms=LEASE, now_ms=NOW)
        assert pick.job is not None
        served[pick.job.tenant] += 1
    assert abs(served["urgent"] - served["steady"]) <= 2


async def test_a_job_that_cannot_be_admitted_before_its_deadline_expires_at_once(
    redis: Redis,
) -> None:
    # one request a minute: the second job would fit in 60 s, its deadline is in 20 s
    await TenantStore(redis).put("slow", TenantPolicy(rate={"rpm": 1}))
    store = BatchStore(redis)
    async with running_worker(redis) as _:
        batch_id = await store.create("slow", requests_for("slow", 3), ttl_ms=20_000)
        await wait_ended(store, [batch_id], timeout_s=15)  # long before the deadline
    lines = {line["custom_id"]: line["result"] for line in await results_of(store, batch_id)}
    assert [r["type"] for r in lines.values()].count("succeeded") == 1
    expired = [r for r in lines.values() if r["type"] == "expired"]
    assert len(expired) == 2
    assert all("cannot be admitted before its deadline" in r["reason"] for r in expired)
    assert all("rpm rate limit reached" in r["reason"] for r in expired)
    status = await store.status(batch_id)
    assert (status.succeeded, status.expired) == (1, 2)


async def test_the_api_takes_priority_and_deadline_headers(
    client: TestClient, redis: Redis
) -> None:
    key = await new_tenant(client, "hdr", {"default_priority": "low"})
    auth = {"x-api-key": key}
    body = {"requests": [request_line("a")]}
    resp = await client.post(
        "/v1/messages/batches",
        json=body,
        headers={**auth, "budgeter-priority": "high", "budgeter-deadline-seconds": "90"},
    )
    assert resp.status == 200, await resp.text()
    batch = await resp.json()
    keys = TenantKeys.of("budgeter", "hdr")
    stored = await redis.hgetall(keys.batch(batch["id"]))
    assert int(stored["expires_ms"]) - int(stored["created_ms"]) == 90_000
    assert await redis.lrange(keys.queue_high, 0, -1) == [f"{batch['id']}:a"]
    # without the header, the tenant's default_priority
    resp = await client.post("/v1/messages/batches", json=body, headers=auth)
    assert await redis.llen(keys.queue_low) == 1
    for headers, message in [
        ({"budgeter-priority": "urgent"}, "budgeter-priority"),
        ({"budgeter-deadline-seconds": "0"}, "budgeter-deadline-seconds"),
        ({"budgeter-deadline-seconds": "nan"}, "budgeter-deadline-seconds"),
        ({"budgeter-deadline-seconds": "9999999"}, "budgeter-deadline-seconds"),
    ]:
        text = await expect_error(
            await client.post("/v1/messages/batches", json=body, headers={**auth, **headers}),
            400,
            "invalid_request_error",
        )
        assert text.startswith(message)
