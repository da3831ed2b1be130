"""Pass-through fidelity (issue 16, items 1, 2 and 4), against the real strict mock
upstream: ``anthropic-beta`` on both upstream routes of the proxy (streamed or not) and of
every batch job (through a real worker), the betas' policy, the anthropic-version setting,
query parameters, the upstream's request-id, and the routes budgeter does not proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import pytest
from redis.asyncio import Redis

from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.token_counter import TokenCounter
from budgeter.worker.worker import Worker, WorkerConfig
from tests.api.passthrough_stack import UPSTREAM_KEY, Stack, passthrough_stack
from tests.helpers import wait_ended

CLAUDE_CODE_BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14"]
CONTEXT_BETA = "context-management-2025-06-27"
CONTEXT = {"edits": [{"type": "clear_tool_uses_20250919"}]}
BETA_QUERY = {"beta": "true"}  # what beta clients (SDK 1.x, Claude Code) add to the route


def ask(n: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"Explain betas, take {n}."}],
        **extra,
    }


@pytest.fixture
async def stack(redis: Redis, redis_url: str) -> AsyncIterator[Stack]:
    async with passthrough_stack(redis, redis_url) as found:
        yield found


async def test_betas_and_query_reach_both_upstream_routes_of_a_message(stack: Stack) -> None:
    key = await stack.tenant("code")
    betas = [*CLAUDE_CODE_BETAS, CONTEXT_BETA]
    raw = await stack.client(key).beta.messages.with_raw_response.create(
        **ask(context_management=CONTEXT), betas=betas, extra_query=BETA_QUERY
    )
    message = await raw.parse()
    assert message.type == "message"
    count, sent = stack.received("/v1/messages/count_tokens"), stack.received("/v1/messages")
    assert len(count) == 1 and len(sent) == 1
    # the call as it was made (/v1/messages?beta=true, as Claude Code sends it)
    assert sent[0].betas == betas and sent[0].query == {"beta": "true"}
    assert sent[0].headers["x-api-key"] != key  # the upstream's key (a fingerprint), never ours
    # budgeter's own admission count: the same betas, the beta-only field counted too
    assert count[0].betas == betas and count[0].query == {"beta": "true"}
    assert json.loads(count[0].raw_body)["context_management"] == CONTEXT
    # the upstream's request id comes back beside budgeter's own
    assert raw.headers["budgeter-upstream-request-id"].startswith("req_up_")
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["request-id"] != raw.headers["budgeter-upstream-request-id"]


async def test_a_stream_carries_the_betas_and_the_upstream_request_id(stack: Stack) -> None:
    key = await stack.tenant("streamer")
    client = stack.client(key)
    async with client.beta.messages.stream(
        **ask(1), betas=CLAUDE_CODE_BETAS, extra_query=BETA_QUERY
    ) as stream:
        final = await stream.get_final_message()
        upstream_id = stream.response.headers.get("budgeter-upstream-request-id")
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert upstream_id is not None and upstream_id.startswith("req_up_")
    sent = stack.received("/v1/messages")
    assert [r.betas for r in sent] == [CLAUDE_CODE_BETAS]
    assert sent[0].query == {"beta": "true"}
    assert json.loads(sent[0].raw_body)["stream"] is True
    assert [r.betas for r in stack.received("/v1/messages/count_tokens")] == [CLAUDE_CODE_BETAS]


async def test_count_tokens_forwards_betas_query_and_beta_only_fields(stack: Stack) -> None:
    key = await stack.tenant("counter")
    client = stack.client(key)
    raw = await client.beta.messages.with_raw_response.count_tokens(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "count me"}],
        context_management=CONTEXT,  # type: ignore[arg-type]
        betas=[CONTEXT_BETA],
        extra_query=BETA_QUERY,
    )
    assert (await raw.parse()).input_tokens > 0
    assert raw.headers["budgeter-upstream-request-id"].startswith("req_up_")
    [counted] = stack.received("/v1/messages/count_tokens")
    assert CONTEXT_BETA in counted.betas and counted.query == {"beta": "true"}
    # without the beta, budgeter itself refuses the field the upstream would refuse
    with pytest.raises(anthropic.BadRequestError, match="context_management"):
        await client.messages.count_tokens(
            model="claude-sonnet-4-5",
            messages=[{"role": "user", "content": "count me"}],
            extra_body={"context_management": CONTEXT},
        )


async def test_the_admission_count_is_cached_per_set_of_betas(stack: Stack) -> None:
    key = await stack.tenant("cache")
    client = stack.client(key)
    await client.messages.create(**ask(2))
    await client.beta.messages.create(**ask(2), betas=["b-1", "a-2"])
    await client.beta.messages.create(**ask(2), betas=["a-2", "b-1"])  # same set: cached
    await client.messages.create(**ask(2))  # cached
    counted = stack.received("/v1/messages/count_tokens")
    assert [r.betas for r in counted] == [[], ["b-1", "a-2"]]
    assert [r.betas for r in stack.received("/v1/messages")] == [
        [],
        ["b-1", "a-2"],
        ["a-2", "b-1"],
        [],
    ]


async def test_an_upstream_refusal_passes_through_with_its_request_id(stack: Stack) -> None:
    key = await stack.tenant("nobeta")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{stack.url}/v1/messages",
            json=ask(3, context_management=CONTEXT),  # the field, without its beta
            headers={"x-api-key": key},
        ) as resp,
    ):
        body = await resp.json()
        assert resp.status == 400, body
        assert resp.headers["budgeter-upstream-request-id"].startswith("req_up_")
    assert body["error"]["type"] == "invalid_request_error"
    assert "context_management" in body["error"]["message"]


async def post(stack: Stack, path: str, key: str, body: Any, **headers: str) -> tuple[int, Any]:
    """POST as a bare HTTP client (no SDK headers): a JSON answer, or an event stream."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}{path}", json=body, headers={"x-api-key": key, **headers}) as r,
    ):
        if r.content_type == "text/event-stream":
            text = await r.text()
            assert "message_stop" in text
            return r.status, text
        return r.status, await r.json()


