"""API consistency (issue 15, item 7) against a real Redis: every route answers 404
``not_found_error`` for a missing tenant (the routes are taken from the route table), a
missing credential and a wrong one are told apart, ``PATCH /admin/tenants/{t}`` is a JSON
merge patch validated whole, and PUT, PATCH and ``budgeter tenants set`` answer the same
shape."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.api.routes import ROUTES, Route
from budgeter.settings import Settings
from budgeter.store.keys import TenantKeys
from budgeter.store.scripts import register
from tests.api.test_app import expect_error

ADMIN = {"authorization": "Bearer admin-secret"}
MERGE = {**ADMIN, "content-type": "application/merge-patch+json"}
POLICY = {"weight": 2, "budgets": {"day": 1000, "month": 9000}, "rate": {"rpm": 60, "otpm": 800}}


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret",  # type: ignore[arg-type]
        upstream_url="http://127.0.0.1:9",  # never reached: every call here stops before it
        auth_failures_per_minute=1_000_000,
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


def concrete(route: Route, tenant: str) -> str:
    values = {"tenant": tenant, "key_id": "key_0000000000000000", "batch_id": "msgbatch_nope"}
    path = route.openapi_path
    for name in route.path_params:
        path = path.replace("{" + name + "}", values.get(name, "x"))
    if ("tenant", "string") in route.doc.query:  # GET /admin/ledger?tenant=
        path += f"?tenant={tenant}"
    return path


def tenant_routes() -> list[Route]:
    """Every admin route of one tenant, but PUT (which creates the tenant)."""
    return [
        r
        for r in ROUTES
        if "tenant" in r.path_params and r.doc.security == "admin" and r.method != "PUT"
    ]


def test_the_route_table_has_the_tenant_routes_this_file_checks() -> None:
    found = {(r.method, r.openapi_path) for r in tenant_routes()}
    assert {
        ("GET", "/admin/tenants/{tenant}"),
        ("PATCH", "/admin/tenants/{tenant}"),
        ("DELETE", "/admin/tenants/{tenant}"),
        ("POST", "/admin/tenants/{tenant}/keys"),
        ("GET", "/admin/tenants/{tenant}/keys"),
        ("DELETE", "/admin/tenants/{tenant}/keys/{key_id}"),
        ("GET", "/admin/tenants/{tenant}/usage"),
    } <= found


async def test_every_admin_route_of_a_missing_tenant_answers_404(
    client: TestClient, redis: Redis
) -> None:
    await client.put("/admin/tenants/other", json=POLICY, headers=ADMIN)  # another tenant
    before = sorted(await redis.keys("*"))
    for route in tenant_routes():
        body = {"json": {"weight": 3}} if route.method in ("PATCH", "POST") else {}
        resp = await client.request(route.method, concrete(route, "ghost"), headers=MERGE, **body)
        message = await expect_error(resp, 404, "not_found_error")
        assert message == "tenant 'ghost' not found", f"{route.method} {route.path}: {message}"
    assert sorted(await redis.keys("*")) == before  # nothing created for the ghost


async def test_a_key_whose_tenant_lost_its_policy_meets_404_on_every_v1_route(
    client: TestClient, redis: Redis
) -> None:
    assert (await client.put("/admin/tenants/acme", json=POLICY, headers=ADMIN)).status == 201
    key = (await (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json())["key"]
    await redis.delete(TenantKeys.of("budgeter", "acme").policy)  # the key remains
    v1 = [r for r in ROUTES if r.doc.security == "tenant"]
    assert len(v1) >= 9
    for route in v1:
        for auth in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
            resp = await client.request(
                route.method, concrete(route, "acme"), headers=auth, json={"requests": []}
            )
            message = await expect_error(resp, 404, "not_found_error")
            assert "tenant 'acme' not found" in message, f"{route.method} {route.path}"
    # a tenant created again gets its key's access back (the key was never revoked)
    await client.put("/admin/tenants/acme", json={}, headers=ADMIN)
    assert (await client.get("/v1/usage", headers={"x-api-key": key})).status == 200


async def test_a_missing_and_a_wrong_credential_are_told_apart(client: TestClient) -> None:
    for headers in ({}, {"authorization": "Basic abc"}, {"x-api-key": ""}):
        message = await expect_error(
            await client.get("/v1/messages/batches", headers=headers), 401, "authentication_error"
        )
        assert message.startswith("missing x-api-key header"), message
    for headers in ({"x-api-key": "sk-bgt-wrong"}, {"authorization": "Bearer sk-bgt-wrong"}):
        message = await expect_error(
            await client.get("/v1/messages/batches", headers=headers), 401, "authentication_error"
        )
        assert message.startswith("invalid x-api-key"), message
        assert "sk-bgt-wrong" not in message  # a credential is never echoed
    for headers in ({}, {"authorization": "Basic admin-secret"}, {"x-api-key": "admin-secret"}):
        message = await expect_error(
            await client.get("/admin/tenants", headers=headers), 401, "authentication_error"
        )
        assert message.startswith("missing admin token"), message
    message = await expect_error(
        await client.get("/admin/tenants", headers={"authorization": "Bearer nope"}),
        401,
        "authentication_error",
    )
    assert message == "invalid admin token"


async def patch(client: TestClient, body: Any, **headers: str) -> Any:
    return await client.patch(
        "/admin/tenants/acme", data=json.dumps(body), headers={**MERGE, **headers}
    )


async def test_patch_is_a_json_merge_patch(client: TestClient) -> None:
    await client.put(
        "/admin/tenants/acme",
        json={**POLICY, "allowed_models": ["a", "b"], "models": {"m": {"rate": {"rpm": 5}}}},
        headers=ADMIN,
    )
    resp = await patch(
        client,
        {
            "weight": None,  # null deletes: back to the default
            "budgets": {"day": None, "hour": 10},  # objects merge recursively
            "rate": {"rpm": 30},
            "allowed_models": ["c"],  # anything else replaces
            "models": {"m": {"budgets": {"day": 7}}, "n": {"rate": {"itpm": 9}}},
            "max_concurrency": 4,
        },
    )
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    policy = answer["policy"]
    assert answer["tenant"] == "acme"
    assert policy["weight"] == 1.0
    assert policy["budgets"] == {"month": 9000, "hour": 10}
    assert policy["rate"] == {"rpm": 30, "itpm": None, "otpm": 800}
    assert policy["allowed_models"] == ["c"]
    assert policy["models"]["m"]["rate"]["rpm"] == 5 and policy["models"]["m"]["budgets"] == {
        "day": 7
    }
    assert policy["models"]["n"]["rate"]["itpm"] == 9
    assert policy["max_concurrency"] == 4
    assert (await (await client.get("/admin/tenants/acme", headers=ADMIN)).json()) == answer
    # application/json is taken too, and an empty patch changes nothing
    resp = await patch(client, {}, **{"content-type": "application/json"})
    assert resp.status == 200 and await resp.json() == answer


async def test_a_patch_leaving_an_invalid_policy_is_refused_and_nothing_changes(
    client: TestClient,
) -> None:
    await client.put("/admin/tenants/acme", json=POLICY, headers=ADMIN)
    before = await (await client.get("/admin/tenants/acme", headers=ADMIN)).json()
    cases: list[tuple[Any, str]] = [
        ({"budgets": {"hour": 5}, "rate": {"rpm": 0}}, "rate.rpm"),
        ({"budgets": {"week": 5}}, "budgets.week"),
        ({"nonsense": 1}, "nonsense"),
        ({"on_exhausted": "explode"}, "on_exhausted"),
        (["a"], "invalid policy"),
        ("text", "invalid policy"),
    ]
    for body, named in cases:
        message = await expect_error(await patch(client, body), 400, "invalid_request_error")
        assert message.startswith("invalid policy: ") and named in message, message
    message = await expect_error(
        await client.patch("/admin/tenants/acme", data=b"{nope", headers=MERGE),
        400,
        "invalid_request_error",
    )
    assert "not valid JSON" in message
    message = await expect_error(
        await patch(client, {"weight": 5}, **{"content-type": "text/plain"}),
        415,
        "invalid_request_error",
    )
    assert "application/merge-patch+json" in message
    assert await (await client.get("/admin/tenants/acme", headers=ADMIN)).json() == before


async def budgeter_cli(redis_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        *args,
        env={**os.environ, "BUDGETER_REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_put_patch_get_and_the_cli_answer_the_same_shape(
    client: TestClient, redis_url: str
) -> None:
    put = await (await client.put("/admin/tenants/acme", json=POLICY, headers=ADMIN)).json()
    code, out, err = await budgeter_cli(
        redis_url, "tenants", "set", "cli", "--policy", json.dumps(POLICY)
    )
    assert code == 0, err
    assert json.loads(out) == {**put, "tenant": "cli"}
    assert set(put) == {"tenant", "policy"}
    assert put["policy"]["on_exhausted"] == "reject"  # the whole policy, defaults included

    change = {"budgets": {"day": None, "hour": 10}, "rate": {"otpm": None}}
    patched = await (await patch(client, change)).json()
    code, out, err = await budgeter_cli(
        redis_url, "tenants", "set", "cli", "--merge", "--policy", json.dumps(change)
    )
    assert code == 0, err
    assert json.loads(out) == {**patched, "tenant": "cli"}
    got = await (await client.get("/admin/tenants/cli", headers=ADMIN)).json()
    assert got == {**patched, "tenant": "cli"}

    # --merge: an invalid result, or a missing tenant, is one line and a non-zero exit
    code, out, err = await budgeter_cli(
        redis_url, "tenants", "set", "cli", "--merge", "--policy", '{"rate": {"rpm": 0}}'
    )
    assert (code, out) == (2, "") and err.startswith("budgeter: error: invalid policy: rate.rpm")
    assert len(err.splitlines()) == 1
    code, out, err = await budgeter_cli(
        redis_url, "tenants", "set", "ghost", "--merge", "--policy", "{}"
    )
    assert code == 2 and "tenant 'ghost' not found" in err and len(err.splitlines()) == 1
    got_after = await (await client.get("/admin/tenants/cli", headers=ADMIN)).json()
    assert got_after == got


async def test_the_openapi_document_describes_patch(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"]["/admin/tenants/{tenant}"]["patch"]
    assert set(operation["requestBody"]["content"]) == {
        "application/merge-patch+json",
        "application/json",
    }
    assert {"200", "400", "404", "415"} <= set(operation["responses"])


async def test_the_key_list_says_when_each_key_last_served_a_request(
    client: TestClient, redis: Redis
) -> None:
    await client.put("/admin/tenants/acme", json={}, headers=ADMIN)
    first = await (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json()
    second = await (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json()
    assert (await client.get("/v1/usage", headers={"x-api-key": first["key"]})).status == 200
    refused = await client.get(
        "/v1/messages/batches/msgbatch_x", headers={"x-api-key": second["key"]}
    )
    assert refused.status == 404  # a refused request changes nothing, its key's "last used" neither
    listed = (await (await client.get("/admin/tenants/acme/keys", headers=ADMIN)).json())["data"]
    assert [k["id"] for k in listed] == [first["id"], second["id"]]
    assert listed[0]["last_used_at_ms"] >= listed[0]["created_at_ms"]
    assert listed[1]["last_used_at_ms"] is None
    assert set(listed[0]) == {
        *("id", "name", "created_at_ms", "last_used_at_ms", "hint", "limits", "usage")
    }
    # a revoked key leaves no "last used" behind, and none is written for it afterwards
    keys = TenantKeys.of("budgeter", "acme")
    resp = await client.delete(f"/admin/tenants/acme/keys/{first['id']}", headers=ADMIN)
    assert resp.status == 200
    assert not await redis.hexists(keys.api_keys_used, first["id"])
    key_used = register(redis, "tenants/key_used.lua")
    assert await key_used(keys=[keys.api_keys, keys.api_keys_used], args=[first["id"], 1]) == 0
    assert not await redis.exists(keys.api_keys_used)
    assert await key_used(keys=[keys.api_keys, keys.api_keys_used], args=[second["id"], 7]) == 1
    assert await redis.hget(keys.api_keys_used, second["id"]) == "7"
