"""The proxy's fast path: what it remembers in-process (valid keys for at most
``KEY_CACHE_SECONDS``, token counts), the rate-limit headers read beside the upstream
call, and streams forwarded an event at a time, with every refusal still exactly as
strict as Redis says."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.api import proxy as proxy_module
from budgeter.api.app import create_app
from budgeter.api.local_count import LocalCountCache
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.results import error_body
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.store.keys import key_index_key
from budgeter.tenants import credentials as api_keys
from budgeter.tenants.credentials import KEY_CACHE_SECONDS, KeyStore, hash_key
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamError
from budgeter.upstream.token_counter import TokenCounter
from tests.api.test_proxy import Proxy, ask, budget, proxy  # noqa: F401 - the fixture


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The key cache's clock, moved by hand (never the event loop's)."""
    now = [1_000.0]
    monkeypatch.setattr(api_keys, "_clock", lambda: now[0])
    return now


async def test_a_valid_key_is_remembered_at_most_the_cache_bound(
    redis: Redis, clock: list[float]
) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    key_id, key = await KeyStore(redis).create("acme")
    cached = KeyStore(redis, cache_s=KEY_CACHE_SECONDS)
    principal = await cached.authenticate(key)
    assert principal is not None and (principal.tenant, principal.key_id) == ("acme", key_id)
    # another process revokes it (this process's cache is not told)
    await redis.hdel(key_index_key("budgeter"), hash_key(key))
    clock[0] += KEY_CACHE_SECONDS * 0.9
    assert await cached.authenticate(key) == principal
    clock[0] += KEY_CACHE_SECONDS * 0.2
    assert await cached.authenticate(key) is None
    assert await KeyStore(redis).authenticate(key) is None  # uncached stores: Redis only


@pytest.mark.usefixtures("clock")
async def test_revoking_or_deleting_the_tenant_drops_the_key_in_this_process_at_once(
    redis: Redis,
) -> None:
    tenants = TenantStore(redis)
    await tenants.put("acme", TenantPolicy())
    cached = KeyStore(redis, cache_s=KEY_CACHE_SECONDS)
    first_id, first = await cached.create("acme")
    _, second = await cached.create("acme")
    assert await cached.authenticate(first) is not None
    assert await cached.authenticate(second) is not None
    assert await KeyStore(redis).revoke("acme", first_id)  # through another KeyStore
    assert await cached.authenticate(first) is None
    assert await cached.authenticate(second) is not None
    assert await tenants.delete("acme")
    assert await cached.authenticate(second) is None


@pytest.mark.usefixtures("clock")
async def test_unknown_keys_are_never_remembered(redis: Redis) -> None:
    cached = KeyStore(redis, cache_s=KEY_CACHE_SECONDS)
    assert await cached.authenticate("sk-bgt-nope") is None
    assert not [k for k in api_keys._CACHE.entries if k[1] == hash_key("sk-bgt-nope")]
    await TenantStore(redis).put("acme", TenantPolicy())
    _, key = await cached.create("acme")
    assert await cached.authenticate(key) is not None  # a new key works at once


class CountingUpstream:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    async def count_tokens(self, _body: Any, _passthrough: Any = None) -> int:
        self.calls += 1
        if self.failing:
            raise UpstreamError(503, error_body("api_error", "down"), retryable=True)
        return 4242


async def test_local_counts_spare_redis_and_the_upstream_but_never_keep_estimates(
    redis: Redis,
) -> None:
    upstream = CountingUpstream()
    counter = LocalCountCache.over(TokenCounter(redis, upstream, ttl_s=3600))  # type: ignore[arg-type]
    params = ask(1)
    assert await counter.count_for("acme", params) == 4242
    await redis.flushall()  # the shared cache is gone: this process still knows the count
    assert await counter.count_for("acme", params) == 4242
    assert upstream.calls == 1
    # a failing count with the estimate fallback: the estimate is not remembered
    await TenantStore(redis).put("acme", TenantPolicy(on_count_failure="estimate"))
    upstream.failing = True
    other = ask(2)
    estimate = await counter.count_for("acme", other)
    assert estimate != 4242
    upstream.failing = False
    assert await counter.count_for("acme", other) == 4242
    # with the shared cache off, nothing is remembered locally either
    uncached = LocalCountCache.over(TokenCounter(redis, upstream, ttl_s=0))  # type: ignore[arg-type]
    before = upstream.calls
    await uncached.count(params)
    await uncached.count(params)
    assert upstream.calls == before + 2


