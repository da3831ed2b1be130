"""``GET /admin/tenants/{t}/usage/minutes`` and the tenant's own ``GET /v1/usage/minutes``
(issue 18, item 5): the per-minute rollups from ``since`` (default the last hour) to now,
one row per minute, zeros included; a tenant reads only its own; bad ``since`` is a 400."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.api.app import create_app
from budgeter.settings import Settings
from tests.api.test_app import expect_error

ADMIN = {"authorization": "Bearer admin-secret"}
MODEL = "claude-x"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[Client]:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret",
        upstream_url="http://127.0.0.1:9",
        auth_failures_per_minute=1_000_000,
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


async def tenant_key(client: Client, tenant: str) -> str:
    assert (await client.put(f"/admin/tenants/{tenant}", json={}, headers=ADMIN)).status in (
        200,
        201,
    )
    created = await (await client.post(f"/admin/tenants/{tenant}/keys", headers=ADMIN)).json()
    return str(created["key"])


async def settle(redis: Redis, tenant: str, rid: str, usage: Usage, at: int) -> None:
    adm = Admission(redis)
    assert (await adm.reserve(tenant, rid, 10, 100, model=MODEL, now_ms=at)).kind == "ADMIT"
    await adm.settle(tenant, rid, usage, now_ms=at)


async def test_admin_and_own_minutes(client: Client, redis: Redis) -> None:
    key = await tenant_key(client, "acme")
    other = await tenant_key(client, "other")
    now = int(time.time() * 1000)
    await settle(redis, "acme", "r1", Usage(10, 20, 1, 2), now - 5 * 60_000)
    await settle(redis, "acme", "r2", Usage(3, 4), now - 3 * 3_600_000)  # outside the hour
    await settle(redis, "other", "r3", Usage(7, 7), now)

    body = await (await client.get("/admin/tenants/acme/usage/minutes", headers=ADMIN)).json()
    assert body["tenant"] == "acme" and len(body["minutes"]) == 61
    assert body["tokens"] == 33 and body["usd"] == 0
    row = next(m for m in body["minutes"] if m["input"])
    assert (row["input"], row["output"], row["cache_creation"], row["cache_read"]) == (10, 20, 1, 2)
    assert set(row) == {
        "minute", "start_ms", "input", "output", "cache_creation", "cache_read", "usd"
    }  # fmt: skip
    four = await client.get("/admin/tenants/acme/usage/minutes?since=4h", headers=ADMIN)
    assert (await four.json())["tokens"] == 40

    own = await (await client.get("/v1/usage/minutes", headers={"x-api-key": key})).json()
    assert own["tenant"] == "acme" and own["tokens"] == 33
    theirs = await (await client.get("/v1/usage/minutes", headers={"x-api-key": other})).json()
    assert theirs["tenant"] == "other" and theirs["tokens"] == 14

    far = await client.get("/v1/usage/minutes?since=30d", headers={"x-api-key": key})
    assert len((await far.json())["minutes"]) == 2880  # clamped to the 48 h kept


async def test_bad_since_unknown_tenant_and_no_credentials(client: Client) -> None:
    key = await tenant_key(client, "acme")
    for since in ("yesterday", "1w", "-1h", "%00", "9" * 40):
        resp = await client.get(
            "/v1/usage/minutes", params={"since": since}, headers={"x-api-key": key}
        )
        message = await expect_error(resp, 400, "invalid_request_error")
        assert message.startswith("since:"), message
    resp = await client.get("/admin/tenants/ghost/usage/minutes", headers=ADMIN)
    await expect_error(resp, 404, "not_found_error")
    await expect_error(await client.get("/v1/usage/minutes"), 401, "authentication_error")
    resp = await client.get("/admin/tenants/acme/usage/minutes", headers={"x-api-key": key})
    assert resp.status in (401, 403)
