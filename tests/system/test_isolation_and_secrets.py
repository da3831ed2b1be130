"""Isolation between tenants, the admin boundary, failed-auth throttling, and secrets that
never leave: real Redis, and for the secrets a real API + worker + mock stack whose every
log line, metric, answer, result and Redis value is searched for them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.settings import Settings
from tests.api.test_app import ADMIN, expect_error, new_tenant, request_line
from tests.helpers import listen_args, read_port, wait_http


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret",
        upstream_url="http://127.0.0.1:9",
        auth_failures_per_minute=5,
        trust_forwarded_for=True,
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


def _auth(key: str) -> dict[str, str]:
    return {"x-api-key": key}


async def test_a_tenant_sees_nothing_of_another_tenants_batches_or_usage(
    client: TestClient,
) -> None:
    key_a = await new_tenant(client, "tenant-a")
    key_b = await new_tenant(client, "tenant-b")
    resp = await client.post(
        "/v1/messages/batches", json={"requests": [request_line("b-1")]}, headers=_auth(key_b)
    )
    assert resp.status == 200
    batch_b = (await resp.json())["id"]
    resp = await client.post(
        "/v1/messages/batches", json={"requests": [request_line("a-1")]}, headers=_auth(key_a)
    )
    batch_a = (await resp.json())["id"]

    a = _auth(key_a)
    for method, path in [
        ("GET", f"/v1/messages/batches/{batch_b}"),
        ("GET", f"/v1/messages/batches/{batch_b}/results"),
        ("POST", f"/v1/messages/batches/{batch_b}/cancel"),
        ("DELETE", f"/v1/messages/batches/{batch_b}"),
    ]:
        message = await expect_error(
            await client.request(method, path, headers=a), 404, "not_found_error"
        )
        assert "tenant-b" not in message  # not even whose it is
    listed = await (await client.get("/v1/messages/batches", headers=a)).json()
    assert [b["id"] for b in listed["data"]] == [batch_a]
    # B's batch is untouched by A's attempts
    got = await (await client.get(f"/v1/messages/batches/{batch_b}", headers=_auth(key_b))).json()
    assert got["processing_status"] == "in_progress" and got["request_counts"]["processing"] == 1

    usage = await client.get("/v1/usage", headers=a)
    assert usage.status == 200 and (await usage.json())["tenant"] == "tenant-a"
    # the admin view of B's usage needs the admin token, which a tenant key is not
    for headers in (a, {"authorization": f"Bearer {key_a}"}):
        await expect_error(
            await client.get("/admin/tenants/tenant-b/usage", headers=headers),
            401,
            "authentication_error",
        )


async def test_every_admin_route_refuses_without_the_admin_token(client: TestClient) -> None:
    key = await new_tenant(client, "tenant-a")
    routes = [
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/admin")
        and route.method != "HEAD"
    ]
    assert len(routes) >= 10
    attempts = 0
    for method, template in routes:
        path = template.replace("{tenant}", "tenant-a").replace("{key_id}", "key_0")
        for headers in ({}, _auth(key), {"authorization": "Bearer admin-secreT"}):
            attempts += 1  # one address per attempt: this test is not about the throttle
            headers = {**headers, "x-forwarded-for": f"10.0.{attempts // 250}.{attempts % 250}"}
            resp = await client.request(method, path, headers=headers, json={})
            assert resp.status == 401, (method, path, headers)
    # nothing changed: the tenant and its key are still there
    resp = await client.get("/admin/tenants/tenant-a/keys", headers=ADMIN)
    assert len((await resp.json())["data"]) == 1


async def test_the_admin_api_is_off_without_a_configured_token(
    redis: Redis, redis_url: str
) -> None:
    settings = Settings(redis_url=redis_url, admin_token="", upstream_url="http://127.0.0.1:9")
    async with TestClient(TestServer(create_app(settings, redis=redis))) as off:
        for headers in ({}, {"authorization": "Bearer "}, {"authorization": "Bearer x"}):
            await expect_error(
                await off.get("/admin/tenants", headers=headers), 403, "permission_error"
            )


async def test_failed_authentication_is_rate_limited_per_address(
    client: TestClient, redis: Redis
) -> None:
    key = await new_tenant(client, "tenant-a")
    attacker = {"x-forwarded-for": "192.0.2.7"}
    for i in range(5):
        await expect_error(
            await client.get("/v1/messages/batches", headers={**attacker, "x-api-key": f"bad{i}"}),
            401,
            "authentication_error",
        )
    resp = await client.get("/v1/messages/batches", headers={**attacker, "x-api-key": "bad"})
    await expect_error(resp, 429, "rate_limit_error")
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    # the admin side counts on the same address
    resp = await client.get("/admin/tenants", headers={**attacker, "authorization": "Bearer no"})
    await expect_error(resp, 429, "rate_limit_error")
    # a valid key is never throttled, and another address is not affected
    ok = await client.get("/v1/messages/batches", headers={**attacker, **_auth(key)})
    assert ok.status == 200
    other = {"x-forwarded-for": "192.0.2.8", "x-api-key": "bad"}
    await expect_error(
        await client.get("/v1/messages/batches", headers=other), 401, "authentication_error"
    )
    # the window ends: the counter expires by itself
    ttl = [await redis.ttl(k) async for k in redis.scan_iter(match="*{auth}*")]
    assert ttl and all(0 < t <= 60 for t in ttl)


async def test_tenant_keys_are_stored_only_as_hashes(client: TestClient, redis: Redis) -> None:
    key = await new_tenant(client, "tenant-a")
    dump = await _redis_text(redis)
    assert key not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump
    listed = await (await client.get("/admin/tenants/tenant-a/keys", headers=ADMIN)).json()
    assert key not in str(listed) and "hash" not in listed["data"][0]


async def _redis_text(redis: Redis) -> str:
    """Every key and value in Redis as one text, to search for secrets."""
    parts: list[str] = []
    async for name in redis.scan_iter(count=1000):
        kind = await redis.type(name)
        parts.append(str(name))
        if kind == "string":
            parts.append(str(await redis.get(name)))
        elif kind == "hash":
            parts.append(str(await redis.hgetall(name)))
        elif kind == "list":
            parts.append(str(await redis.lrange(name, 0, -1)))
        elif kind == "set":
            parts.append(str(await redis.smembers(name)))
        elif kind == "zset":
            parts.append(str(await redis.zrange(name, 0, -1, withscores=True)))
    return "\n".join(parts)


# secrets across a real stack ---------------------------------------------------------------

UPSTREAM_KEY = "sk-upstream-SECRET-4f9a0c1e"
ADMIN_TOKEN = "admin-SECRET-7d2b9e"


async def test_secrets_never_appear_in_logs_metrics_answers_results_or_redis(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
        "BUDGETER_LOG_LEVEL": "DEBUG",
        "BUDGETER_LOG_FORMAT": "json",
        "BUDGETER_UPSTREAM_MAX_ATTEMPTS": "1",
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
    }
    logs = [tmp_path / f"proc{i}.log" for i in range(3)]
    commands = [["mock-upstream"], ["api"], ["worker", "--concurrency", "4"]]
    procs = []
    ports = []
    for i, (command, log) in enumerate(zip(commands, logs, strict=True)):
        port_file = tmp_path / f"proc{i}.port"
        with log.open("wb") as out:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "budgeter",
                    *command,
                    *listen_args(port_file),
                    env=env,
                    stdout=out,
                    stderr=out,
                )
            )
        ports.append(await read_port(port_file, procs[-1]))
        env.setdefault("BUDGETER_UPSTREAM_URL", f"http://127.0.0.1:{ports[0]}")  # the mock's
    mock_port, api_port, worker_metrics = ports
    api = f"http://127.0.0.1:{api_port}"
    mock = f"http://127.0.0.1:{mock_port}"
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    seen: list[str] = []  # every answer body and header the clients received

    async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
        async with http.request(method, url, **kw) as resp:
            text = await resp.text()
            seen.append(text)
            seen.append(str(dict(resp.headers)))
            return resp.status, text

    async def wait_ended(batch_id: str) -> None:
        async with asyncio.timeout(60):
            while True:
                _, text = await call(
                    http, "GET", f"{api}/v1/messages/batches/{batch_id}", headers=auth
                )
                if json.loads(text)["processing_status"] == "ended":
                    return
                await asyncio.sleep(0.1)

    try:
        async with aiohttp.ClientSession() as http:
            await wait_http(f"{mock}/healthz")
            await wait_http(f"{api}/healthz")
            async with http.post(f"{mock}/mock/config", json={"api_key": UPSTREAM_KEY}) as r:
                assert r.status == 200
            keys = {}
            for tenant in ("sec-a", "sec-b"):
                await call(http, "PUT", f"{api}/admin/tenants/{tenant}", json={}, headers=admin)
                async with http.post(f"{api}/admin/tenants/{tenant}/keys", headers=admin) as r:
                    keys[tenant] = (await r.json())["key"]  # shown this once, by design
            auth = {"x-api-key": keys["sec-a"]}
            body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
            assert (await call(http, "POST", f"{api}/v1/messages", json=body, headers=auth))[
                0
            ] == 200
            await call(
                http, "POST", f"{api}/v1/messages", json={**body, "stream": True}, headers=auth
            )
            count = {"model": "m", "messages": body["messages"]}
            status, text = await call(
                http, "POST", f"{api}/v1/messages/count_tokens", json=count, headers=auth
            )
            assert status == 200, text
            status, text = await call(
                http,
                "POST",
                f"{api}/v1/messages/batches",
                json={"requests": [request_line(f"r{i}") for i in range(5)]},
                headers=auth,
            )
            assert status == 200, text
            batch_id = json.loads(text)["id"]
            # secrets sent to the wrong place must not be echoed back
            await call(
                http, "GET", f"{api}/v1/messages/batches", headers={"x-api-key": ADMIN_TOKEN}
            )
            await call(
                http,
                "GET",
                f"{api}/admin/tenants",
                headers={"authorization": f"Bearer {keys['sec-b']}"},
            )
            await call(
                http,
                "GET",
                f"{api}/admin/tenants",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}x"},
            )
            await call(
                http,
                "POST",
                f"{api}/v1/messages",
                json={**body, "metadata": {"user_id": keys["sec-b"]}, "max_tokens": -1},
                headers=auth,
            )
            await wait_ended(batch_id)
            await call(http, "GET", f"{api}/v1/messages/batches/{batch_id}/results", headers=auth)
            # the upstream now refuses our key: its 401 reaches results and answers
            async with http.post(f"{mock}/mock/config", json={"api_key": "another"}) as r:
                assert r.status == 200
            status, _ = await call(http, "POST", f"{api}/v1/messages", json=body, headers=auth)
            assert status >= 400
            status, text = await call(
                http,
                "POST",
                f"{api}/v1/messages/batches",
                json={"requests": [request_line("denied")]},
                headers=auth,
            )
            denied = json.loads(text)["id"]
            await wait_ended(denied)
            _, results = await call(
                http, "GET", f"{api}/v1/messages/batches/{denied}/results", headers=auth
            )
            assert '"errored"' in results
            for url in (f"{api}/metrics", f"http://127.0.0.1:{worker_metrics}/metrics"):
                await call(http, "GET", url)
            for path in (
                "/admin/status",
                "/admin/tenants",
                "/admin/tenants/sec-a/keys",
                "/admin/tenants/sec-a/usage",
                "/admin/global-policy",
                "/v1/usage",
            ):
                await call(http, "GET", f"{api}{path}", headers=admin if "admin" in path else auth)
            await call(http, "GET", f"{api}/")
            await call(http, "GET", f"{api}/openapi.json")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)

    secrets = {"upstream key": UPSTREAM_KEY, "admin token": ADMIN_TOKEN, **keys}
    places = {
        "answers": "\n".join(seen),
        "redis": await _redis_text(redis),
        **{
            f"log of {c[0]}": log.read_text(errors="replace")
            for c, log in zip(commands, logs, strict=True)
        },
    }
    assert "DEBUG" in places["log of api"] or "debug" in places["log of api"]
    for where, text in places.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} appears in the {where}"
            assert secret[-12:] not in text, f"a tail of the {name} appears in the {where}"


async def test_a_deleted_tenants_keys_never_work_again_even_if_it_is_recreated(
    client: TestClient, redis: Redis
) -> None:
    from budgeter.domain.policy import TenantPolicy
    from budgeter.tenants.store import TenantStore

    key = await new_tenant(client, "tenant-a")
    assert (await client.get("/v1/messages/batches", headers=_auth(key))).status == 200
    store = TenantStore(redis)
    assert await store.delete("tenant-a")  # what `budgeter tenants delete` and apply --prune do
    await store.put("tenant-a", TenantPolicy())
    await expect_error(
        await client.get(
            "/v1/messages/batches", headers={**_auth(key), "x-forwarded-for": "192.0.2.99"}
        ),
        401,
        "authentication_error",
    )
