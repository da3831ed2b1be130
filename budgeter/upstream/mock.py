"""A deterministic Anthropic-compatible Messages API, for tests, demos and benchmarks.

Token counts and answers derive only from the request body, so ``/v1/messages/count_tokens``
agrees exactly with the usage ``/v1/messages`` reports. Faults (429/500/529/slow) are drawn
from a seeded RNG; ``/mock/stats`` and ``/mock/config`` observe and steer it at runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from budgeter.domain import jsonio
from budgeter.domain.messages import COUNT_TOKENS_FIELDS, JsonValue
from budgeter.domain.results import error_body as anthropic_error
from budgeter.upstream.mock_models import add_models_routes
from budgeter.upstream.mock_record import DEFAULT_LIMIT, install_recorder
from budgeter.upstream.mock_validation import (
    Route,
    body_problem,
    content_type_problem,
    credential,
    parse_betas,
)

FaultKind = Literal["429", "500", "529", "slow"]
IMAGE_TOKENS = 85
JsonObject = dict[str, JsonValue]
_PROSE = (
    "the budget ledger admits each tenant request once its tokens settle and the "
    "queue moves on while the mock answers with steady deterministic prose "
)


def _default_fault_kinds() -> list[FaultKind]:
    return ["429", "500", "529"]


class MockConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0)
    count_latency_ms: float = Field(default=0.0, ge=0)
    fault_rate: float = Field(default=0.0, ge=0, le=1)
    fault_kinds: list[FaultKind] = Field(default_factory=_default_fault_kinds)
    retry_after_s: float = Field(default=1.0, ge=0)
    slow_ms: float = Field(default=5000.0, ge=0)
    fault_count_tokens: bool = False
    api_key: str | None = None
    seed: int = 0
    # strict: validate headers and body fields as the real API does (mock_validation);
    # False (--lenient): only authentication, anthropic-version and the message shape
    strict: bool = True
    record_limit: int = Field(default=DEFAULT_LIMIT, ge=0)


@dataclass
class MockStats:
    requests: dict[str, int] = field(default_factory=lambda: {"messages": 0, "count_tokens": 0})
    faults: dict[str, int] = field(
        default_factory=lambda: {k: 0 for k in ("429", "500", "529", "slow")}
    )
    messages_served: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "messages_served": self.messages_served,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass
class MockState:
    config: MockConfig
    rng: random.Random
    stats: MockStats = field(default_factory=MockStats)


STATE_KEY = web.AppKey("mock_state", MockState)


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _text_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    total = 0
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            total += _text_tokens(str(block.get("text", "")))
        elif block.get("type") == "image":
            total += IMAGE_TOKENS
        elif block.get("type") == "tool_result":
            total += 3 + _content_tokens(block.get("content", ""))
        else:
            total += _text_tokens(_canonical(block))
    return total


def count_input_tokens(body: Mapping[str, object]) -> int:
    """Deterministic input tokens: ~4 UTF-8 bytes a token, 3 per message, 85 per image, +1."""
    total = 1 + _content_tokens(body.get("system", ""))
    if body.get("tools"):
        total += _text_tokens(_canonical(body["tools"]))
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        total += 3 + _content_tokens(message.get("content") if isinstance(message, dict) else None)
    return total


def _digest(body: Mapping[str, object]) -> int:
    return int(hashlib.sha256(_canonical(body.get("messages")).encode()).hexdigest(), 16)


def output_tokens_for(body: Mapping[str, object]) -> int:
    """Deterministic output tokens in ``1..min(max_tokens, 200)``."""
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int | float | str):
        raise TypeError(f"max_tokens is not a number: {max_tokens!r}")
    return 1 + _digest(body) % min(int(max_tokens), 200)


def _answer_text(body: Mapping[str, object], output_tokens: int) -> str:
    """About 4 characters a token: the prose, rotated by the request's digest, repeated."""
    start = _digest(body) % len(_PROSE)
    rotated = _PROSE[start:] + _PROSE[:start]
    target = output_tokens * 4
    return (rotated * (target // len(rotated) + 1))[:target]


def _error(status: int, error_type: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        anthropic_error(error_type, message), status=status, headers=headers, dumps=jsonio.dumps_str
    )


def _check_headers(request: web.Request, config: MockConfig) -> web.Response | None:
    key = credential(request.headers)
    if key is None:
        return _error(401, "authentication_error", "x-api-key header is required")
    if config.api_key is not None and key != config.api_key:
        return _error(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        return _error(400, "invalid_request_error", "anthropic-version: header is required")
    if config.strict and (problem := content_type_problem(request.method, request.content_type)):
        return _error(400, "invalid_request_error", problem)
    return None


def _strict_problem(request: web.Request, route: Route, body: JsonObject) -> web.Response | None:
    """The strict mock's refusal of a body the real API would refuse (mock_validation)."""
    if not request.app[STATE_KEY].config.strict:
        return None
    betas = parse_betas(request.headers.getall("anthropic-beta", []))
    problem = body_problem(route, body, betas)
    return None if problem is None else _error(400, "invalid_request_error", problem)


async def _json_body(request: web.Request) -> JsonObject | web.Response:
    try:
        body = await request.json(loads=jsonio.loads)
    except ValueError as exc:
        return _error(400, "invalid_request_error", f"invalid JSON body: {exc}")
    if not isinstance(body, dict):
        return _error(400, "invalid_request_error", "request body must be a JSON object")
    return body


def _messages_problem(body: Mapping[str, object]) -> str | None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: must be an object"
        if message.get("role") not in (
            "user",
            "assistant",
            "system",
        ):  # strict: see mock_validation
            return f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'"
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
            isinstance(block, dict) and isinstance(block.get("type"), str) for block in content
        ):
            return f"messages.{i}.content: must be a string or a list of content blocks"
    if "system" in body and not isinstance(body["system"], str | list):
        return "system: must be a string or a list of blocks"
    if "tools" in body and not isinstance(body["tools"], list):
        return "tools: must be a list"
    return None


async def _maybe_fault(state: MockState) -> web.Response | None:
    config = state.config
    if config.fault_rate <= 0 or not config.fault_kinds:
        return None
    if state.rng.random() >= config.fault_rate:
        return None
    kind = state.rng.choice(config.fault_kinds)
    state.stats.faults[kind] += 1
    retry_after = {"retry-after": f"{config.retry_after_s:g}"}
    if kind == "429":
        return _error(429, "rate_limit_error", "mock: rate limited", **retry_after)
    if kind == "500":
        return _error(500, "api_error", "mock: internal server error")
    if kind == "529":
        return _error(529, "overloaded_error", "mock: overloaded", **retry_after)
    await asyncio.sleep(config.slow_ms / 1000)  # "slow": late, then a normal answer
    return None


async def _handle_messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.stats.requests["messages"] += 1
    if (refusal := _check_headers(request, state.config)) is not None:
        return refusal
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    if (refusal := _strict_problem(request, "messages", body)) is not None:
        return refusal
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return _error(400, "invalid_request_error", "max_tokens: must be an integer >= 1")
    if (problem := _messages_problem(body)) is not None:
        return _error(400, "invalid_request_error", problem)
    if (fault := await _maybe_fault(state)) is not None:
        return fault
    if state.config.latency_ms > 0:
        await asyncio.sleep(state.config.latency_ms / 1000)

    input_tokens = count_input_tokens(body)
    output_tokens = output_tokens_for(body)
    text = _answer_text(body, output_tokens)
    stop_reason = "max_tokens" if output_tokens >= max_tokens else "end_turn"
    state.stats.messages_served += 1
    state.stats.input_tokens += input_tokens
    state.stats.output_tokens += output_tokens
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    message: dict[str, object] = {
        "id": f"msg_mock_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
    if body.get("stream") is True:
        return await _stream(request, message, text, usage)
    return web.json_response(message, dumps=jsonio.dumps_str)


async def _stream(
    request: web.Request, message: Mapping[str, object], text: str, usage: Mapping[str, int]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    await response.prepare(request)

    async def send(event: Mapping[str, object]) -> None:
        head = f"event: {event['type']}\ndata: ".encode()
        await response.write(head + jsonio.dumps(event) + b"\n\n")

    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    await send({"type": "message_start", "message": start})
    await send(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    step = max(1, math.ceil(len(text) / 5))
    for i in range(0, len(text), step):
        delta = {"type": "text_delta", "text": text[i : i + step]}
        await send({"type": "content_block_delta", "index": 0, "delta": delta})
    await send({"type": "content_block_stop", "index": 0})
    await send(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    await send({"type": "message_stop"})
    await response.write_eof()
    return response


async def _handle_count_tokens(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.stats.requests["count_tokens"] += 1
    if (refusal := _check_headers(request, state.config)) is not None:
        return refusal
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    if (refusal := _strict_problem(request, "count_tokens", body)) is not None:
        return refusal
    extra = sorted(set(body) - COUNT_TOKENS_FIELDS)
    if not state.config.strict and extra:
        return _error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
    if (problem := _messages_problem(body)) is not None:
        return _error(400, "invalid_request_error", problem)
    if state.config.fault_count_tokens and (fault := await _maybe_fault(state)) is not None:
        return fault
    if state.config.count_latency_ms > 0:
        await asyncio.sleep(state.config.count_latency_ms / 1000)
    return web.json_response({"input_tokens": count_input_tokens(body)}, dumps=jsonio.dumps_str)


async def _handle_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats.as_json())


async def _handle_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        config = MockConfig.model_validate(body)
    except ValidationError as exc:
        return _error(
            400, "invalid_request_error", f"invalid mock config: {exc.errors()[0]['msg']}"
        )
    state.config = config
    state.rng = random.Random(config.seed)
    return web.json_response(config.model_dump())


async def _handle_healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(config: MockConfig | None = None) -> web.Application:
    config = config or MockConfig()
    app = web.Application()
    app[STATE_KEY] = MockState(config=config, rng=random.Random(config.seed))
    install_recorder(app, config.record_limit)
    app.router.add_post("/v1/messages", _handle_messages)
    app.router.add_post("/v1/messages/count_tokens", _handle_count_tokens)
    app.router.add_get("/mock/stats", _handle_stats)
    app.router.add_post("/mock/config", _handle_config)
    app.router.add_get("/healthz", _handle_healthz)
    add_models_routes(app, lambda request: _check_headers(request, request.app[STATE_KEY].config))
    return app