async def test_headers_that_cannot_be_read_cost_only_the_headers(
    proxy: Proxy,  # noqa: F811 - the fixture, imported by name above
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = await proxy.tenant("px", {"budgets": {"day": 100_000}, "rate": {"rpm": 50}})

    async def broken(*_args: Any, **_kwargs: Any) -> dict[str, str]:
        raise ConnectionError("redis went away for this read")

    monkeypatch.setattr(proxy_module, "tenant_ratelimit_headers", broken)
    raw = await proxy.client(key).messages.with_raw_response.create(**ask())
    message = await raw.parse()
    assert raw.http_response.status_code == 200
    assert "anthropic-ratelimit-requests-limit" not in raw.headers
    await proxy.settled()  # right after the answer
    used = int((await budget(redis, "px")).get("day:used", 0))
    assert used == message.usage.input_tokens + message.usage.output_tokens


async def test_a_key_in_use_is_confirmed_in_the_background_and_a_revocation_found_there_counts(
    redis: Redis, clock: list[float]
) -> None:
    await TenantStore(redis).put("acme", TenantPolicy())
    _, key = await KeyStore(redis).create("acme")
    cached = KeyStore(redis, cache_s=KEY_CACHE_SECONDS)
    principal = await cached.authenticate(key)
    clock[0] += KEY_CACHE_SECONDS * 0.6  # past half its age: served, and confirmed again
    assert await cached.authenticate(key) == principal
    confirming = list(cached._confirming.values())
    assert len(confirming) == 1
    await confirming[0]
    clock[0] += KEY_CACHE_SECONDS * 0.6  # past the first expiry: the confirmation extended it
    await redis.hdel(key_index_key("budgeter"), hash_key(key))  # revoked by another process
    assert await cached.authenticate(key) == principal  # still within 1 s of the last read
    await next(iter(cached._confirming.values()))  # this confirmation finds it revoked
    assert await cached.authenticate(key) is None  # before its expiry
    await cached.aclose()


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


START = _sse(
    "message_start",
    {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
)
DELTA = _sse(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
)
STOP = _sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}}) + _sse(
    "message_stop", {"type": "message_stop"}
)


async def _stream_through(redis: Redis, redis_url: str, chunks: list[bytes], *, cut: bool) -> bytes:
    """POST a stream through the API to an upstream that sends ``chunks`` (split anywhere,
    not at event ends) and then ends, or cuts the connection."""

    async def messages(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.01)
        if cut:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"input_tokens": 10})

    upstream = web.Application()
    upstream.router.add_post("/v1/messages", messages)
    upstream.router.add_post("/v1/messages/count_tokens", count)
    async with serve_app(upstream, "127.0.0.1", 0) as upstream_port:
        settings = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",  # type: ignore[arg-type]
            upstream_url=f"http://127.0.0.1:{upstream_port}",
            upstream_api_key="k",  # type: ignore[arg-type]
            upstream_max_attempts=1,
        )
        async with (
            serve_app(create_app(settings, redis=redis), "127.0.0.1", 0) as port,
            aiohttp.ClientSession() as http,
        ):
            base = f"http://127.0.0.1:{port}"
            admin = {"authorization": "Bearer admin-secret"}
            policy = {"budgets": {"day": 100_000}}
            async with http.put(f"{base}/admin/tenants/sse", json=policy, headers=admin):
                pass
            async with http.post(f"{base}/admin/tenants/sse/keys", headers=admin) as r:
                key = (await r.json())["key"]
            async with http.post(
                f"{base}/v1/messages", json={**ask(), "stream": True}, headers={"x-api-key": key}
            ) as r:
                assert r.status == 200
                return await r.read()


async def test_a_stream_reaches_the_client_byte_for_byte_and_settles_at_message_stop(
    redis: Redis, redis_url: str
) -> None:
    sent = START + DELTA + DELTA + STOP
    chunks = [sent[i : i + 37] for i in range(0, len(sent), 37)]  # events split anywhere
    assert await _stream_through(redis, redis_url, chunks, cut=False) == sent
    state = await budget(redis, "sse")
    assert (state["day:used"], state["day:reserved"]) == ("17", "0")  # 10 in, 7 out


async def test_an_upstream_cut_mid_event_forwards_what_came_then_an_error_event(
    redis: Redis, redis_url: str
) -> None:
    partial = DELTA[: len(DELTA) // 2]  # its first line whole, its data line cut
    received = await _stream_through(redis, redis_url, [START, DELTA, partial], cut=True)
    came = START + DELTA + partial.split(b"\n")[0] + b"\n"  # whole lines only, as ever
    assert received.startswith(came)
    tail = received[len(came) :]
    assert b"event: error" in tail and b"upstream connection lost mid-stream" in tail
    state = await budget(redis, "sse")  # charged what was generated: 10 in, 1 out
    assert (state["day:used"], state["day:reserved"]) == ("11", "0")
