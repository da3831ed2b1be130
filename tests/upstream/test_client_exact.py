"""The upstream client's small parts, exactly (issue 21: mutmut's run of 2026-12-07 left
them unasserted): the retry-after headers it honours, what it takes for an Anthropic error
body, the pause it reports on a 429, and the readiness ping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from budgeter.serving import serve_app
from budgeter.upstream import client as client_module
from budgeter.upstream.client import (
    UpstreamClient,
    UpstreamError,
    _is_error_body,
    _lost,
    _retry_after_s,
    count_tokens_body,
)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),  # the finer one first
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),  # garbage: the next header
        ({"retry-after": "0"}, 0.0),  # "now" is a value
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # an HTTP-date: backoff
        ({}, None),
    ],
)
def test_the_retry_after_it_honours(headers: dict[str, str], seconds: float | None) -> None:
    assert _retry_after_s(CIMultiDict(headers)) == seconds


@pytest.mark.parametrize(
    ("payload", "is_error"),
    [
        ({"type": "error", "error": {"type": "overloaded_error"}}, True),
        ({"type": "error", "error": "overloaded"}, False),
        ({"type": "error"}, False),
        ({"type": "message", "error": {"type": "x"}}, False),
        ({"error": {"type": "x"}}, False),
        ([{"type": "error", "error": {}}], False),
    ],
)
def test_what_it_takes_for_an_anthropic_error_body(payload: object, is_error: bool) -> None:
    assert _is_error_body(payload) is is_error  # type: ignore[arg-type]


async def test_a_429_reports_the_models_pause_and_a_report_that_fails_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    paused: list[tuple[str, float]] = []

    async def record(model: str, seconds: float) -> None:
        paused.append((model, seconds))

    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, "http://127.0.0.1:9", "k", on_rate_limited=record)
        await client._rate_limited({"model": "claude-m"}, 2.5)
        await client._rate_limited({"model": "claude-m"}, None)  # no retry-after: 1 s
        await client._rate_limited({}, 0.0)
        assert paused == [("claude-m", 2.5), ("claude-m", 1.0), ("", 0.0)]

        async def fails(_model: str, _seconds: float) -> None:
            raise RuntimeError("redis away")

        client.on_rate_limited = fails
        with caplog.at_level(logging.WARNING, logger="budgeter.upstream"):
            await client._rate_limited({"model": "claude-m"}, 1.0)  # never raises
    warned = [r for r in caplog.records if r.name.startswith("budgeter.upstream")]
    assert [(r.levelno, r.getMessage()) for r in warned] == [
        (logging.WARNING, "could not record the upstream's pause")
    ]
    assert warned[0].exc_info is not None and warned[0].exc_info[0] is RuntimeError


@pytest.fixture
async def root() -> AsyncIterator[tuple[str, list[int], asyncio.Event]]:
    """An upstream whose ``GET /`` answers the next status of the list, or (an empty
    list) holds the request until the event is set."""
    statuses: list[int] = []
    release = asyncio.Event()

    async def answer(_request: web.Request) -> web.Response:
        if not statuses:
            await release.wait()
            return web.Response(status=200)
        return web.Response(status=statuses.pop(0))

    app = web.Application()
    app.router.add_get("/", answer)
    async with serve_app(app, "127.0.0.1", 0) as port:
        try:
            yield f"http://127.0.0.1:{port}", statuses, release
        finally:
            release.set()


async def test_the_ping_is_ready_below_500_and_not_at_it(
    root: tuple[str, list[int], asyncio.Event],
) -> None:
    url, statuses, _ = root
    statuses.extend([200, 404, 499, 500, 503])
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, url, "k")
        assert [await client.ping() for _ in range(5)] == [True, True, True, False, False]


async def test_a_ping_that_gets_no_answer_gives_up_at_the_count_timeout(
    root: tuple[str, list[int], asyncio.Event], caplog: pytest.LogCaptureFixture
) -> None:
    url, _, _ = root  # no status: the upstream holds the request
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, url, "k", count_timeout_s=0.2)
        with caplog.at_level(logging.WARNING, logger="budgeter.upstream"):
            async with asyncio.timeout(30):
                assert await client.ping() is False
    warned = [r for r in caplog.records if r.name.startswith("budgeter.upstream")]
    assert [(r.levelno, r.getMessage()) for r in warned] == [
        (logging.WARNING, "upstream ping failed: TimeoutError")
    ]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}},
            "upstream 400: invalid_request_error: bad",
        ),
        (0, {"type": "error", "error": {"type": "api_error"}}, "upstream error: api_error: None"),
        (502, {"error": "not an object"}, "upstream 502: None: None"),
        (503, {}, "upstream 503: None: None"),
    ],
)
def test_an_upstream_errors_words_name_its_status_type_and_message(
    status: int, body: dict[str, object], message: str
) -> None:
    assert str(UpstreamError(status, body, retryable=False)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("route", "exc", "error", "served"),
    [
        ("messages", TimeoutError(), ("timeout_error", "upstream timed out: TimeoutError"), True),
        (
            "messages",
            aiohttp.ServerDisconnectedError(),
            ("api_error", "upstream unreachable: ServerDisconnectedError"),
            True,
        ),
        (
            "count_tokens",
            TimeoutError(),
            ("timeout_error", "upstream timed out: TimeoutError"),
            False,
        ),
        (
            "messages",
            aiohttp.ConnectionTimeoutError(),
            ("timeout_error", "upstream timed out: ConnectionTimeoutError"),
            False,
        ),  # never sent
    ],
)
def test_a_call_that_got_no_answer_says_why_and_whether_it_may_have_been_served(
    route: str,
    exc: aiohttp.ClientError | TimeoutError,
    error: tuple[str, str],
    served: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="budgeter.upstream"):
        lost = _lost(route, exc)
    assert (lost.status, lost.retryable, lost.maybe_served) == (0, True, served)
    assert lost.body == {"type": "error", "error": {"type": error[0], "message": error[1]}}
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("budgeter.upstream")]
    name = type(exc).__name__
    assert warned == ([f"upstream {route} call lost after sending ({name})"] if served else [])


Observed = list[tuple[str, str]]


def observing(
    session: aiohttp.ClientSession, url: str, **kw: float
) -> tuple[UpstreamClient, Observed]:
    seen: Observed = []

    def observe(route: str, status: str, seconds: float) -> None:
        assert seconds >= 0
        seen.append((route, status))

    return UpstreamClient(session, url, "k", observe=observe, **kw), seen


@pytest.fixture
async def listing() -> AsyncIterator[tuple[str, list[int]]]:
    """An upstream whose ``GET /`` answers a JSON object with the next status of the list."""
    statuses: list[int] = []

    async def answer(_request: web.Request) -> web.Response:
        return web.json_response({"data": []}, status=statuses.pop(0))

    app = web.Application()
    app.router.add_get("/", answer)
    async with serve_app(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}", statuses


async def test_a_get_answers_2xx_and_raises_on_any_other_status_recording_each(
    listing: tuple[str, list[int]],
) -> None:
    url, statuses = listing
    statuses.extend([200, 299, 300, 404])
    async with aiohttp.ClientSession() as session:
        client, seen = observing(session, url)
        for _ in (200, 299):
            assert (await client.get_json("/", {})).payload == {"data": []}
        for status in (300, 404):
            with pytest.raises(UpstreamError) as raised:
                await client.get_json("/", {})
            assert raised.value.status == status
    assert seen == [("models", "200"), ("models", "299"), ("models", "300"), ("models", "404")]


async def test_a_get_that_gets_no_answer_gives_up_at_the_count_timeout(
    root: tuple[str, list[int], asyncio.Event],
) -> None:
    url, _, _ = root  # no status: the upstream holds the request
    async with aiohttp.ClientSession() as session:
        client, seen = observing(session, url, count_timeout_s=0.2)
        async with asyncio.timeout(30):
            with pytest.raises(UpstreamError) as raised:
                await client.get_json("/", {})
    assert (raised.value.status, raised.value.retryable, raised.value.maybe_served) == (
        0,
        True,
        False,
    )
    assert raised.value.body["error"] == {
        "type": "timeout_error",
        "message": "upstream timed out: TimeoutError",
    }
    assert seen == [("models", "error")]


async def test_a_get_to_nobody_is_an_unreachable_error_recorded_once() -> None:
    async with aiohttp.ClientSession() as session:
        client, seen = observing(session, "http://127.0.0.1:9")
        with pytest.raises(UpstreamError) as raised:
            await client.get_json("/v1/models", {"limit": "1"})
    assert raised.value.status == 0 and not raised.value.maybe_served
    assert raised.value.body["error"] == {
        "type": "api_error",
        "message": "upstream unreachable: ClientConnectorError",
    }
    assert seen == [("models", "error")]


async def test_a_2xx_answer_that_is_not_json_is_a_final_api_error_with_its_request_id() -> None:
    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text="<html>", headers={"request-id": "req_html"})

    app = web.Application()
    app.router.add_get("/", answer)
    async with serve_app(app, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        client = UpstreamClient(session, f"http://127.0.0.1:{port}", "k")
        with pytest.raises(UpstreamError) as raised:
            await client.get_json("/", {})
    error = raised.value
    assert (error.status, error.retryable, error.request_id) == (200, False, "req_html")
    assert error.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream answered non-JSON"},
    }


# count_tokens, the retry loop's words and its timing (mutmut's survivors of 2026-12-07) --

Reply = tuple[int, object, dict[str, str]]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, list[Reply], list[object]]]:
    """An upstream whose POST routes answer the next (status, JSON, headers) of the list
    and keep each request body they got."""
    replies: list[Reply] = []
    bodies: list[object] = []

    async def answer(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        status, payload, headers = replies.pop(0)
        return web.json_response(payload, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/messages", answer)
    app.router.add_post("/v1/messages/count_tokens", answer)
    async with serve_app(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}", replies, bodies


@pytest.mark.parametrize(
    "payload",
    [{}, {"input_tokens": None}, {"input_tokens": True}, {"input_tokens": "12"}],
    ids=["missing", "null", "bool", "string"],
)
async def test_a_count_tokens_answer_without_input_tokens_is_a_final_api_error(
    scripted: tuple[str, list[Reply], list[object]], payload: dict[str, object]
) -> None:
    url, replies, bodies = scripted
    replies.append((200, payload, {"request-id": "req_count"}))
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, url, "k")
        with pytest.raises(UpstreamError) as raised:
            await client.count_tokens({"model": "claude-m", "messages": []})
    error = raised.value
    assert (error.status, error.retryable, error.maybe_served, error.request_id) == (
        200,
        False,
        False,
        "req_count",
    )
    assert error.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "count_tokens answer lacks input_tokens"},
    }
    assert str(error) == "upstream 200: api_error: count_tokens answer lacks input_tokens"
    assert bodies == [{"model": "claude-m", "messages": []}]  # asked once: final


@pytest.mark.parametrize(
    ("betas", "sent"),
    [
        ((), {"model": "claude-m"}),
        (("context-management-2025-06-27",), {"model": "claude-m", "context_management": {}}),
    ],
)
def test_count_tokens_sends_the_beta_only_fields_only_under_a_beta(
    betas: tuple[str, ...], sent: dict[str, object]
) -> None:
    params = {"model": "claude-m", "context_management": {}, "max_tokens": 5}
    assert count_tokens_body(params, betas) == sent


@pytest.mark.parametrize(
    ("route", "call"),
    [("count_tokens", "count_tokens_raw"), ("messages", "create_message_raw")],
)
async def test_a_300_reply_is_a_final_refusal_logged_with_its_route(
    scripted: tuple[str, list[Reply], list[object]],
    caplog: pytest.LogCaptureFixture,
    route: str,
    call: str,
) -> None:
    url, replies, bodies = scripted
    replies.append((300, {"input_tokens": 3}, {"request-id": "req_300"}))
    async with aiohttp.ClientSession() as session:
        client, seen = observing(session, url)
        with (
            caplog.at_level(logging.INFO, logger="budgeter.upstream"),
            pytest.raises(UpstreamError) as raised,
        ):
            await getattr(client, call)({"model": "claude-m"})
    error = raised.value
    assert (error.status, error.retryable, error.request_id) == (300, False, "req_300")
    assert error.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream HTTP 300"},
    }
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "budgeter.upstream"]
    assert said == [(logging.INFO, f"upstream {route} refused with HTTP 300 (final)")]
    assert seen == [(route, "300")]
    assert len(bodies) == 1


async def test_a_connection_error_is_retried_and_logged_by_the_name_of_its_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(
            session, "http://127.0.0.1:9", "k", max_attempts=2, sleep=sleep, rand=lambda: 0.5
        )
        with (
            caplog.at_level(logging.WARNING, logger="budgeter.upstream"),
            pytest.raises(UpstreamError) as raised,
        ):
            await client.count_tokens_raw({"model": "claude-m"})
    assert (raised.value.status, raised.value.retryable) == (0, True)
    assert delays == [0.25]  # 0.5 (rand) * 0.5 (base)
    said = [r.getMessage() for r in caplog.records if r.name == "budgeter.upstream"]
    assert said == [
        "upstream count_tokens failed on attempt 1 (ClientConnectorError); "
        "retrying in 0.25s, 1 tries left",
        "upstream count_tokens failed on attempt 2 (ClientConnectorError); no tries left",
    ]


class SteppingClock:
    """``perf_counter`` that moves ``step`` seconds on every reading."""

    def __init__(self, start: float, step: float) -> None:
        self.now = start
        self.step = step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


async def test_a_call_is_observed_for_the_time_it_took(
    listing: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, statuses = listing
    statuses.append(200)
    monkeypatch.setattr(client_module, "time", SteppingClock(1_000.0, 0.25))
    observed: list[tuple[str, str, float]] = []

    def observe(route: str, status: str, seconds: float) -> None:
        observed.append((route, status, seconds))

    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, url, "k", observe=observe)
        assert (await client.get_json("/", {})).payload == {"data": []}
    assert observed == [("models", "200", 0.25)]  # read at the start and at the end
