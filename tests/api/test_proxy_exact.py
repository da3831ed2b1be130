"""The proxy's count_tokens route and its upstream errors, exactly (issue 21, mutation
testing): status, message and headers of each refusal, the caller's betas and fields
forwarded, the upstream's answer and error passed on byte for byte with its request id, a
refused call's reservation released at once; and StreamUsage's starting values.

The upstream here is a small aiohttp app of the test's own on loopback (the mock sends no
request id and cannot refuse a count with a given body)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.admission.decision import Decision
from budgeter.api.app import create_app
from budgeter.api.proxy import StreamUsage, _discard, _end_with_error, _refusal
from budgeter.domain import jsonio
from budgeter.queue.batches import BatchStore
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.upstream.client import UpstreamClient
from tests.helpers import requests_for

ADMIN = {"authorization": "Bearer admin-secret"}
UPSTREAM_ID = "budgeter-upstream-request-id"
REFUSAL = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad system"}}
COUNT = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
OVERLOADED = {"type": "error", "error": {"type": "api_error", "message": "count is down"}}
ANSWER = (  # a non-streamed answer, as the upstream's bytes (no content type of its own)
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-test",'
    b'"content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn",'
    b'"usage":{"input_tokens":10,"output_tokens":3}}'
)


@dataclass
class Upstream:
    """What the test's upstream received: (path, JSON body, anthropic-beta header)."""

    seen: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)
    stream: bytes = b""  # what a streamed call answers, as it is
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # set: the stream may end
    held: bool = False  # the stream, once written, waits for ``hold`` before it ends
    broken: bool = False  # the stream ends with its connection closed, no last chunk


def upstream_app(upstream: Upstream) -> web.Application:
    async def count_tokens(request: web.Request) -> web.Response:
        body = await request.json()
        upstream.seen.append((request.path, body, request.headers.get("anthropic-beta")))
        if body.get("system") == "fail":
            return web.json_response(REFUSAL, status=400, headers={"request-id": "req_up_err"})
        if body.get("system") == "count500":
            return web.json_response(OVERLOADED, status=500)
        return web.Response(
            text='{"input_tokens":7}',
            content_type="application/json",
            headers={"request-id": "req_up_ok"},
        )

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        upstream.seen.append((request.path, body, request.headers.get("anthropic-beta")))
        if body.get("system") == "refuse":
            return web.json_response(REFUSAL, status=400, headers={"request-id": "req_up_msg"})
        if not body.get("stream"):
            return web.Response(body=ANSWER, headers={"request-id": "req_up_answer"})
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "request-id": "req_up_stream"}
        )
        await response.prepare(request)
        await response.write(upstream.stream)
        if upstream.held:
            await upstream.hold.wait()
        if upstream.broken:
            assert request.transport is not None
            request.transport.close()  # a payload error downstream
            return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/messages", messages)
    return app


@dataclass
class Stack:
    url: str
    upstream: Upstream
    key: str = ""

    def headers(self, **extra: str) -> dict[str, str]:
        return {"x-api-key": self.key, "anthropic-version": "2023-06-01", **extra}


@pytest.fixture
async def stack(redis: Redis, redis_url: str) -> AsyncIterator[Stack]:
    upstream = Upstream()
    async with serve_app(upstream_app(upstream), "127.0.0.1", 0) as upstream_port:
        settings = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",
            upstream_url=f"http://127.0.0.1:{upstream_port}",
            upstream_max_attempts=1,
        )
        async with serve_app(create_app(settings, redis=redis), "127.0.0.1", 0) as port:
            found = Stack(f"http://127.0.0.1:{port}", upstream)
            policy = {
                "budgets": {"day": 100_000},
                "rate": {"rpm": 50},
                "allowed_betas": ["beta-a"],
            }
            async with aiohttp.ClientSession() as http:
                put = await http.put(f"{found.url}/admin/tenants/ex", json=policy, headers=ADMIN)
                assert put.status in (200, 201), await put.text()
                made = await http.post(f"{found.url}/admin/tenants/ex/keys", headers=ADMIN)
                found.key = str((await made.json())["key"])
            try:
                yield found
            finally:
                upstream.hold.set()


async def post(
    stack: Stack, path: str, body: object, **headers: str
) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}{path}", json=body, headers=stack.headers(**headers)) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.text()


