"""UpstreamClient against a scripted capturing server, a closed port, and the mock upstream."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from budgeter.api.schemas import CountTokensBody
from budgeter.domain.messages import COUNT_TOKENS_FIELDS
from budgeter.upstream.client import UpstreamClient, UpstreamError, count_tokens_body
from budgeter.upstream.mock import MockConfig, create_app

ServerFactory = Callable[..., Awaitable[TestServer]]
PARAMS: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hello"}],
}
MESSAGE = {"id": "msg_1", "type": "message", "usage": {"input_tokens": 5, "output_tokens": 7}}


@dataclass
class Scripted:
    """Answers popped from ``replies`` (status, json, headers); the last one repeats."""

    replies: list[tuple[int, Any, dict[str, str]]]
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {"path": request.path, "headers": request.headers.copy(), "body": await request.json()}
        )
        status, payload, headers = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return web.json_response(payload, status=status, headers=headers)


@dataclass
class Recorder:
    delays: list[float] = field(default_factory=list)
    observed: list[tuple[str, str, float]] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    def observe(self, route: str, status: str, seconds: float) -> None:
        self.observed.append((route, status, seconds))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def serve(aiohttp_server: ServerFactory, script: Scripted, prefix: str = "") -> str:
    app = web.Application()
    app.router.add_post(prefix + "/v1/messages", script.handle)
    app.router.add_post(prefix + "/v1/messages/count_tokens", script.handle)
    server = await aiohttp_server(app)
    return str(server.make_url(prefix))


def make_client(
    session: aiohttp.ClientSession, base_url: str, recorder: Recorder, **kwargs: Any
) -> UpstreamClient:
    return UpstreamClient(
        session,
        base_url,
        "sk-test",
        sleep=recorder.sleep,
        rand=lambda: 0.5,
        observe=recorder.observe,
        **kwargs,
    )


def error_body(kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": f"upstream says {kind}"}}


async def test_sends_exact_headers_and_returns_message(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted([(200, MESSAGE, {})])
    client = make_client(session, await serve(aiohttp_server, script) + "/", recorder)
    assert await client.create_message(PARAMS) == MESSAGE
    [request] = script.requests
    assert request["path"] == "/v1/messages"
    assert request["body"] == PARAMS
    headers = request["headers"]
    assert headers["x-api-key"] == "sk-test"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers
    assert [(route, status) for route, status, _ in recorder.observed] == [("messages", "200")]
    assert recorder.observed[0][2] >= 0
    assert "sk-test" not in repr(client)


async def test_count_tokens_sends_only_count_fields(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted([(200, {"input_tokens": 42}, {})])
    client = make_client(session, await serve(aiohttp_server, script), recorder)
    params = {
        **PARAMS,
        "temperature": 0.2,
        "stream": False,
        "metadata": {"user_id": "u"},
        "system": "be brief",
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    assert await client.count_tokens(params) == 42
    [request] = script.requests
    assert request["path"] == "/v1/messages/count_tokens"
    assert request["body"] == count_tokens_body(params)
    assert set(request["body"]) == {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
    }
    assert recorder.observed[0][:2] == ("count_tokens", "200")


async def test_base_url_with_path_prefix(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted([(200, {"input_tokens": 3}, {})])
    base = await serve(aiohttp_server, script, prefix="/anthropic")
    assert base.endswith("/anthropic")
    client = make_client(session, base + "/", recorder)
    assert await client.count_tokens(PARAMS) == 3
    assert script.requests[0]["path"] == "/anthropic/v1/messages/count_tokens"


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
async def test_retries_retryable_status_then_succeeds(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    recorder: Recorder,
    status: int,
) -> None:
    script = Scripted([(status, error_body("api_error"), {}), (status, {}, {}), (200, MESSAGE, {})])
    client = make_client(session, await serve(aiohttp_server, script), recorder)
    assert await client.create_message(PARAMS) == MESSAGE
    assert len(script.requests) == 3
    # full jitter with rand() == 0.5: 0.5 * 0.5 * 2**(attempt-1)
    assert recorder.delays == [0.25, 0.5]
    assert [s for _, s, _ in recorder.observed] == [str(status), str(status), "200"]


async def test_retry_after_is_honoured(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted(
        [
            (429, error_body("rate_limit_error"), {"retry-after": "2.5"}),
            (529, error_body("overloaded_error"), {"retry-after-ms": "1500"}),
            (503, {}, {"retry-after": "1000"}),  # capped at backoff_max_s * 2
            (200, MESSAGE, {}),
        ]
    )
    client = make_client(session, await serve(aiohttp_server, script), recorder, backoff_max_s=8)
    assert await client.create_message(PARAMS) == MESSAGE
    assert recorder.delays == [2.5, 1.5, 16.0]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
    ],
)
async def test_final_client_errors_are_not_retried(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    recorder: Recorder,
    status: int,
    kind: str,
) -> None:
    script = Scripted([(status, error_body(kind), {})])
    client = make_client(session, await serve(aiohttp_server, script), recorder)
    with pytest.raises(UpstreamError) as caught:
        await client.create_message(PARAMS)
    assert caught.value.status == status
    assert caught.value.body == error_body(kind)
    assert caught.value.retryable is False
    assert len(script.requests) == 1
    assert recorder.delays == []


async def test_non_anthropic_error_body_is_synthesized(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted([(422, {"detail": "nope"}, {})])
    client = make_client(session, await serve(aiohttp_server, script), recorder)
    with pytest.raises(UpstreamError) as caught:
        await client.count_tokens(PARAMS)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"


async def test_exhausted_retries_are_retryable(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    script = Scripted([(529, error_body("overloaded_error"), {})])
    client = make_client(
        session, await serve(aiohttp_server, script), recorder, max_attempts=4, backoff_max_s=1.0
    )
    with pytest.raises(UpstreamError) as caught:
        await client.create_message(PARAMS)
    assert caught.value.status == 529
    assert caught.value.retryable is True
    assert caught.value.body == error_body("overloaded_error")
    assert len(script.requests) == 4
    assert recorder.delays == [0.25, 0.5, 0.5]  # backoff capped at backoff_max_s
    assert [s for _, s, _ in recorder.observed] == ["529"] * 4


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_error_is_retried(
    session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    client = make_client(session, f"http://127.0.0.1:{closed_port()}", recorder, max_attempts=3)
    with pytest.raises(UpstreamError) as caught:
        await client.count_tokens(PARAMS)
    assert caught.value.status == 0
    assert caught.value.retryable is True
    assert caught.value.body["type"] == "error"
    assert recorder.observed and [s for _, s, _ in recorder.observed] == ["error"] * 3
    assert len(recorder.delays) == 2
    assert await client.ping() is False


async def test_timeout_is_retried_for_count_tokens_but_not_for_messages(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    release = asyncio.Event()

    async def hang(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response(MESSAGE)

    app = web.Application()
    app.router.add_post("/v1/messages", hang)
    app.router.add_post("/v1/messages/count_tokens", hang)
    server = await aiohttp_server(app)
    client = make_client(
        session, str(server.make_url("")), recorder, timeout_s=0.05, max_attempts=2
    )
    client.count_timeout_s = 0.05
    try:
        with pytest.raises(UpstreamError) as counted:
            await client.count_tokens(PARAMS)
        with pytest.raises(UpstreamError) as sent:
            await client.create_message(PARAMS)
    finally:
        release.set()
    assert counted.value.status == 0 and counted.value.retryable is True
    assert counted.value.body["error"]["type"] == "timeout_error"
    assert not counted.value.maybe_served
    # a message that was sent may have been generated and billed: never sent twice
    assert sent.value.status == 0 and sent.value.maybe_served
    assert [s for _, s, _ in recorder.observed] == ["error", "error", "error"]


async def test_against_mock_upstream(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    server = await aiohttp_server(create_app(MockConfig(api_key="sk-test")))
    client = make_client(session, str(server.make_url("")), recorder)
    params = {**PARAMS, "system": "be brief", "temperature": 0.1}
    counted = await client.count_tokens(params)
    message = await client.create_message(params)
    assert message["usage"]["input_tokens"] == counted
    assert message["type"] == "message"
    assert await client.ping() is True

    wrong_key = UpstreamClient(session, str(server.make_url("")), "bad", sleep=recorder.sleep)
    with pytest.raises(UpstreamError) as caught:
        await wrong_key.create_message(PARAMS)
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert caught.value.body["error"]["type"] == "authentication_error"


async def test_against_faulty_mock_upstream(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, recorder: Recorder
) -> None:
    config = MockConfig(fault_rate=1.0, fault_kinds=["429"], retry_after_s=3)
    server = await aiohttp_server(create_app(config))
    client = make_client(session, str(server.make_url("")), recorder, max_attempts=3)
    with pytest.raises(UpstreamError) as caught:
        await client.create_message(PARAMS)
    assert caught.value.retryable is True
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert recorder.delays == [3.0, 3.0]


# --- one retry loop: create_message and open_stream behave alike, attempt for attempt ---


async def _via_message(client: UpstreamClient) -> object:
    return await client.create_message(PARAMS)


async def _via_stream(client: UpstreamClient) -> object:
    async with client.open_stream(PARAMS) as response:
        return await response.json()


PATHS: dict[str, Callable[[UpstreamClient], Awaitable[object]]] = {
    "messages": _via_message,
    "messages_stream": _via_stream,
}


@dataclass
class Run:
    """What one call did, with its route name (the metric label) taken out of its log."""

    outcome: object  # the answer, or (status, body, retryable, maybe_served) of the error
    delays: list[float]
    statuses: list[str]
    warnings: list[str]
    paused: list[tuple[str, float]]


async def run_path(
    route: str,
    session: aiohttp.ClientSession,
    base_url: str,
    caplog: pytest.LogCaptureFixture,
    **kwargs: Any,
) -> Run:
    recorder = Recorder()
    paused: list[tuple[str, float]] = []

    async def on_rate_limited(model: str, seconds: float) -> None:
        paused.append((model, seconds))

    client = make_client(session, base_url, recorder, on_rate_limited=on_rate_limited, **kwargs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="budgeter.upstream"):
        try:
            outcome: object = await PATHS[route](client)
        except UpstreamError as exc:
            outcome = (exc.status, exc.body, exc.retryable, exc.maybe_served)
    assert {observed_route for observed_route, _, _ in recorder.observed} <= {route}
    return Run(
        outcome=outcome,
        delays=recorder.delays,
        statuses=[status for _, status, _ in recorder.observed],
        warnings=[
            record.getMessage().replace(f"upstream {route} ", "upstream <route> ")
            for record in caplog.records
            if record.name == "budgeter.upstream" and record.levelno >= logging.WARNING
        ],
        paused=paused,
    )


async def run_both(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    replies: list[tuple[int, Any, dict[str, str]]],
    **kwargs: Any,
) -> tuple[Run, Run, int, int]:
    """The same scripted answers, once through create_message and once through open_stream;
    also how many requests each path sent."""
    runs: list[Run] = []
    sent: list[int] = []
    for route in PATHS:
        script = Scripted(list(replies))
        runs.append(
            await run_path(route, session, await serve(aiohttp_server, script), caplog, **kwargs)
        )
        sent.append(len(script.requests))
        assert all(request["body"]["model"] == PARAMS["model"] for request in script.requests)
    return runs[0], runs[1], sent[0], sent[1]


async def test_message_and_stream_share_backoff_retry_after_pause_and_log_lines(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[tuple[int, Any, dict[str, str]]] = [
        (429, error_body("rate_limit_error"), {"retry-after": "2.5"}),
        (529, error_body("overloaded_error"), {"retry-after-ms": "1500"}),
        (503, {}, {"retry-after": "1000"}),  # capped at backoff_max_s * 2
        (500, error_body("api_error"), {}),  # jittered: 0.5 * min(8, 0.5 * 2**3)
        (200, MESSAGE, {}),
    ]
    message, stream, sent_message, sent_stream = await run_both(
        aiohttp_server, session, caplog, replies, backoff_max_s=8
    )
    assert message == stream
    assert sent_message == sent_stream == 5
    assert message.outcome == MESSAGE
    assert message.delays == [2.5, 1.5, 16.0, 2.0]
    assert message.statuses == ["429", "529", "503", "500", "200"]
    assert message.paused == [("claude-sonnet-4-6", 2.5)]  # a 429 pauses the model
    assert message.warnings == [
        "upstream <route> failed on attempt 1 (HTTP 429); retrying in 2.50s, 4 tries left",
        "upstream <route> failed on attempt 2 (HTTP 529); retrying in 1.50s, 3 tries left",
        "upstream <route> failed on attempt 3 (HTTP 503); retrying in 16.00s, 2 tries left",
        "upstream <route> failed on attempt 4 (HTTP 500); retrying in 2.00s, 1 tries left",
    ]


async def test_message_and_stream_exhaust_the_same_attempts(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[tuple[int, Any, dict[str, str]]] = [
        (529, error_body("overloaded_error"), {"retry-after": "1"})
    ]
    message, stream, sent_message, sent_stream = await run_both(
        aiohttp_server, session, caplog, replies, max_attempts=3
    )
    assert message == stream
    assert sent_message == sent_stream == 3
    assert message.outcome == (529, error_body("overloaded_error"), True, False)
    assert message.delays == [1.0, 1.0]
    assert message.warnings[-1] == "upstream <route> failed on attempt 3 (HTTP 529); no tries left"
    assert len(message.warnings) == 3


async def test_message_and_stream_refuse_a_final_status_alike(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[tuple[int, Any, dict[str, str]]] = [(404, {"detail": "no"}, {})]
    message, stream, sent_message, sent_stream = await run_both(
        aiohttp_server, session, caplog, replies
    )
    assert message == stream
    assert sent_message == sent_stream == 1
    body = {"type": "error", "error": {"type": "not_found_error", "message": "upstream HTTP 404"}}
    assert message.outcome == (404, body, False, False)
    assert message.delays == [] and message.warnings == []


async def drop_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one whole request, then hang up without answering."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("fault", ["disconnect", "timeout"])
async def test_message_and_stream_lost_after_sending_are_maybe_served_and_not_resent(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    received = 0
    release = asyncio.Event()

    async def hang(_request: web.Request) -> web.Response:
        nonlocal received
        received += 1
        await release.wait()
        return web.json_response(MESSAGE)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        received += 1
        await drop_after_request(reader, writer)

    if fault == "disconnect":
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    else:
        app = web.Application()
        app.router.add_post("/v1/messages", hang)
        base_url = str((await aiohttp_server(app)).make_url(""))
    runs: list[Run] = []
    sent: list[int] = []
    try:
        for route in PATHS:
            received = 0
            runs.append(await run_path(route, session, base_url, caplog, timeout_s=0.05))
            sent.append(received)
    finally:
        release.set()
        if fault == "disconnect":
            server.close()
            await server.wait_closed()
    message, stream = runs
    assert message == stream
    assert sent == [1, 1]  # sent once, never a second time: it may have been generated
    status, body, retryable, maybe_served = message.outcome  # type: ignore[misc]
    assert (status, retryable, maybe_served) == (0, True, True)
    kind = "timeout_error" if fault == "timeout" else "api_error"
    assert body["error"]["type"] == kind
    assert message.delays == [] and message.statuses == ["error"]
    [warning] = message.warnings
    assert warning.startswith("upstream <route> call lost after sending (")


async def test_message_and_stream_retry_a_refused_connection_alike(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}"
    message, stream = [
        await run_path(route, session, base_url, caplog, max_attempts=3) for route in PATHS
    ]
    assert message == stream
    status, body, retryable, maybe_served = message.outcome  # type: ignore[misc]
    assert (status, retryable, maybe_served) == (0, True, False)  # never sent: safe to retry
    assert body["error"]["type"] == "api_error"
    assert message.statuses == ["error"] * 3
    assert message.delays == [0.25, 0.5]
    assert [line.split(" (")[0] for line in message.warnings] == [
        "upstream <route> failed on attempt 1",
        "upstream <route> failed on attempt 2",
        "upstream <route> failed on attempt 3",
    ]


async def test_count_tokens_lost_after_sending_is_retried(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """count_tokens generates nothing: a lost answer is simply asked again."""
    received = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        received += 1
        await drop_after_request(reader, writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    recorder = Recorder()
    port = server.sockets[0].getsockname()[1]
    client = make_client(session, f"http://127.0.0.1:{port}", recorder, max_attempts=3)
    try:
        with (
            caplog.at_level(logging.INFO, logger="budgeter.upstream"),
            pytest.raises(UpstreamError) as caught,
        ):
            await client.count_tokens(PARAMS)
    finally:
        server.close()
        await server.wait_closed()
    assert received == 3
    assert (caught.value.status, caught.value.maybe_served) == (0, False)
    assert not any("lost after sending" in record.getMessage() for record in caplog.records)


def test_count_tokens_fields_have_one_definition() -> None:
    assert set(CountTokensBody.model_fields) == COUNT_TOKENS_FIELDS
    assert set(count_tokens_body({**PARAMS, "stream": True, "x": 1})) == {"model", "messages"}