async def test_a_tenant_may_send_only_its_allowed_betas(stack: Stack) -> None:
    key = await stack.tenant("picky", {"allowed_betas": ["claude-code-20250219"]})
    client = stack.client(key)
    await client.beta.messages.create(**ask(4), betas=["claude-code-20250219"])
    stack.forget()
    batch = {"requests": [{"custom_id": "a", "params": ask(5)}]}
    count_body = {k: v for k, v in ask(5).items() if k != "max_tokens"}
    beta = "claude-code-20250219, interleaved-thinking-2025-05-14"
    for path, body in [
        ("/v1/messages", ask(5)),
        ("/v1/messages?beta=true", {**ask(5), "stream": True}),
        ("/v1/messages/count_tokens", count_body),
        ("/v1/messages/batches", batch),
    ]:
        status, answer = await post(stack, path, key, body, **{"anthropic-beta": beta})
        assert status == 400, (path, answer)
        assert answer["error"]["type"] == "invalid_request_error"
        message = answer["error"]["message"]
        assert "'interleaved-thinking-2025-05-14'" in message and "allowed_betas" in message
    assert stack.received() == []  # nothing reached the upstream
    # a malformed header is refused as clearly
    status, answer = await post(stack, "/v1/messages", key, ask(6), **{"anthropic-beta": "a b"})
    assert status == 400 and "anthropic-beta" in answer["error"]["message"]


async def test_the_allowed_betas_setting_applies_to_every_tenant(
    redis: Redis, redis_url: str
) -> None:
    async with passthrough_stack(redis, redis_url, allowed_betas=("only-this",)) as stack:
        key = await stack.tenant("anyone")  # no allowed_betas of its own: the setting rules
        await stack.client(key).beta.messages.create(**ask(7), betas=["only-this"])
        status, answer = await post(stack, "/v1/messages", key, ask(8), **{"anthropic-beta": "x"})
        assert status == 400 and "BUDGETER_ALLOWED_BETAS" in answer["error"]["message"]
        assert "'x'" in answer["error"]["message"]
        batch = {"requests": [{"custom_id": "a", "params": ask(8)}]}
        status, answer = await post(
            stack, "/v1/messages/batches", key, batch, **{"anthropic-beta": "x"}
        )
        assert status == 400 and "'x'" in answer["error"]["message"]
        assert len(stack.received("/v1/messages")) == 1


@pytest.mark.parametrize(
    ("setting", "sent", "expected"),
    [
        ("2023-06-01", "2099-01-01", "2023-06-01"),  # default: budgeter's, whatever was sent
        ("2024-10-22", "2099-01-01", "2024-10-22"),  # another fixed version
        ("client", "2099-01-01", "2099-01-01"),  # the caller's
    ],
)
async def test_the_upstream_anthropic_version_setting(
    redis: Redis, redis_url: str, setting: str, sent: str, expected: str
) -> None:
    async with passthrough_stack(redis, redis_url, upstream_anthropic_version=setting) as stack:
        key = await stack.tenant("versioned")
        version = {"anthropic-version": sent}
        count_body = {k: v for k, v in ask(9).items() if k != "max_tokens"}
        for path, body in [
            ("/v1/messages", ask(9)),
            ("/v1/messages", {**ask(10), "stream": True}),
            ("/v1/messages/count_tokens", count_body),
        ]:
            status, _ = await post(stack, path, key, body, **version)
            assert status == 200
        versions = {r.headers["anthropic-version"] for r in stack.received()}
        assert versions == {expected}
        assert len(stack.received()) == 5  # two admission counts, two messages, one count