def error_of(text: str) -> tuple[str, str]:
    error = jsonio.loads(text)["error"]
    return error["type"], error["message"]


async def test_a_count_passes_the_upstreams_answer_with_its_request_id_and_the_rate_headers(
    stack: Stack,
) -> None:
    status, headers, text = await post(stack, "/v1/messages/count_tokens", COUNT)
    assert (status, text) == (200, '{"input_tokens":7}')
    assert headers["Content-Type"].startswith("application/json")
    assert headers[UPSTREAM_ID] == "req_up_ok"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert stack.upstream.seen == [("/v1/messages/count_tokens", COUNT, None)]


async def test_a_count_whose_body_is_not_an_object_is_a_400(stack: Stack) -> None:
    status, _, text = await post(stack, "/v1/messages/count_tokens", [COUNT])
    assert status == 400
    assert error_of(text) == ("invalid_request_error", "request body must be a JSON object")
    assert stack.upstream.seen == []


async def test_a_count_with_fields_it_does_not_take_names_the_first_of_them(
    stack: Stack,
) -> None:
    body = {**COUNT, "zzz": 1, "aaa": 2}
    status, _, text = await post(stack, "/v1/messages/count_tokens", body)
    assert status == 400
    assert error_of(text) == ("invalid_request_error", "aaa: Extra inputs are not permitted")
    assert stack.upstream.seen == []


async def test_under_an_allowed_beta_the_fields_and_the_beta_go_to_the_upstream(
    stack: Stack,
) -> None:
    body = {**COUNT, "context_management": {"edits": []}}
    status, _, _ = await post(
        stack, "/v1/messages/count_tokens", body, **{"anthropic-beta": "beta-a"}
    )
    assert status == 200
    assert stack.upstream.seen == [("/v1/messages/count_tokens", body, "beta-a")]


async def test_a_beta_the_tenant_does_not_allow_is_refused_before_the_upstream(
    stack: Stack,
) -> None:
    status, _, text = await post(
        stack, "/v1/messages/count_tokens", COUNT, **{"anthropic-beta": "beta-b"}
    )
    assert status == 400
    kind, message = error_of(text)
    assert kind == "invalid_request_error" and "'beta-b'" in message
    assert stack.upstream.seen == []


async def test_an_upstream_refusal_of_a_count_is_passed_on_as_it_came(stack: Stack) -> None:
    status, headers, text = await post(
        stack, "/v1/messages/count_tokens", {**COUNT, "system": "fail"}
    )
    assert status == 400
    assert text == jsonio.dumps_str(REFUSAL)  # the upstream's body, compact JSON
    assert headers["Content-Type"].startswith("application/json")
    assert headers[UPSTREAM_ID] == "req_up_err"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"


async def test_a_call_the_upstream_refuses_is_released_at_once_and_passed_on(
    stack: Stack, redis: Redis
) -> None:
    message = {**COUNT, "max_tokens": 64, "system": "refuse"}
    status, headers, text = await post(stack, "/v1/messages", message)
    assert (status, text) == (400, jsonio.dumps_str(REFUSAL))
    assert headers[UPSTREAM_ID] == "req_up_msg"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert budget.get("day:reserved", "0") == "0"
    assert budget.get("day:used", "0") == "0"  # refused before it was served: nothing charged
    assert await redis.hlen("budgeter:{t:ex}:resv") == 0


def test_stream_usage_starts_from_the_counted_input_and_nothing_else() -> None:
    fresh = StreamUsage()
    assert fresh.usage() == Usage(0, 0, 0, 0)
    assert fresh.stopped is False and fresh.errored is False
    assert StreamUsage(12).usage() == Usage(12, 0, 0, 0)


def test_a_message_start_without_input_tokens_means_none() -> None:
    usage = StreamUsage(12)
    usage.feed({"type": "message_start", "message": {"usage": {}}})
    assert usage.usage() == Usage(0, 0, 0, 0)


