"""The deterministic mock Messages API: counting, validation, faults, streaming, stats, auth
(x-api-key or Authorization: Bearer, as the real API)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from budgeter.upstream.client import count_tokens_body
from budgeter.upstream.mock import MockConfig, count_input_tokens, create_app, output_tokens_for

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
PAYLOADS: list[dict[str, Any]] = [
    {"model": "m", "max_tokens": 512, "messages": [{"role": "user", "content": "Hello"}]},
    {
        "model": "m",
        "max_tokens": 100,
        "system": "You are concise.",
        "messages": [
            {"role": "user", "content": [IMAGE, {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "héllo wörld ✓ " * 40},
        ],
    },
    {
        "model": "m",
        "max_tokens": 3,
        "temperature": 0.5,
        "system": [{"type": "text", "text": "System as blocks."}],
        "tools": [{"name": "lookup", "description": "find", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "use the tool"}]}],
    },
]


async def post(client: TestClient[Any, Any], path: str, body: Any, **headers: str) -> Any:
    response = await client.post(path, json=body, headers=headers or HEADERS)
    return response.status, await response.json(), response.headers


def error_type(payload: dict[str, Any]) -> str:
    assert payload["type"] == "error"
    return str(payload["error"]["type"])


@pytest.mark.parametrize("payload", PAYLOADS)
async def test_count_tokens_agrees_with_messages_usage(
    aiohttp_client: ClientFactory, payload: dict[str, Any]
) -> None:
    client = await aiohttp_client(create_app())
    status, counted, _ = await post(client, "/v1/messages/count_tokens", count_tokens_body(payload))
    assert status == 200
    status, message, _ = await post(client, "/v1/messages", payload)
    assert status == 200
    assert counted == {"input_tokens": message["usage"]["input_tokens"]}
    assert message["usage"]["input_tokens"] == count_input_tokens(payload)
    assert message["usage"]["output_tokens"] == output_tokens_for(payload)
    assert 1 <= message["usage"]["output_tokens"] <= payload["max_tokens"]
    assert message["id"].startswith("msg_mock_")
    assert message["model"] == "m"
    assert message["stop_sequence"] is None
    expected = (
        "max_tokens" if message["usage"]["output_tokens"] == payload["max_tokens"] else "end_turn"
    )
    assert message["stop_reason"] == expected
    text = message["content"][0]["text"]
    assert len(text) == message["usage"]["output_tokens"] * 4


def test_counting_rules() -> None:
    base = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "abcd"}]}
    assert count_input_tokens(base) == 1 + 3 + 1
    with_image = {**base, "messages": [{"role": "user", "content": [IMAGE]}]}
    assert count_input_tokens(with_image) == 1 + 3 + 85
    assert count_input_tokens({**base, "system": "abcde"}) == 1 + 2 + 3 + 1
    assert output_tokens_for(base) == 1  # max_tokens 1 leaves no room
    outputs = {
        output_tokens_for({**base, "max_tokens": 4, "messages": [m]})
        for m in ({"role": "user", "content": str(i)} for i in range(40))
    }
    assert outputs == {1, 2, 3, 4}


async def test_answers_are_deterministic(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app())
    _, first, _ = await post(client, "/v1/messages", PAYLOADS[1])
    _, second, _ = await post(client, "/v1/messages", PAYLOADS[1])
    assert first["id"] != second["id"]
    assert {**first, "id": ""} == {**second, "id": ""}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        (
            {"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "content"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{}]}]},
            "content",
        ),
        ([1, 2], "JSON object"),
    ],
)
async def test_messages_validation(aiohttp_client: ClientFactory, body: Any, fragment: str) -> None:
    client = await aiohttp_client(create_app())
    status, payload, _ = await post(client, "/v1/messages", body)
    assert status == 400
    assert error_type(payload) == "invalid_request_error"
    assert fragment in payload["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_malformed_json(aiohttp_client: ClientFactory, path: str) -> None:
    client = await aiohttp_client(create_app())
    response = await client.post(path, data=b"{not json", headers=HEADERS)
    assert response.status == 400
    assert error_type(await response.json()) == "invalid_request_error"


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "stream", "metadata"])
async def test_count_tokens_refuses_extra_fields(aiohttp_client: ClientFactory, field: str) -> None:
    client = await aiohttp_client(create_app())
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], field: 1}
    status, payload, _ = await post(client, "/v1/messages/count_tokens", body)
    assert status == 400
    assert error_type(payload) == "invalid_request_error"
    assert payload["error"]["message"] == f"{field}: Extra inputs are not permitted"
    status, payload, _ = await post(client, "/v1/messages/count_tokens", {"model": "m"})
    assert (status, error_type(payload)) == (400, "invalid_request_error")


@pytest.mark.parametrize(
    ("kind", "status", "kind_type"),
    [("429", 429, "rate_limit_error"), ("500", 500, "api_error"), ("529", 529, "overloaded_error")],
)
async def test_fault_injection(
    aiohttp_client: ClientFactory, kind: Any, status: int, kind_type: str
) -> None:
    config = MockConfig(fault_rate=1.0, fault_kinds=[kind], retry_after_s=2)
    client = await aiohttp_client(create_app(config))
    got, payload, headers = await post(client, "/v1/messages", PAYLOADS[0])
    assert got == status
    assert error_type(payload) == kind_type
    if status in (429, 529):
        assert headers["retry-after"] == "2"
    else:
        assert "retry-after" not in headers
    # count_tokens is spared unless fault_count_tokens
    got, _, _ = await post(client, "/v1/messages/count_tokens", count_tokens_body(PAYLOADS[0]))
    assert got == 200
    stats = await (await client.get("/mock/stats")).json()
    assert stats["faults"][kind] == 1
    assert stats["messages_served"] == 0
    assert stats["input_tokens"] == stats["output_tokens"] == 0


async def test_slow_fault_then_normal_answer(aiohttp_client: ClientFactory) -> None:
    config = MockConfig(fault_rate=1.0, fault_kinds=["slow"], slow_ms=10, fault_count_tokens=True)
    client = await aiohttp_client(create_app(config))
    status, message, _ = await post(client, "/v1/messages", PAYLOADS[0])
    assert status == 200
    assert message["type"] == "message"
    status, _, _ = await post(client, "/v1/messages/count_tokens", count_tokens_body(PAYLOADS[0]))
    assert status == 200
    stats = await (await client.get("/mock/stats")).json()
    assert stats["faults"]["slow"] == 2


async def test_fault_count_tokens_and_seeded_draws(aiohttp_client: ClientFactory) -> None:
    async def statuses(seed: int) -> list[int]:
        config = MockConfig(fault_rate=0.5, fault_kinds=["500"], fault_count_tokens=True, seed=seed)
        client = await aiohttp_client(create_app(config))
        body = count_tokens_body(PAYLOADS[0])
        return [(await post(client, "/v1/messages/count_tokens", body))[0] for _ in range(20)]

    first = await statuses(7)
    assert first == await statuses(7)
    assert set(first) == {200, 500}


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


async def test_streaming_event_sequence(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app())
    payload = {**PAYLOADS[1], "stream": True}
    response = await client.post("/v1/messages", json=payload, headers=HEADERS)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(await response.text())
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert len(deltas) >= 2 and len(deltas) == len(names) - 5
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == count_input_tokens(payload)
    assert start["usage"]["output_tokens"] == 1
    assert start["content"] == [] and start["stop_reason"] is None
    final = events[-2][1]
    assert final["usage"]["output_tokens"] == output_tokens_for(payload)
    _, plain, _ = await post(client, "/v1/messages", PAYLOADS[1])
    assert "".join(d["delta"]["text"] for d in deltas) == plain["content"][0]["text"]
    assert all(d["delta"]["type"] == "text_delta" for d in deltas)
    assert final["delta"]["stop_reason"] == plain["stop_reason"]


async def test_stats_and_runtime_config(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app())
    assert (await client.get("/healthz")).status == 200
    _, message, _ = await post(client, "/v1/messages", PAYLOADS[0])
    await post(client, "/v1/messages/count_tokens", count_tokens_body(PAYLOADS[0]))
    stats = await (await client.get("/mock/stats")).json()
    assert stats["requests"] == {"messages": 1, "count_tokens": 1}
    assert stats["messages_served"] == 1
    assert stats["input_tokens"] == message["usage"]["input_tokens"]
    assert stats["output_tokens"] == message["usage"]["output_tokens"]

    response = await client.post("/mock/config", json={"fault_rate": 1, "fault_kinds": ["529"]})
    assert response.status == 200
    config = await response.json()
    assert config["fault_rate"] == 1 and config["fault_kinds"] == ["529"]
    assert config["latency_ms"] == 0
    status, _, _ = await post(client, "/v1/messages", PAYLOADS[0])
    assert status == 529

    for bad in ({"fault_rate": 2}, {"fault_kinds": ["418"]}, {"nonsense": 1}):
        response = await client.post("/mock/config", json=bad)
        assert response.status == 400
        assert error_type(await response.json()) == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_auth_header_rules(aiohttp_client: ClientFactory, path: str) -> None:
    client = await aiohttp_client(create_app(MockConfig(api_key="k")))
    body = PAYLOADS[0] if path == "/v1/messages" else count_tokens_body(PAYLOADS[0])
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error"),
        (
            {"authorization": "Bearer wrong", "anthropic-version": "2023-06-01"},
            401,
            "authentication_error",
        ),
        (
            {"authorization": "Basic k", "anthropic-version": "2023-06-01"},
            401,
            "authentication_error",
        ),
        ({"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "authentication_error"),
        ({"x-api-key": "k"}, 400, "invalid_request_error"),
    ]
    for headers, status, kind in cases:
        got, payload, _ = await post(client, path, body, **headers)
        assert (got, error_type(payload)) == (status, kind), headers
    got, _, _ = await post(client, path, body)
    assert got == 200
    bearer = {"authorization": "Bearer k", "anthropic-version": "2023-06-01"}
    got, _, _ = await post(client, path, body, **bearer)
    assert got == 200  # the real API takes a key as a Bearer token too


async def test_any_key_accepted_without_configured_key(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app())
    got, _, _ = await post(
        client,
        "/v1/messages",
        PAYLOADS[0],
        **{"x-api-key": "anything", "anthropic-version": "2023-06-01"},
    )
    assert got == 200
    got, payload, _ = await post(
        client,
        "/v1/messages",
        PAYLOADS[0],
        authorization="Bearer x",
        **{"anthropic-version": "2023-06-01"},
    )
    assert got == 200
    got, payload, _ = await post(client, "/v1/messages", PAYLOADS[0], **{"anthropic-version": "1"})
    assert got == 401
    assert "x-api-key" in payload["error"]["message"]
