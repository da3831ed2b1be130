"""The HTTP API in-process (aiohttp test client) against a real Redis server."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.domain.job_params import parse_params
from budgeter.settings import Settings

ADMIN = {"authorization": "Bearer admin-secret"}


def request_line(custom_id: str, **params: Any) -> dict[str, Any]:
    body = {
        "model": "claude-test",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return {"custom_id": custom_id, "params": {**body, **params}}


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret",
        api_max_body_mb=1,  # type: ignore[arg-type]
        upstream_url="http://127.0.0.1:9",
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


async def new_tenant(client: TestClient, tenant: str, policy: dict[str, Any] | None = None) -> str:
    resp = await client.put(f"/admin/tenants/{tenant}", json=policy or {}, headers=ADMIN)
    assert resp.status in (200, 201)
    resp = await client.post(f"/admin/tenants/{tenant}/keys", headers=ADMIN)
    assert resp.status == 201
    return str((await resp.json())["key"])


async def expect_error(resp: Any, status: int, error_type: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.headers["request-id"].startswith("req_")
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    return str(body["error"]["message"])


async def test_create_retrieve_list_cancel_delete(client: TestClient, redis: Redis) -> None:
    key = await new_tenant(client, "acme")
    auth = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    resp = await client.post(
        "/v1/messages/batches",
        json={
            "requests": [request_line("a", cache_control={"type": "ephemeral"}), request_line("b")]
        },
        headers=auth,
    )
    assert resp.status == 200 and resp.headers["request-id"].startswith("req_")
    batch = await resp.json()
    assert batch["type"] == "message_batch" and batch["processing_status"] == "in_progress"
    assert batch["request_counts"] == {
        "processing": 2,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch["results_url"] is None and batch["archived_at"] is None
    assert batch["created_at"].endswith("Z") and batch["expires_at"] > batch["created_at"]
    # unknown params fields pass through unchanged
    stored = parse_params(await redis.hget("budgeter:{t:acme}:jobs", f"{batch['id']}:a"))
    assert stored.params["cache_control"] == {"type": "ephemeral"}  # the jobs hash: params
    assert stored.validated  # tagged: the worker does not validate them again

    bearer = {"authorization": f"Bearer {key}", "anthropic-version": "2025-01-01"}
    got = await (await client.get(f"/v1/messages/batches/{batch['id']}", headers=bearer)).json()
    assert got["id"] == batch["id"]
    listed = await (await client.get("/v1/messages/batches", headers=auth)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]]
    assert listed["first_id"] == listed["last_id"] == batch["id"] and not listed["has_more"]

    msg = await expect_error(
        await client.delete(f"/v1/messages/batches/{batch['id']}", headers=auth),
        400,
        "invalid_request_error",
    )
    assert "still processing" in msg
    await expect_error(
        await client.get(f"/v1/messages/batches/{batch['id']}/results", headers=auth),
        400,
        "invalid_request_error",
    )
    canceled = await (
        await client.post(f"/v1/messages/batches/{batch['id']}/cancel", headers=auth)
    ).json()
    assert canceled["processing_status"] == "ended"
    assert canceled["request_counts"]["canceled"] == 2 and canceled["cancel_initiated_at"]
    assert (
        canceled["results_url"]
        == f"http://127.0.0.1:{client.port}/v1/messages/batches/{batch['id']}/results"
    )
    results = await client.get(f"/v1/messages/batches/{batch['id']}/results", headers=auth)
    lines = [json.loads(line) for line in (await results.text()).splitlines()]
    assert lines == [
        {"custom_id": "a", "result": {"type": "canceled"}},
        {"custom_id": "b", "result": {"type": "canceled"}},
    ]
    deleted = await (
        await client.delete(f"/v1/messages/batches/{batch['id']}", headers=auth)
    ).json()
    assert deleted == {"id": batch["id"], "type": "message_batch_deleted"}
    await expect_error(
        await client.get(f"/v1/messages/batches/{batch['id']}", headers=auth),
        404,
        "not_found_error",
    )
    assert await redis.hlen("budgeter:{t:acme}:jobs") == 0
    assert await redis.hlen("budgeter:{t:acme}:results") == 0


async def test_pagination_newest_first(client: TestClient) -> None:
    key = await new_tenant(client, "pager")
    auth = {"x-api-key": key}
    ids = []
    for i in range(5):
        resp = await client.post(
            "/v1/messages/batches", json={"requests": [request_line(f"r{i}")]}, headers=auth
        )
        ids.append((await resp.json())["id"])
    newest_first = list(reversed(ids))
    page1 = await (await client.get("/v1/messages/batches?limit=2", headers=auth)).json()
    assert [b["id"] for b in page1["data"]] == newest_first[:2] and page1["has_more"]
    page2 = await (
        await client.get(f"/v1/messages/batches?limit=2&after_id={page1['last_id']}", headers=auth)
    ).json()
    assert [b["id"] for b in page2["data"]] == newest_first[2:4] and page2["has_more"]
    page3 = await (
        await client.get(f"/v1/messages/batches?limit=2&after_id={page2['last_id']}", headers=auth)
    ).json()
    assert [b["id"] for b in page3["data"]] == newest_first[4:] and not page3["has_more"]
    back = await (
        await client.get(
            f"/v1/messages/batches?limit=2&before_id={page3['first_id']}", headers=auth
        )
    ).json()
    assert [b["id"] for b in back["data"]] == newest_first[2:4] and back["has_more"]


async def test_tenants_see_only_their_own_batches(client: TestClient) -> None:
    key_a = await new_tenant(client, "team-a")
    key_b = await new_tenant(client, "team-b")
    resp = await client.post(
        "/v1/messages/batches", json={"requests": [request_line("x")]}, headers={"x-api-key": key_a}
    )
    batch_id = (await resp.json())["id"]
    for method, path in (
        ("GET", f"/v1/messages/batches/{batch_id}"),
        ("POST", f"/v1/messages/batches/{batch_id}/cancel"),
        ("GET", f"/v1/messages/batches/{batch_id}/results"),
        ("DELETE", f"/v1/messages/batches/{batch_id}"),
    ):
        resp = await client.request(method, path, headers={"x-api-key": key_b})
        await expect_error(resp, 404, "not_found_error")
    listed = await (await client.get("/v1/messages/batches", headers={"x-api-key": key_b})).json()
    assert listed["data"] == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"requests": []}, "requests"),
        ({"requests": [request_line("bad id")]}, "requests.0.custom_id"),
        ({"requests": [request_line("a", max_tokens=0)]}, "requests.0.params.max_tokens"),
        ({"requests": [request_line("a", max_tokens="8")]}, "requests.0.params.max_tokens"),
        ({"requests": [request_line("a", messages=[{"role": "tool", "content": "x"}])]}, "role"),
        ({"requests": [request_line("a"), request_line("a")]}, "duplicate custom_id"),
        ({"requests": [{"custom_id": "a"}]}, "requests.0.params"),
        ({"reqs": []}, "requests"),
        ([], "Input should be"),
    ],
)
async def test_invalid_batches_are_refused_whole(
    client: TestClient, redis: Redis, body: Any, fragment: str
) -> None:
    key = await new_tenant(client, "strict")
    before = await redis.dbsize()
    resp = await client.post("/v1/messages/batches", json=body, headers={"x-api-key": key})
    assert fragment in await expect_error(resp, 400, "invalid_request_error")
    assert await redis.dbsize() == before


async def test_malformed_json_unknown_routes_oversized_and_auth(client: TestClient) -> None:
    key = await new_tenant(client, "edge")
    auth = {"x-api-key": key}
    resp = await client.post("/v1/messages/batches", data=b"{nope", headers=auth)
    assert "not valid JSON" in await expect_error(resp, 400, "invalid_request_error")
    await expect_error(await client.get("/v1/nothing-here", headers=auth), 404, "not_found_error")
    await expect_error(await client.get("/nothing-here"), 404, "not_found_error")
    await expect_error(
        await client.patch("/v1/messages/batches", headers=auth), 405, "invalid_request_error"
    )
    big = b'{"requests": [' + b" " * (2 * 1024 * 1024) + b"]}"
    await expect_error(
        await client.post("/v1/messages/batches", data=io.BytesIO(big), headers=auth),
        413,
        "request_too_large",
    )
    await expect_error(await client.get("/v1/messages/batches"), 401, "authentication_error")
    await expect_error(
        await client.get("/v1/messages/batches", headers={"x-api-key": "sk-bgt-wrong"}),
        401,
        "authentication_error",
    )
    await expect_error(
        await client.get("/v1/messages/batches", headers={"authorization": "Basic abc"}),
        401,
        "authentication_error",
    )
    await expect_error(
        await client.get("/v1/messages/batches?limit=zero", headers=auth),
        400,
        "invalid_request_error",
    )


async def test_admin_api(client: TestClient, redis: Redis) -> None:
    await expect_error(await client.get("/admin/tenants"), 401, "authentication_error")
    await expect_error(
        await client.get("/admin/tenants", headers={"authorization": "Bearer wrong"}),
        401,
        "authentication_error",
    )
    resp = await client.put("/admin/tenants/acme", json={"budgets": {"week": 1}}, headers=ADMIN)
    assert "invalid policy: budgets.week" in await expect_error(resp, 400, "invalid_request_error")
    resp = await client.put("/admin/tenants/Not_Valid", json={}, headers=ADMIN)
    assert "invalid tenant id" in await expect_error(resp, 400, "invalid_request_error")
    policy = {"weight": 2, "budgets": {"day": 1000}, "rate": {"rpm": 5}, "max_concurrency": 3}
    assert (await client.put("/admin/tenants/acme", json=policy, headers=ADMIN)).status == 201
    assert (await client.put("/admin/tenants/acme", json=policy, headers=ADMIN)).status == 200
    got = await (await client.get("/admin/tenants/acme", headers=ADMIN)).json()
    assert got["policy"]["budgets"] == {"day": 1000} and got["policy"]["weight"] == 2
    listed = await (await client.get("/admin/tenants", headers=ADMIN)).json()
    assert [t["tenant"] for t in listed["data"]] == ["acme"]
    created = await (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json()
    assert created["key"].startswith("sk-bgt-") and created["id"].startswith("key_")
    keys = await (await client.get("/admin/tenants/acme/keys", headers=ADMIN)).json()
    assert keys["data"][0]["id"] == created["id"] and "key" not in keys["data"][0]
    # the key itself is stored nowhere
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        dumped = (
            json.dumps(await redis.hgetall(key))
            if kind == "hash"
            else str(await redis.get(key) if kind == "string" else "")
        )
        assert created["key"] not in dumped
    usage = await (await client.get("/admin/tenants/acme/usage", headers=ADMIN)).json()
    assert usage["budgets"][0]["limit"] == 1000 and usage["budgets"][0]["remaining"] == 1000
    revoked = await client.delete(f"/admin/tenants/acme/keys/{created['id']}", headers=ADMIN)
    assert revoked.status == 200
    await expect_error(
        await client.get("/v1/messages/batches", headers={"x-api-key": created["key"]}),
        401,
        "authentication_error",
    )
    gp = {"rate": {"rpm": 4000, "itpm": 2000000, "otpm": 400000}}
    assert (await client.put("/admin/global-policy", json=gp, headers=ADMIN)).status == 200
    got = await (await client.get("/admin/global-policy", headers=ADMIN)).json()
    assert got["policy"]["rate"]["rpm"] == 4000
    assert (await client.delete("/admin/tenants/acme", headers=ADMIN)).status == 200
    await expect_error(
        await client.get("/admin/tenants/acme", headers=ADMIN), 404, "not_found_error"
    )


async def test_admin_disabled_without_token(redis: Redis, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        resp = await test_client.get("/admin/tenants", headers={"authorization": "Bearer x"})
        assert "BUDGETER_ADMIN_TOKEN" in await expect_error(resp, 403, "permission_error")


async def test_openapi_is_valid_3_1_and_covers_every_route(client: TestClient) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    document = await resp.json()
    assert document["openapi"] == "3.1.0"
    validate(document)
    routes = {
        (r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
        for r in client.app.router.routes()  # type: ignore[union-attr]
        if r.method != "HEAD"
    }
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert routes == documented
    assert "MessageBatch" in document["components"]["schemas"]


async def test_health_and_readiness(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")  # the upstream of this test is a closed port
    assert ready.status == 503
    assert (await ready.json())["checks"] == {"redis": True, "upstream": False}
    metrics = await client.get("/metrics")
    assert metrics.status == 200 and "budgeter_" in await metrics.text()


async def test_redis_state_gauges_are_read_at_scrape_time(client: TestClient) -> None:
    key = await new_tenant(client, "gauged", {"budgets": {"day": 5000}})
    await client.post(
        "/v1/messages/batches",
        json={"requests": [request_line("a"), request_line("b")]},
        headers={"x-api-key": key},
    )
    text = await (await client.get("/metrics")).text()
    assert 'budgeter_queue_depth{tenant="gauged"} 2.0' in text
    assert 'budgeter_budget_remaining_tokens{period="day",tenant="gauged"} 5000.0' in text
    assert 'budgeter_inflight_requests{tenant="gauged"} 0.0' in text
    assert 'budgeter_queue_oldest_age_seconds{tenant="gauged"}' in text


async def test_admin_status_snapshot(client: TestClient, redis: Redis) -> None:
    from budgeter.admission.admission import Admission

    key = await new_tenant(client, "shown", {"budgets": {"day": 5000}, "rate": {"rpm": 1}})
    await client.post(
        "/v1/messages/batches", json={"requests": [request_line("a")]}, headers={"x-api-key": key}
    )
    admission = Admission(redis)
    assert (await admission.reserve("shown", "r1", 10, 10)).kind == "ADMIT"
    assert (await admission.reserve("shown", "r2", 10, 10)).kind == "DEFER"
    await expect_error(await client.get("/admin/status"), 401, "authentication_error")
    snapshot = await (await client.get("/admin/status", headers=ADMIN)).json()
    row = snapshot["tenants"][0]
    assert row["tenant"] == "shown" and row["queued"] == 1 and row["inflight"] == 1
    assert row["budgets"][0]["reserved"] == 20
    assert [d["decision"] for d in row["recent"]] == ["DEFER", "ADMIT"]
    assert row["recent"][0]["reason"] == "rate:rpm"
