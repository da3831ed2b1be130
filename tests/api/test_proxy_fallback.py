"""Fallback instead of refusal on the proxy and in the worker, end to end: a real Redis,
the mock upstream (which echoes the model it was called with), the official SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from redis.asyncio import Redis

from budgeter.admission.fallback import FALLBACK_HEADER
from budgeter.api.openapi import document_of
from budgeter.api.proxy import PROXY
from budgeter.api.routes import ROUTES
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore
from tests.api.test_proxy import Proxy, proxy  # noqa: F401 - the fixture
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import results_of, running_worker

OPUS, SONNET = "claude-opus-4-6", "claude-sonnet-4-6"  # (the SDK warns on opus 4.5)


def ask(max_tokens: int = 500) -> dict[str, Any]:
    return {
        "model": OPUS,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Explain fallbacks."}],
    }


def decisions(metrics: Metrics, tenant: str, decision: str, reason: str) -> float:
    labels = {"tenant": tenant, "decision": decision, "reason": reason}
    return metrics.registry.get_sample_value("budgeter_admission_decisions_total", labels) or 0.0


async def test_a_model_budget_refusal_is_served_by_the_fallback_with_its_header(
    proxy: Proxy,  # noqa: F811 - the fixture, imported by name above
    redis: Redis,
) -> None:
    key = await proxy.tenant(
        "pf",
        {"models": {OPUS: {"budgets": {"day": 100}}}, "fallback_models": {OPUS: SONNET}},
    )
    raw = await proxy.client(key).messages.with_raw_response.create(**ask())
    message = await raw.parse()
    assert raw.headers[FALLBACK_HEADER] == SONNET
    assert message.model == SONNET  # the upstream was called with the fallback
    await proxy.settled()
    assert proxy.app is not None
    assert decisions(proxy.app[PROXY].metrics, "pf", "ADMIT", "fallback") == 1
    assert await redis.hlen("budgeter:{t:pf}:resv") == 0  # settled under the same id
    budget = await redis.hgetall("budgeter:{t:pf}:budget")
    assert int(budget.get(f"m:{OPUS}:day:used", 0)) == 0  # nothing of the model refused


async def test_the_stream_carries_the_header_too(
    proxy: Proxy,  # noqa: F811 - the fixture, imported by name above
) -> None:
    key = await proxy.tenant(
        "ps", {"models": {OPUS: {"budgets": {"day": 100}}}, "fallback_models": {OPUS: SONNET}}
    )
    client = proxy.client(key)
    async with client.messages.with_streaming_response.create(**ask(), stream=True) as raw:
        assert raw.headers[FALLBACK_HEADER] == SONNET
        body = await raw.text()
    assert SONNET in body
    await proxy.settled()


async def test_a_rate_refusal_or_a_refused_fallback_answers_the_first_refusal(
    proxy: Proxy,  # noqa: F811 - the fixture, imported by name above
) -> None:
    key = await proxy.tenant(
        "pr",
        {
            "models": {
                OPUS: {"budgets": {"day": 100}, "rate": {"rpm": 1}},
                SONNET: {"budgets": {"day": 100}},
            },
            "fallback_models": {OPUS: SONNET},
        },
    )
    client = proxy.client(key)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(**ask())
    error = info.value.body["error"]  # type: ignore[index]
    assert error["type"] == "budget_exhausted_error"
    assert f"day token budget of model {OPUS}" in error["message"]
    assert FALLBACK_HEADER not in info.value.response.headers
    key = await proxy.tenant(
        "pq",
        {"models": {OPUS: {"rate": {"rpm": 1}}}, "fallback_models": {OPUS: SONNET}},
    )
    client = proxy.client(key)
    await client.messages.create(**ask(max_tokens=8))
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(**ask(max_tokens=8))
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    await proxy.settled()


async def test_a_batch_job_refused_by_a_budget_is_served_by_the_fallback(redis: Redis) -> None:
    policy = TenantPolicy.model_validate(
        {"models": {OPUS: {"budgets": {"day": 100}}}, "fallback_models": {OPUS: SONNET}}
    )
    await TenantStore(redis).put("bf", policy)
    await TenantStore(redis).put("bn", TenantPolicy(models=policy.models))  # no fallback
    store = BatchStore(redis)
    async with running_worker(redis) as (worker, _):
        with_fallback = await store.create("bf", requests_for("f", 3, model=OPUS, max_tokens=200))
        without = await store.create("bn", requests_for("n", 1, model=OPUS, max_tokens=200))
        await wait_ended(store, [with_fallback, without])
    lines = await results_of(store, with_fallback)
    assert {line["result"]["type"] for line in lines} == {"succeeded"}
    assert {line["result"]["message"]["model"] for line in lines} == {SONNET}
    assert decisions(worker.metrics, "bf", "ADMIT", "fallback") == 3
    (refused,) = await results_of(store, without)
    assert refused["result"]["type"] == "errored"
    assert refused["result"]["error"]["error"]["type"] == "budget_exhausted_error"


def test_the_openapi_document_names_the_header() -> None:
    answer = document_of(ROUTES)["paths"]["/v1/messages"]["post"]["responses"]["200"]
    assert FALLBACK_HEADER in answer["headers"]
    policy = document_of(ROUTES)["components"]["schemas"]["TenantPolicy"]["properties"]
    assert policy["fallback_models"]["additionalProperties"] == {"type": "string"}