async def test_client_version_mode_refuses_a_malformed_version(
    redis: Redis, redis_url: str
) -> None:
    async with passthrough_stack(redis, redis_url, upstream_anthropic_version="client") as stack:
        key = await stack.tenant("badversion")
        status, answer = await post(
            stack, "/v1/messages", key, ask(11), **{"anthropic-version": "1 2"}
        )
        assert status == 400 and "anthropic-version" in answer["error"]["message"]
        # none sent at all: the default goes upstream
        assert (await post(stack, "/v1/messages", key, ask(12)))[0] == 200
        assert {r.headers["anthropic-version"] for r in stack.received()} == {"2023-06-01"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/skills/skill_1/versions"),
        ("GET", "/v1/organizations/usage_report/messages"),
        ("POST", "/v1/complete"),
        ("GET", "/v1/messages/batches/msgbatch_x/unknown"),
    ],
)
async def test_routes_budgeter_does_not_offer_answer_404_naming_them(
    stack: Stack, method: str, path: str
) -> None:
    key = await stack.tenant("explorer")
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{stack.url}{path}", headers={"x-api-key": key}) as resp,
    ):
        body = await resp.json()
        assert resp.status == 404
        assert resp.headers["request-id"].startswith("req_")
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["error"]["message"] == f"{method} {path}: this route is not proxied by budgeter"
    assert stack.received() == []


async def test_a_batch_created_with_betas_sends_them_with_both_calls_of_every_job(
    redis: Redis, redis_url: str
) -> None:
    async with passthrough_stack(redis, redis_url, upstream_anthropic_version="client") as stack:
        key = await stack.tenant("batcher")
        client = anthropic.AsyncAnthropic(
            base_url=stack.url,
            api_key=key,
            max_retries=0,
            default_headers={"anthropic-version": "2099-01-01"},
        )
        requests = [
            {"custom_id": f"j{i}", "params": ask(20 + i, context_management=CONTEXT)}
            for i in range(6)
        ]
        async with client:
            beta_batch = await client.beta.messages.batches.create(
                requests=requests,  # type: ignore[arg-type]
                betas=[CONTEXT_BETA, "claude-code-20250219"],
            )
            plain = await client.messages.batches.create(
                requests=[{"custom_id": "p", "params": ask(30)}]  # type: ignore[typeddict-item]
            )
        store = BatchStore(redis)
        async with running_worker(redis, stack.upstream_url, "client"):
            await wait_ended(store, [beta_batch.id, plain.id])
        lines = [line async for line in store.results(beta_batch.id)]
        assert {line["result"]["type"] for line in lines} == {"succeeded"}, lines
        [plain_line] = [line async for line in store.results(plain.id)]
        assert plain_line["result"]["type"] == "succeeded"
    jobs = [
        r for r in stack.received() if r.path.startswith("/v1/messages") and "batches" not in r.path
    ]
    by_route = {
        path: [r for r in jobs if r.path == path]
        for path in ("/v1/messages", "/v1/messages/count_tokens")
    }
    for path, records in by_route.items():
        assert len(records) == 7, path  # every job counted once and sent once
        with_betas = [r for r in records if r.betas]
        assert len(with_betas) == 6, path
        for record in with_betas:
            # the betas the batch was created with, in their order
            assert record.betas == [CONTEXT_BETA, "claude-code-20250219"]
            assert record.headers["anthropic-version"] == "2099-01-01"
            assert record.query == {}


@asynccontextmanager
async def running_worker(redis: Redis, upstream_url: str, version: str) -> AsyncIterator[Worker]:
    async with aiohttp.ClientSession() as session:
        metrics = Metrics()
        upstream = UpstreamClient(
            session, upstream_url, UPSTREAM_KEY, backoff_base_s=0.001, anthropic_version=version
        )
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(concurrency=4, maintenance_interval_s=0.2, drain_s=2.0),
            metrics=metrics,
            counter=TokenCounter(redis, upstream, ttl_s=60, metrics=metrics),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
