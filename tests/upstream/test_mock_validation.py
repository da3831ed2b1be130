"""The strict mock (the default) refuses what the real Messages API refuses: headers, unknown
or beta-only body fields, wrong types; ``--lenient`` accepts them; and it records what it
received (``/mock/requests``) so tests can assert on headers and betas."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from budgeter.cli.parser import build_parser
from budgeter.upstream.mock import MockConfig, create_app
from budgeter.upstream.mock_main import mock_config_from_args
from budgeter.upstream.mock_record import RECORDER_KEY, fingerprint
from budgeter.upstream.mock_validation import body_problem, credential, parse_betas

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
MESSAGES = [{"role": "user", "content": "hi"}]
BASE = {"model": "claude-test", "max_tokens": 16, "messages": MESSAGES}
COUNT = {"model": "claude-test", "messages": MESSAGES}
EVERY_GA_FIELD = {
    **BASE,
    "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
    "metadata": {"user_id": "u-1"},
    "stop_sequences": ["\n\nHuman:"],
    "stream": False,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 40,
    "tools": [{"name": "lookup", "description": "find", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
    "thinking": {"type": "disabled"},
    "service_tier": "auto",
    "output_config": {"effort": "low"},
}
# (field, value, beta that unlocks it, routes where it exists)
BETA_ONLY = [
    ("context_management", {"edits": []}, "context-management-2025-06-27", ("messages", "count")),
    (
        "mcp_servers",
        [{"type": "url", "url": "https://x", "name": "x"}],
        "mcp-client-2025-04-04",
        ("messages", "count"),
    ),
    ("container", "container_abc", "code-execution-2025-05-22", ("messages",)),
    ("container", {"skills": []}, "skills-2025-10-02", ("messages",)),
    (
        "output_format",
        {"type": "json_schema", "schema": {}},
        "structured-outputs-2025-11-13",
        ("messages", "count"),
    ),
]
PATHS = {"messages": "/v1/messages", "count": "/v1/messages/count_tokens"}


async def post(
    client: TestClient[Any, Any], path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    response = await client.post(path, json=body, headers=headers or HEADERS)
    return response.status, await response.json()


def refusal(payload: dict[str, Any]) -> str:
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    return str(payload["error"]["message"])


async def test_every_ga_field_is_accepted(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app())
    assert (await post(client, "/v1/messages", EVERY_GA_FIELD))[0] == 200
    count = {k: EVERY_GA_FIELD[k] for k in ("model", "messages", "system", "tools", "thinking")}
    assert (await post(client, "/v1/messages/count_tokens", count))[0] == 200


@pytest.mark.parametrize(("field", "value", "beta", "routes"), BETA_ONLY)
async def test_beta_only_fields_need_their_beta(
    aiohttp_client: ClientFactory, field: str, value: Any, beta: str, routes: tuple[str, ...]
) -> None:
    client = await aiohttp_client(create_app())
    for route, path in PATHS.items():
        body = {**(BASE if route == "messages" else COUNT), field: value}
        status, payload = await post(client, path, body)
        assert status == 400, (route, payload)
        assert refusal(payload) == f"{field}: Extra inputs are not permitted"
        other = {**HEADERS, "anthropic-beta": "interleaved-thinking-2025-05-14"}
        assert (await post(client, path, body, other))[0] == 400
        with_beta = {**HEADERS, "anthropic-beta": f"claude-code-20250219, {beta}"}
        status, payload = await post(client, path, body, with_beta)
        assert status == (200 if route in routes else 400), (route, payload)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/messages", {**BASE, "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ("/v1/messages", COUNT, "max_tokens: Field required"),
        ("/v1/messages", {**BASE, "max_tokens": 0}, "max_tokens: Input should be greater than"),
        ("/v1/messages", {**BASE, "max_tokens": "5"}, "max_tokens: Input should be a valid int"),
        ("/v1/messages", {**BASE, "temperature": 1.5}, "temperature: Input should be less than"),
        ("/v1/messages", {**BASE, "stream": "yes"}, "stream: Input should be a valid boolean"),
        ("/v1/messages", {**BASE, "top_k": -1}, "top_k: Input should be greater than"),
        ("/v1/messages", {**BASE, "stop_sequences": "x"}, "stop_sequences: Input should be"),
        ("/v1/messages", {**BASE, "service_tier": "fast"}, "service_tier: Input should be"),
        ("/v1/messages", {**BASE, "metadata": {"tenant": "x"}}, "metadata.tenant: Extra inputs"),
        ("/v1/messages", {**BASE, "model": ""}, "model: String should have at least 1"),
        (
            "/v1/messages",
            {**BASE, "messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name: Extra inputs are not permitted",
        ),
        ("/v1/messages/count_tokens", {**COUNT, "stream": True}, "stream: Extra inputs"),
        ("/v1/messages/count_tokens", {"model": "m"}, "messages: Field required"),
    ],
)
async def test_refusals_name_the_field(
    aiohttp_client: ClientFactory, path: str, body: dict[str, Any], message: str
) -> None:
    client = await aiohttp_client(create_app())
    status, payload = await post(client, path, body)
    assert status == 400
    assert refusal(payload).startswith(message)


async def test_a_system_message_needs_the_mid_conversation_beta(
    aiohttp_client: ClientFactory,
) -> None:
    """Claude Code sends ``{"role": "system"}`` inside messages, with its beta."""
    client = await aiohttp_client(create_app())
    body = {**BASE, "messages": [*MESSAGES, {"role": "system", "content": "be brief"}]}
    status, payload = await post(client, "/v1/messages", body)
    assert status == 400
    assert refusal(payload) == "messages.1.role: Input should be 'user' or 'assistant'"
    beta = {**HEADERS, "anthropic-beta": "mid-conversation-system-2026-04-07"}
    assert (await post(client, "/v1/messages", body, beta))[0] == 200
    bad = {**BASE, "messages": [{"role": "tool", "content": "x"}]}
    assert "role" in refusal((await post(client, "/v1/messages", bad, beta))[1])
    lenient = await aiohttp_client(create_app(MockConfig(strict=False)))
    assert (await post(lenient, "/v1/messages", body))[0] == 200


async def test_headers_content_type_and_bearer(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(MockConfig(api_key="k")))
    response = await client.post(
        "/v1/messages", data=b'{"x": 1}', headers={**HEADERS, "content-type": "text/plain"}
    )
    assert response.status == 400
    assert refusal(await response.json()).startswith("content-type: must be application/json")
    bearer = {"authorization": "Bearer k", "anthropic-version": "2023-06-01"}
    assert (await post(client, "/v1/messages", BASE, bearer))[0] == 200
    status, payload = await post(client, "/v1/messages", BASE, {"anthropic-version": "x"})
    assert (status, payload["error"]["type"]) == (401, "authentication_error")
    status, payload = await post(client, "/v1/messages", BASE, {"x-api-key": "k"})
    assert refusal(payload) == "anthropic-version: header is required"


async def test_lenient_accepts_what_strict_refuses(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(MockConfig(strict=False)))
    body = {**BASE, "context_management": {"edits": []}, "bogus": 1, "temperature": 7}
    assert (await post(client, "/v1/messages", body))[0] == 200
    plain = {**HEADERS, "content-type": "text/plain"}
    response = await client.post("/v1/messages", data=json.dumps(BASE), headers=plain)
    assert response.status == 200
    # what the lenient mock always refused, it still refuses
    status, payload = await post(client, "/v1/messages/count_tokens", {**COUNT, "stream": True})
    assert refusal(payload) == "stream: Extra inputs are not permitted"
    assert (await post(client, "/v1/messages", COUNT))[0] == 400
    status, _ = await post(client, "/v1/messages", BASE, {"anthropic-version": "2023-06-01"})
    assert status == 401


async def test_records_what_it_received(aiohttp_client: ClientFactory) -> None:
    app = create_app(MockConfig(record_limit=3))
    client = await aiohttp_client(app)
    headers = {
        **HEADERS,
        "anthropic-beta": "claude-code-20250219,context-management-2025-06-27",
        "budgeter-test": "yes",
    }
    body = {**BASE, "context_management": {"edits": []}}
    assert (await post(client, "/v1/messages?beta=true", body, headers))[0] == 200
    await post(client, "/v1/messages/count_tokens", {**COUNT, "stream": True})
    records = (await (await client.get("/mock/requests")).json())["requests"]
    assert [(r["path"], r["status"]) for r in records] == [
        ("/v1/messages", 200),
        ("/v1/messages/count_tokens", 400),
    ]
    first = records[0]
    assert first["query"] == {"beta": "true"}
    assert first["betas"] == ["claude-code-20250219", "context-management-2025-06-27"]
    assert first["headers"]["anthropic-version"] == "2023-06-01"
    assert first["headers"]["budgeter-test"] == "yes"
    assert first["headers"]["x-api-key"] == fingerprint("k") != "k"
    assert first["body"] == body and first["method"] == "POST"
    assert records[1]["seq"] == first["seq"] + 1

    bearer = {"authorization": "Bearer secret-token", "anthropic-version": "2023-06-01"}
    await post(client, "/v1/messages", BASE, bearer)
    await post(client, "/v1/messages", BASE)
    recorded = list(app[RECORDER_KEY].records)
    assert len(recorded) == 3  # the limit: the oldest is forgotten
    assert recorded[1].headers["authorization"] == f"Bearer {fingerprint('secret-token')}"
    assert "secret-token" not in str([r.as_json() for r in recorded])
    only = await (await client.get("/mock/requests?path=/v1/messages/count_tokens")).json()
    assert [r["path"] for r in only["requests"]] == ["/v1/messages/count_tokens"]
    assert (await client.delete("/mock/requests")).status == 200
    assert (await (await client.get("/mock/requests")).json())["requests"] == []
    await client.get("/healthz")
    assert not app[RECORDER_KEY].records  # only /v1/ routes are recorded


def test_rules_directly() -> None:
    assert parse_betas(["a, b", "", " c ,"]) == ["a", "b", "c"]
    assert credential({"x-api-key": "k"}) == "k"
    assert credential({"authorization": "bearer  t "}) == "t"
    assert credential({"authorization": "Basic t"}) is None
    assert credential({"authorization": "Bearer "}) is None
    assert body_problem("messages", BASE, []) is None
    beta = ["context-management-2025-06-27"]
    assert body_problem("count_tokens", {**COUNT, "context_management": {}}, beta) is None
    assert body_problem("count_tokens", {**COUNT, "container": "c"}, ["skills-2025-10-02"]) == (
        "container: Extra inputs are not permitted"
    )


def test_cli_lenient_flag() -> None:
    parser = build_parser()
    strict = mock_config_from_args(parser.parse_args(["mock-upstream"]))
    lenient = mock_config_from_args(parser.parse_args(["mock-upstream", "--lenient"]))
    assert (strict.strict, lenient.strict) == (True, False)
