"""The API's Redis deadline (budgeter/api/deadline.py, budgeter/store/reply_deadline.py)
against a real Redis behind :class:`tests.tcp_relay.TcpRelay`, paused silently (bytes
held, no reset). Nothing waits on speed: the bounds are short, the outer timeouts long."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError
from redis.exceptions import TimeoutError as RedisTimeoutError

from budgeter.api.app import create_app
from budgeter.api.deadline import BATCH_REPLY_S_PER_REQUEST, batch_deadline_s
from budgeter.settings import Settings
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis
from budgeter.store.reply_deadline import current, reply_deadline
from tests.tcp_relay import TcpRelay

ADMIN = {"authorization": "Bearer admin-secret-deadline"}


@pytest.fixture
async def relay(redis_server: EmbeddedRedis) -> AsyncIterator[TcpRelay]:
    async with TcpRelay("127.0.0.1", int(redis_server.port or 0)) as relay:
        yield relay


def test_the_bound_is_per_context_and_restored_on_exit() -> None:
    assert current() is None  # workers, CLI: the socket timeout and its retries
    with reply_deadline(3.0):
        assert current() == 3.0
        with reply_deadline(None):
            assert current() is None
        assert current() == 3.0
    assert current() is None


def test_the_setting_and_the_batch_allowance() -> None:
    settings = Settings(api_redis_deadline_seconds=4)  # type: ignore[arg-type]
    assert settings.api_redis_deadline_seconds == 4.0
    assert Settings().api_redis_deadline_seconds == 10.0
    with pytest.raises(ValidationError):
        Settings(api_redis_deadline_seconds=0)  # type: ignore[arg-type]
    assert batch_deadline_s(settings, 0) == 4.0
    assert batch_deadline_s(settings, 100_000) == pytest.approx(
        4.0 + 100_000 * BATCH_REPLY_S_PER_REQUEST
    )


async def test_a_connection_waits_the_shorter_of_its_socket_timeout_and_the_bound() -> None:
    client: Any = make_redis("redis://127.0.0.1:1/0")  # (never connected)
    connection = client.connection_pool.make_connection()
    assert connection.socket_timeout == 60
    with reply_deadline(2.0):
        assert connection.socket_timeout == 2.0
    with reply_deadline(100.0):  # a large batch's bound: the socket timeout still caps it
        assert connection.socket_timeout == 60
    assert connection.socket_timeout == 60
    await client.aclose()


async def test_a_bounded_call_to_a_silent_redis_fails_once_and_poisons_no_connection(
    relay: TcpRelay,
) -> None:
    client: Any = make_redis(relay.url)
    key = f"deadline-test:{secrets.token_hex(4)}"
    try:
        await client.set(f"{key}:a", "a")
        await client.set(f"{key}:b", "b")
        await relay.pause()
        connections = relay.connections
        async with asyncio.timeout(30):
            with reply_deadline(0.2), pytest.raises(RedisTimeoutError):
                await client.get(f"{key}:a")
        # not tried again: a retry would have connected anew (the pooled one was used)
        assert relay.connections == connections
        await relay.resume()  # the held GET reaches Redis; its reply finds a closed socket
        async with asyncio.timeout(30):
            with reply_deadline(5.0):
                assert await client.get(f"{key}:b") == "b"  # its own reply, not a's
                assert await client.get(f"{key}:a") == "a"
    finally:
        await relay.resume()
        await client.delete(f"{key}:a", f"{key}:b")
        await client.aclose()


async def test_the_api_answers_503_behind_a_silent_redis_and_recovers(
    relay: TcpRelay, redis_url: str
) -> None:
    settings = Settings(
        redis_url=redis_url,
        admin_token="admin-secret-deadline",
        upstream_url="http://127.0.0.1:9",
        api_redis_deadline_seconds=0.3,  # type: ignore[arg-type]
    )
    client: Any = make_redis(relay.url)
    try:
        async with TestClient(TestServer(create_app(settings, redis=client))) as http:
            resp = await http.get("/admin/tenants", headers=ADMIN)
            assert resp.status == 200, await resp.text()
            await relay.pause()
            async with asyncio.timeout(60):
                resp = await http.get("/admin/tenants", headers=ADMIN)
                body = await resp.json()
            assert resp.status == 503, body
            assert body["error"]["type"] == "overloaded_error"
            assert int(resp.headers["retry-after"]) > 0
            assert "request-id" in resp.headers
            await relay.resume()
            async with asyncio.timeout(60):
                resp = await http.get("/admin/tenants", headers=ADMIN)
                assert resp.status == 200, await resp.text()
    finally:
        await relay.resume()
        await client.aclose()