def test_a_message_start_sets_every_usage_field_it_names() -> None:
    usage = StreamUsage(99)
    start = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 4,
        "output_tokens": 1,
    }
    usage.feed({"type": "message_start", "message": {"usage": start}})
    assert (usage.input, usage.cache_creation, usage.cache_read, usage.output) == (10, 3, 4, 1)
    usage.feed({"type": "message_stop"})
    assert usage.usage() == Usage(10, 1, 3, 4)
    empty = StreamUsage(5)
    empty.feed({"type": "message_start"})  # no message: nothing known, all zero
    assert (empty.input, empty.cache_creation, empty.cache_read, empty.output) == (0, 0, 0, 0)


def test_the_text_of_deltas_is_counted_in_utf8_bytes_and_other_fields_are_not() -> None:
    usage = StreamUsage()
    for delta in (
        {"type": "text_delta", "text": "héllo"},  # 6 bytes
        {"type": "input_json_delta", "partial_json": '{"a":'},  # 5 bytes
        {"type": "thinking_delta", "thinking": "hmm"},  # 3 bytes
        {"type": "signature_delta", "signature": "x" * 50},  # not generated text
        {"type": "text_delta", "text": None},
    ):
        usage.feed({"type": "content_block_delta", "delta": delta})
    usage.feed({"type": "content_block_delta"})  # no delta at all
    assert usage.text_bytes == 14
    assert usage.usage() == Usage(0, 5, 0, 0)  # not stopped: ceil(14 / 3)


def test_the_reported_output_wins_once_stopped_and_the_estimate_when_larger_before() -> None:
    usage = StreamUsage(7)
    usage.feed({"type": "content_block_delta", "delta": {"text": "x" * 30}})  # 10 tokens
    usage.feed({"type": "message_delta", "usage": {"output_tokens": 4}})
    assert usage.output == 4 and usage.usage() == Usage(7, 10, 0, 0)  # cut short: estimate
    usage.feed({"type": "message_delta", "usage": {"output_tokens": 12}})
    assert usage.usage() == Usage(7, 12, 0, 0)  # the report, larger than the estimate
    usage.feed({"type": "message_delta", "usage": {}})  # no figure: the last one stays
    usage.feed({"type": "message_delta"})
    assert usage.output == 12
    usage.feed({"type": "message_delta", "usage": {"output_tokens": 2}})
    usage.feed({"type": "message_stop"})
    assert usage.stopped is True and usage.usage() == Usage(7, 2, 0, 0)  # stopped: the report


def test_an_error_event_marks_the_stream_errored_and_nothing_else() -> None:
    usage = StreamUsage(3)
    usage.feed({"type": "ping"})
    assert usage.errored is False and usage.stopped is False
    usage.feed({"type": "error", "error": {"type": "overloaded_error"}})
    assert usage.errored is True and usage.stopped is False
    assert usage.usage() == Usage(3, 0, 0, 0)


# CRLF line ends, a comment line, an event whose data spans two lines, a ping
STREAM = (
    b'event: message_start\r\ndata: {"type":"message_start","message":'
    b'{"usage":{"input_tokens":10,"output_tokens":1}}}\r\n\r\n'
    b": keep-alive\n\n"
    b'event: content_block_delta\ndata: {"type":"content_block_delta",'
    b'"delta":{"type":"text_delta","text":"abcdefghijkl"}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta",\n'
    b'data: "usage":{"output_tokens":5}}\n\n'
)
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


async def streamed(
    stack: Stack, headers: dict[str, str] | None = None, **extra: object
) -> tuple[int, dict[str, str], bytes]:
    body = {**COUNT, "max_tokens": 64, "stream": True, **extra}
    sent = stack.headers(**(headers or {}))
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/messages", json=body, headers=sent) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_a_stream_is_passed_on_byte_for_byte_and_settled_at_its_report(
    stack: Stack, redis: Redis
) -> None:
    stack.upstream.stream = STREAM + STOP
    status, headers, got = await streamed(stack)
    assert (status, got) == (200, STREAM + STOP)
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["request-id"].startswith("req_") and headers["request-id"] != "req_up_stream"
    assert headers[UPSTREAM_ID] == "req_up_stream"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("15", "0")  # 10 in, 5 out
    assert await redis.hlen("budgeter:{t:ex}:resv") == 0


async def test_a_stream_that_ends_inside_an_event_is_passed_on_and_charged_its_estimate(
    stack: Stack, redis: Redis
) -> None:
    cut = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":'
    stack.upstream.stream = STREAM + cut  # no message_stop, no closing blank line
    status, _, got = await streamed(stack)
    assert (status, got) == (200, STREAM + cut)  # the unfinished event too
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    # not stopped: the larger of the reported 5 and ceil(12 text bytes / 3) = 4
    assert (budget["day:used"], budget["day:reserved"]) == ("15", "0")


