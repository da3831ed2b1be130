"""Exact charges of the synchronous proxy (issue 21): a call that timed out after it was
sent, a client gone mid-stream, a stream cut short, and the ``retry-after`` of a spent
window. The upstream is a scripted one on loopback (every byte it sends is known), so each
test can name the exact number of tokens charged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.serving import serve_app
from budgeter.settings import Settings
from tests.api.test_proxy import Proxy, ask, budget

COUNTED = 40  # what the scripted upstream's count_tokens answers for every prompt
STARTED_INPUT = 42  # what its message_start reports (the real input replaces the count)
STARTED_OUTPUT = 1  # message_start's output_tokens
TEXT = "x" * 30  # one text delta: 30 bytes, estimated ceil(30 / 3) = 10 output tokens
ANSWER_OUTPUT = 7  # output_tokens of a non-streamed answer


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_scripted",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": STARTED_INPUT, "output_tokens": STARTED_OUTPUT},
        },
    },
)
BLOCK = sse(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
DELTA = sse(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}},
)
PING = sse("ping", {"type": "ping"})


@dataclass
class Script:
    """What the scripted upstream does with the next ``POST /v1/messages``."""

    mode: str = "answer"  # answer | hang | stream_gone | stream_ended | stream_broken
    release: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: asyncio.Event = field(default_factory=asyncio.Event)  # first events written
    calls: int = 0


def scripted_upstream(script: Script) -> web.Application:
    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"input_tokens": COUNTED})

    async def messages(request: web.Request) -> web.StreamResponse:
        script.calls += 1
        body = await request.json()
        if script.mode == "hang":  # sent, then no answer before the proxy's timeout
            await script.release.wait()
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_scripted",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": COUNTED, "output_tokens": ANSWER_OUTPUT},
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(START + BLOCK + DELTA)
        script.streamed.set()
        if script.mode == "stream_gone":
            await script.release.wait()  # the client leaves meanwhile
            # pings (never charged) until the proxy, writing one, finds the client gone
            # and drops this stream
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(30):
                    while True:
                        await response.write(PING)
                        await asyncio.sleep(0.02)
            return response
        elif script.mode == "stream_broken":
            await script.release.wait()  # the proxy has forwarded the text
            assert request.transport is not None
            request.transport.close()  # no terminating chunk: a payload error downstream
            return response
        # stream_ended: the upstream ends its answer without message_stop
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages/count_tokens", count)
    app.router.add_post("/v1/messages", messages)
    return app


@dataclass
class ScriptedProxy(Proxy):
    script: Script = field(default_factory=Script)


@asynccontextmanager
async def scripted_proxy(
    redis: Redis, redis_url: str, *, timeout_s: float = 60.0
) -> AsyncIterator[ScriptedProxy]:
    """The real API app in front of the scripted upstream, one HTTP attempt per call."""
    script = Script()
    async with serve_app(scripted_upstream(script), "127.0.0.1", 0) as upstream_port:
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        settings = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",
            upstream_url=upstream_url,
            upstream_timeout_seconds=timeout_s,
            upstream_max_attempts=1,
            count_cache_ttl_seconds=0,
        )
        try:
            async with serve_app(create_app(settings, redis=redis), "127.0.0.1", 0) as port:
                yield ScriptedProxy(f"http://127.0.0.1:{port}", upstream_url, script=script)
        finally:
            script.release.set()


@pytest.fixture
async def scripted(redis: Redis, redis_url: str) -> AsyncIterator[ScriptedProxy]:
    async with scripted_proxy(redis, redis_url) as found:
        yield found


async def wait_settled(redis: Redis, tenant: str) -> dict[str, str]:
    """Wait (bounded) until the tenant has no reservation left; its budget hash."""
    async with asyncio.timeout(30):
        while await redis.hlen(f"budgeter:{{t:{tenant}}}:resv"):  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
            await asyncio.sleep(0.02)
    return await budget(redis, tenant)


async def test_a_call_timed_out_after_it_was_sent_is_charged_in_full(
    redis: Redis, redis_url: str
) -> None:
    async with scripted_proxy(redis, redis_url, timeout_s=0.3) as scripted:
        key = await scripted.tenant("late", {"budgets": {"day": 100_000}})
        scripted.script.mode = "hang"
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{scripted.url}/v1/messages", json=ask(), headers={"x-api-key": key}
            ) as resp,
        ):
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "timeout_error"
        state = await wait_settled(redis, "late")
        # the upstream may have generated (and billed) the whole answer: input + max_tokens
        assert (int(state["day:used"]), state["day:reserved"]) == (COUNTED + 64, "0")
        assert scripted.script.calls == 1  # never sent twice


async def test_a_client_gone_mid_stream_is_charged_exactly_what_it_was_sent(
    scripted: ScriptedProxy, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    key = await scripted.tenant("gone", {"budgets": {"day": 100_000}})
    scripted.script.mode = "stream_gone"
    body = {**ask(max_tokens=200), "stream": True}
    with caplog.at_level(logging.INFO, logger="budgeter.proxy"):
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{scripted.url}/v1/messages", json=body, headers={"x-api-key": key}
            )
            assert resp.status == 200
            seen = b""
            while TEXT.encode() not in seen:
                seen += await resp.content.readline()
            resp.close()  # the client leaves after the text delta
        scripted.script.release.set()  # only now does the upstream go on (with pings)
        state = await wait_settled(redis, "gone")
    left = [r for r in caplog.records if r.getMessage() == "client left mid-stream"]
    assert len(left) == 1 and left[0].levelno == logging.INFO
    assert left[0].__dict__["tenant"] == "gone"
    assert str(left[0].__dict__["reservation"]).startswith("sync:req_")  # the call's own
    # message_start's input, and the output estimated from the 30 bytes of text seen
    assert int(state["day:used"]) == STARTED_INPUT + math.ceil(len(TEXT) / 3)
    assert state["day:reserved"] == "0"


@pytest.mark.parametrize("mode", ["stream_ended", "stream_broken"])
async def test_a_stream_cut_short_is_charged_the_output_estimated_from_its_text(
    scripted: ScriptedProxy, redis: Redis, mode: str
) -> None:
    tenant = mode.replace("_", "-")
    key = await scripted.tenant(tenant, {"budgets": {"day": 100_000}})
    scripted.script.mode = mode
    body = {**ask(max_tokens=200), "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{scripted.url}/v1/messages", json=body, headers={"x-api-key": key}) as resp,
    ):
        assert resp.status == 200
        text = ""
        while TEXT not in text:
            text += (await resp.content.readline()).decode()
        scripted.script.release.set()
        text += (await resp.read()).decode()
    assert TEXT in text and "message_stop" not in text
    if mode == "stream_broken":
        assert "upstream connection lost mid-stream" in text
    state = await wait_settled(redis, tenant)
    assert int(state["day:used"]) == STARTED_INPUT + math.ceil(len(TEXT) / 3)
    assert state["day:reserved"] == "0"


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_retry_after_of_a_spent_request_window_is_the_wait_to_within_a_second(
    scripted: ScriptedProxy, redis: Redis
) -> None:
    # rpm 2: GCRA with one request every 30 s and a minute of capacity; after two calls
    # the third fits at (theoretical arrival time - 60 s + 30 s), about 30 s from now
    key = await scripted.tenant("ra", {"rate": {"rpm": 2}})
    headers = {"x-api-key": key}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(f"{scripted.url}/v1/messages", json=ask(), headers=headers) as r:
                assert r.status == 200
        tat = float(await redis.hget("budgeter:{t:ra}:buckets", "rpm") or 0)
        fits_at = tat - 60_000 + 30_000
        before = await server_ms(redis)
        async with http.post(f"{scripted.url}/v1/messages", json=ask(), headers=headers) as r:
            assert r.status == 429
            retry_after = int(r.headers["retry-after"])
        after = await server_ms(redis)
    lowest = math.ceil((fits_at - after) / 1000)
    highest = math.ceil((fits_at - before) / 1000)
    assert lowest - 1 <= retry_after <= highest + 1
    assert retry_after >= 25  # the window is spent for ~30 s, not 1 s