async def test_an_error_event_settles_the_stream_at_what_it_had(stack: Stack, redis: Redis) -> None:
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
    stack.upstream.stream = STREAM + error
    status, _, got = await streamed(stack)
    assert (status, got) == (200, STREAM + error)
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("15", "0")


async def test_a_stream_the_upstream_refuses_is_released_and_passed_on(
    stack: Stack, redis: Redis
) -> None:
    status, headers, got = await streamed(stack, system="refuse")
    assert (status, got.decode()) == (400, jsonio.dumps_str(REFUSAL))
    assert headers[UPSTREAM_ID] == "req_up_msg"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget.get("day:used", "0"), budget.get("day:reserved", "0")) == ("0", "0")
    assert await redis.hlen("budgeter:{t:ex}:resv") == 0


async def test_a_stream_that_ends_before_message_start_is_charged_its_counted_input(
    stack: Stack, redis: Redis
) -> None:
    ping = b'event: ping\ndata: {"type":"ping"}\n\n'
    stack.upstream.stream = ping  # then the upstream ends: no usage was ever reported
    status, _, got = await streamed(stack)
    assert (status, got) == (200, ping)
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("7", "0")  # the count: 7


async def test_a_stream_is_sent_with_the_callers_betas(stack: Stack) -> None:
    stack.upstream.stream = STREAM + STOP
    status, _, _ = await streamed(stack, {"anthropic-beta": "beta-a"})
    assert status == 200
    assert [(path, beta) for path, _, beta in stack.upstream.seen] == [
        ("/v1/messages/count_tokens", "beta-a"),
        ("/v1/messages", "beta-a"),
    ]


LOST = (  # the error event the proxy adds when the upstream breaks mid-stream
    b'event: error\ndata: {"type": "error", "error": {"type": "api_error", '
    b'"message": "upstream connection lost mid-stream"}}\n\n'
)


async def test_a_stream_the_upstream_breaks_ends_with_an_error_event(
    stack: Stack, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream sends the stream and half a line, and (once the client has what came
    before) closes its connection: the client gets the stream, then exactly one error
    event, and the call is charged its estimate."""
    stack.upstream.stream = STREAM + b'data: {"type":"content_block_delta","delta":'
    stack.upstream.held = stack.upstream.broken = True
    body = {**COUNT, "max_tokens": 64, "stream": True}
    with caplog.at_level(logging.INFO, logger="budgeter.proxy"):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{stack.url}/v1/messages", json=body, headers=stack.headers()) as resp,
        ):
            assert resp.status == 200
            assert await resp.content.readexactly(len(STREAM)) == STREAM
            stack.upstream.hold.set()  # now the upstream's connection closes
            assert await resp.read() == LOST  # the half line is lost with the connection
    broke = [r for r in caplog.records if r.name == "budgeter.proxy"]
    assert [(r.levelno, r.getMessage()) for r in broke] == [
        (logging.WARNING, "upstream stream broke: ClientPayloadError")
    ]
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("15", "0")  # its estimate


class Written:
    """A StreamResponse's ``write``, recorded."""

    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data


async def test_a_stream_ended_with_an_error_gets_what_came_of_its_event_then_the_error() -> None:
    response = Written()
    lines = [b"event: content_block_delta\n", b"data: {}\r\n"]
    await _end_with_error(response, lines, "upstream connection lost mid-stream")  # type: ignore[arg-type]
    assert response.data == b"event: content_block_delta\ndata: {}\r\n" + LOST


@asynccontextmanager
async def held_stream(stack: Stack, tail: bytes = b"") -> AsyncIterator[None]:
    """A streamed call whose upstream sends STREAM + ``tail`` and then holds its stream
    open: the body runs once the client has all of it; the stream ends after it (with
    nothing more)."""
    stack.upstream.stream = STREAM + tail
    stack.upstream.held = True
    body = {**COUNT, "max_tokens": 64, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/messages", json=body, headers=stack.headers()) as resp,
    ):
        try:
            assert await resp.content.readexactly(len(STREAM + tail)) == STREAM + tail
            yield
        finally:
            stack.upstream.hold.set()
        assert await resp.read() == b""


async def _settled_while_open(stack: Stack, redis: Redis, tail: bytes) -> dict[str, str]:
    """The budget once the reservation is settled (bounded wait), before the stream ends."""
    async with held_stream(stack, tail):
        async with asyncio.timeout(30):
            while await redis.hlen("budgeter:{t:ex}:resv"):  # noqa: ASYNC110 - a bounded poll of state the proxy changes
                await asyncio.sleep(0.01)
        return await redis.hgetall("budgeter:{t:ex}:budget")


@pytest.mark.parametrize(
    "tail",
    [STOP, b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'],
    ids=["message_stop", "error"],
)
async def test_a_stream_is_settled_at_its_last_event_not_when_the_upstream_closes(
    stack: Stack, redis: Redis, tail: bytes
) -> None:
    budget = await _settled_while_open(stack, redis, tail)
    assert (budget["day:used"], budget["day:reserved"]) == ("15", "0")


async def test_data_lines_without_a_space_and_events_that_are_not_json_are_read_and_passed_on(
    stack: Stack, redis: Redis
) -> None:
    """``data:{...}`` is SSE as much as ``data: {...}``; a data line that is not JSON
    (and bytes that are not UTF-8, in a comment) pass through and do not end the stream."""
    stream = (
        b'event: message_start\ndata:{"type":"message_start","message":'
        b'{"usage":{"input_tokens":20,"output_tokens":1}}}\n\n'
        b": \xff\xfe not utf-8\n\n"
        b"event: odd\ndata: not json\n\n"
        b'event: message_delta\ndata:{"type":"message_delta","usage":{"output_tokens":9}}\n\n'
        b'event: message_stop\ndata:{"type":"message_stop"}\n\n'
    )
    stack.upstream.stream = stream
    status, _, got = await streamed(stack)
    assert (status, got) == (200, stream)
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("29", "0")  # 20 in, 9 out


async def test_a_streamed_calls_tokens_are_counted_under_its_model(stack: Stack) -> None:
    stack.upstream.stream = STREAM + STOP
    status, _, _ = await streamed(stack)
    assert status == 200
    async with aiohttp.ClientSession() as http, http.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    series = 'budgeter_tokens_total{kind="%s",model="claude-test",tenant="ex"}'
    assert f"{series % 'input'} 10.0" in text
    assert f"{series % 'output'} 5.0" in text
    # actual / reserved: 15 of 7 counted + 64 max_tokens
    assert "budgeter_estimate_error_ratio_count 1.0" in text
    assert f"budgeter_estimate_error_ratio_sum {15 / 71}" in text


async def test_an_event_the_proxy_cannot_read_ends_the_stream_with_an_error_event(
    stack: Stack, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A usage figure that is not a number: the client gets what came before and an error
    event, and the stream ends (before, the client waited on it forever); the call is
    charged what was known, its counted input."""
    bad = (
        b'event: message_start\ndata: {"type":"message_start","message":'
        b'{"usage":{"input_tokens":[1]}}}\n\n'
    )
    stack.upstream.stream = bad + STOP
    with caplog.at_level(logging.INFO, logger="budgeter.proxy"):
        async with asyncio.timeout(30):
            status, _, got = await streamed(stack)
    internal = LOST.replace(b"upstream connection lost mid-stream", b"internal error mid-stream")
    assert (status, got) == (200, bad + internal)
    failed = [r for r in caplog.records if r.name == "budgeter.proxy"]
    assert [(r.levelno, r.getMessage()) for r in failed] == [(logging.ERROR, "stream failed")]
    assert failed[0].__dict__["tenant"] == "ex" and failed[0].exc_info is not None
    assert str(failed[0].__dict__["reservation"]).startswith("sync:req_")
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("7", "0")  # the count: 7


NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("decision", "status", "error_type", "message", "headers"),
    [
        (
            Decision("DEFER", NOW + 2_500, "rate:rpm", NOW),
            429,
            "rate_limit_error",
            "the rpm rate limit reached; fits again at 2023-11-14T22:13:22Z",
            {"h": "v", "retry-after": "3", "x-should-retry": "true"},
        ),
        (  # a limit of the model called: the message names the model
            Decision("DEFER", NOW + 2_500, "rate:model:rpm", NOW),
            429,
            "rate_limit_error",
            "the rpm rate limit of model claude-m reached; fits again at 2023-11-14T22:13:22Z",
            {"h": "v", "retry-after": "3", "x-should-retry": "true"},
        ),
        (  # waiting for in-flight work: no time known, retry in a second
            Decision("DEFER", 0, "rate:rpm", NOW),
            429,
            "rate_limit_error",
            "the rpm rate limit reached",
            {"h": "v", "retry-after": "1", "x-should-retry": "true"},
        ),
        (
            Decision("REJECT", NOW + 86_400_000, "exhausted:day", NOW, "120/100"),
            429,
            "budget_exhausted_error",
            "the day token budget exhausted (120 of 100 used); it resets at 2023-11-15T22:13:20Z",
            {"h": "v", "x-should-retry": "false"},
        ),
        (
            Decision("REJECT", 0, "key:model_not_allowed", NOW, "claude-x"),
            403,
            "permission_error",
            "model 'claude-m' is not in the allowed_models of this API key",
            {"h": "v"},
        ),
        (
            Decision("REJECT", 0, "unknown_tenant", NOW),
            404,
            "not_found_error",
            "this key's tenant has no policy (tenant not found)",
            {"h": "v"},
        ),
    ],
    ids=[
        "defer",
        "defer_of_model",
        "defer_for_settles",
        "exhausted",
        "model_not_allowed",
        "unknown_tenant",
    ],
)
def test_each_refusal_has_its_status_type_message_and_headers(
    decision: Decision, status: int, error_type: str, message: str, headers: dict[str, str]
) -> None:
    refusal = _refusal(decision, "claude-m", {"h": "v"})
    assert (refusal.status, refusal.error_type) == (status, error_type)
    assert refusal.message == message
    assert refusal.headers == headers


def test_a_refusal_for_a_model_without_a_price_names_the_model_and_is_a_400() -> None:
    refusal = _refusal(Decision("REJECT", 0, "unpriced_model", NOW), "claude-m", {"h": "v"})
    assert (refusal.status, refusal.error_type) == (400, "invalid_request_error")
    assert refusal.message.startswith("model 'claude-m' has no price (genai-prices ")
    assert refusal.headers == {"h": "v"}


async def test_a_line_of_spaces_inside_an_event_does_not_end_it(stack: Stack, redis: Redis) -> None:
    """Only an empty line ends an SSE event; a line of spaces is a field line (ignored)."""
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":'
        b'{"usage":{"input_tokens":20,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta",\n  \n'
        b'data: "usage":{"output_tokens":9}}\n\n' + STOP
    )
    stack.upstream.stream = stream
    status, _, got = await streamed(stack)
    assert (status, got) == (200, stream)
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("29", "0")  # 20 in, 9 out


async def test_a_count_that_fails_unexpectedly_is_logged_as_itself(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rate-headers read beside the count is set aside and the error goes on as it
    was raised: a 500, logged with its own exception."""

    async def boom(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(UpstreamClient, "count_tokens_raw", boom)
    with caplog.at_level(logging.ERROR, logger="budgeter.api"):
        status, _, text = await post(stack, "/v1/messages/count_tokens", COUNT)
    assert (status, error_of(text)) == (500, ("api_error", "internal server error"))
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert logged[0].exc_info[0] is RuntimeError


async def asked(stack: Stack, **extra: object) -> tuple[int, dict[str, str], bytes]:
    body = {**COUNT, "max_tokens": 64, **extra}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{stack.url}/v1/messages",
            json=body,
            headers=stack.headers(**{"anthropic-beta": "beta-a"}),
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def settled(redis: Redis) -> dict[str, str]:
    """The tenant's budget once its reservation is settled (the settle runs after the
    answer has gone out; a bounded wait)."""
    async with asyncio.timeout(30):
        while await redis.hlen("budgeter:{t:ex}:resv"):  # noqa: ASYNC110 - a bounded poll of state the proxy changes
            await asyncio.sleep(0.01)
    return await redis.hgetall("budgeter:{t:ex}:budget")


async def test_an_answer_is_passed_on_byte_for_byte_with_its_ids_and_settled_at_its_usage(
    stack: Stack, redis: Redis
) -> None:
    status, headers, got = await asked(stack)
    assert (status, got) == (200, ANSWER)
    assert headers["Content-Type"] == "application/json"
    assert headers[UPSTREAM_ID] == "req_up_answer"
    assert headers["request-id"].startswith("req_") and headers["request-id"] != "req_up_answer"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert stack.upstream.seen[-1][0] == "/v1/messages"
    assert stack.upstream.seen[-1][2] == "beta-a"  # sent with the caller's betas
    budget = await settled(redis)
    assert (budget["day:used"], budget["day:reserved"]) == ("13", "0")  # 10 in, 3 out
    async with aiohttp.ClientSession() as http, http.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    series = 'budgeter_tokens_total{kind="%s",model="claude-test",tenant="ex"}'
    assert f"{series % 'input'} 10.0" in text
    assert f"{series % 'output'} 3.0" in text
    assert f"budgeter_estimate_error_ratio_sum {13 / 71}" in text  # of 7 counted + 64
    assert 'budgeter_jobs_total{outcome="succeeded",tenant="ex"} 1.0' in text


async def test_a_call_that_fails_unexpectedly_once_sent_is_charged_in_full(
    stack: Stack, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an upstream error: the request may have reached the upstream and been served,
    so its reservation (7 counted + 64 max_tokens) is charged in full, never released."""

    async def boom(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(UpstreamClient, "create_message_raw", boom)
    status, _, got = await asked(stack)
    assert (status, error_of(got.decode())) == (500, ("api_error", "internal server error"))
    budget = await redis.hgetall("budgeter:{t:ex}:budget")
    assert (budget["day:used"], budget["day:reserved"]) == ("71", "0")
    assert await redis.hlen("budgeter:{t:ex}:resv") == 0


async def test_an_answer_whose_rate_headers_cannot_be_read_goes_out_without_them(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rate headers are read beside the upstream call; that read failing costs the
    headers only (a warning naming the error), never the answer."""

    async def unreadable(*_args: object, **_kw: object) -> dict[str, str]:
        raise RuntimeError("no headers")

    monkeypatch.setattr("budgeter.api.proxy.tenant_ratelimit_headers", unreadable)
    with caplog.at_level(logging.WARNING, logger="budgeter.proxy"):
        status, headers, got = await asked(stack)
    assert (status, got) == (200, ANSWER)
    assert "anthropic-ratelimit-requests-limit" not in headers
    assert headers[UPSTREAM_ID] == "req_up_answer"
    warned = [r for r in caplog.records if r.name == "budgeter.proxy"]
    assert [(r.levelno, r.getMessage()) for r in warned] == [
        (logging.WARNING, "rate-limit headers unavailable: RuntimeError")
    ]


async def test_an_admitted_call_is_counted_as_its_tenants_admit_and_marked_sent_at_once(
    stack: Stack, redis: Redis
) -> None:
    """While its stream is open, the reservation is already marked sent (the reaper would
    charge it in full: the upstream has it); the decision is counted under the tenant."""
    async with held_stream(stack):
        assert await redis.hvals("budgeter:{t:ex}:resv_sent") == ["1"]
    async with aiohttp.ClientSession() as http, http.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    assert (
        'budgeter_admission_decisions_total{decision="ADMIT",reason="none",tenant="ex"} 1.0' in text
    )


async def test_a_call_without_max_tokens_is_a_400_naming_the_field(stack: Stack) -> None:
    status, _, text = await post(stack, "/v1/messages", COUNT)
    assert status == 400
    assert error_of(text) == ("invalid_request_error", "max_tokens: Field required")
    assert [path for path, _, _ in stack.upstream.seen] == []


async def test_a_calls_reservation_is_held_for_the_upstream_timeout_and_the_grace(
    stack: Stack, redis: Redis
) -> None:
    """The reaper acts on a proxied call's reservation only after the upstream timeout
    and the grace (600 + 30 s by default), not the admission's own default of 90 s."""
    async with held_stream(stack):
        seconds, micros = await redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        deadlines = await redis.zrange("budgeter:{t:ex}:resv_deadline", 0, -1, withscores=True)
    assert len(deadlines) == 1
    held_ms = deadlines[0][1] - now_ms
    assert 630_000 - 5_000 <= held_ms <= 630_000


async def test_a_settle_that_fails_after_the_answer_is_logged_with_its_reservation(
    stack: Stack, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails(*_args: object, **_kw: object) -> None:
        raise RuntimeError("settle")

    monkeypatch.setattr(Admission, "settle", fails)
    with caplog.at_level(logging.WARNING, logger="budgeter"):
        status, _, got = await asked(stack)
        assert (status, got) == (200, ANSWER)  # the answer went out first
        async with asyncio.timeout(30):
            while not [r for r in caplog.records if r.getMessage().startswith("settle failed")]:  # noqa: ASYNC110 - a bounded poll of the proxy's background settle
                await asyncio.sleep(0.01)
    failed = [r for r in caplog.records if r.getMessage().startswith("settle failed")]
    assert failed[0].getMessage() == (
        "settle failed: RuntimeError; the reaper charges the reservation in full"
    )
    assert str(failed[0].__dict__["reservation"]).startswith("sync:req_")
    assert await redis.hlen("budgeter:{t:ex}:resv") == 1  # left to the reaper


async def test_a_failed_side_task_set_aside_is_not_reported_as_never_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("side")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    assert task.done()
    _discard(task)
    pending = asyncio.ensure_future(asyncio.sleep(10))
    _discard(pending)
    await asyncio.sleep(0)
    assert pending.cancelled()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del task
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_call_whose_count_is_refused_gets_the_upstreams_refusal_and_its_id(
    stack: Stack, redis: Redis
) -> None:
    status, headers, got = await asked(stack, system="fail")
    assert (status, got.decode()) == (400, jsonio.dumps_str(REFUSAL))
    assert headers[UPSTREAM_ID] == "req_up_err"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert [path for path, _, _ in stack.upstream.seen] == ["/v1/messages/count_tokens"]
    assert await redis.hlen("budgeter:{t:ex}:resv") == 0  # nothing reserved


async def test_a_call_whose_count_fails_is_estimated_when_its_tenant_says_so(
    stack: Stack,
) -> None:
    policy = {"budgets": {"day": 100_000}, "rate": {"rpm": 50}, "allowed_betas": ["beta-a"]}
    async with aiohttp.ClientSession() as http:
        put = await http.put(
            f"{stack.url}/admin/tenants/ex",
            json={**policy, "on_count_failure": "estimate"},
            headers=ADMIN,
        )
        assert put.status in (200, 201), await put.text()
    status, _, got = await asked(stack, system="count500")
    assert (status, got) == (200, ANSWER)  # admitted on the local estimate
    async with aiohttp.ClientSession() as http, http.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    assert 'budgeter_count_tokens_estimated_total{tenant="ex"} 1.0' in text


async def test_a_settle_a_parked_job_waited_for_unparks_its_tenant_and_wakes_one_worker(
    stack: Stack, redis: Redis
) -> None:
    """A job of the tenant waited (DEFER) for the proxy's call in flight: when that call
    settles, the proxy ends the tenant's park and wakes one worker for it."""
    policy = {"budgets": {"day": 100_000}, "max_concurrency": 1, "allowed_betas": ["beta-a"]}
    async with aiohttp.ClientSession() as http:
        put = await http.put(f"{stack.url}/admin/tenants/ex", json=policy, headers=ADMIN)
        assert put.status in (200, 201), await put.text()
    store = BatchStore(redis)
    await store.create("ex", requests_for("ex", 1))
    async with held_stream(stack):
        waited = await Admission(redis).reserve("ex", "job-rid", 10, 10)
        assert (waited.kind, waited.reason, waited.until_ms) == ("DEFER", "concurrency", 0)
        await store.queue.pace("ex", waited.now_ms + 600_000)  # as the worker parks it
        await redis.delete("budgeter:{sched}:wake")
        assert await redis.zscore("budgeter:{sched}:parked", "ex") is not None
    async with asyncio.timeout(30):
        while await redis.zscore("budgeter:{sched}:parked", "ex") is not None:  # noqa: ASYNC110 - a bounded poll of the proxy's settle
            await asyncio.sleep(0.01)
    assert await redis.zscore("budgeter:{sched}:ready", "ex") is not None
    assert await redis.lrange("budgeter:{sched}:wake", 0, -1) == ["ex"]
