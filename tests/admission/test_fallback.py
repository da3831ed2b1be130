"""Fallback instead of refusal (budgeter/admission/fallback.py) against a real Redis: only
a budget's refusal (the tenant's, a model's, an ancestor's) is re-admitted as the policy's
fallback model, once; anything else, or a refused fallback, answers the first refusal."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Decision, Usage
from budgeter.admission.fallback import (
    FALLBACK_REASON,
    FallbackModels,
    is_budget_refusal,
    reserve_with_fallback,
)
from budgeter.admission.tree_view import TreeView
from budgeter.domain.policy import TenantPolicy
from budgeter.tenants.store import TenantStore

OPUS, SONNET = "claude-opus-4-5", "claude-sonnet-4-5"
FALLBACKS = {OPUS: SONNET}


def admission(redis: Redis) -> Admission:
    return Admission(redis, tree=TreeView(redis))


async def reserve(
    redis: Redis, tenant: str, rid: str, *, input_tokens: int = 1000, max_tokens: int = 1000
) -> tuple[Decision, str]:
    return await reserve_with_fallback(
        admission(redis),
        tenant,
        rid,
        input_tokens,
        max_tokens,
        model=OPUS,
        fallback_models=FALLBACKS,
        now_ms=1_700_000_000_000,
    )


async def held(redis: Redis, tenant: str) -> dict[str, str]:
    found = await redis.hgetall(f"budgeter:{{t:{tenant}}}:resv")
    return {str(k): str(v) for k, v in found.items()}


async def test_a_model_budget_refusal_is_admitted_as_the_fallback_model(redis: Redis) -> None:
    await TenantStore(redis).put(
        "mb", TenantPolicy(models={OPUS: {"budgets": {"day": 1500}}}, budgets={"day": 10_000})
    )
    decision, served = await reserve(redis, "mb", "r1")
    assert (decision.kind, decision.reason, served) == ("ADMIT", FALLBACK_REASON, SONNET)
    assert decision.detail == "too_large:budget:model:day"  # what refused the model asked for
    resv = await held(redis, "mb")
    assert list(resv) == ["r1"] and SONNET in resv["r1"]  # one reservation, the fallback's
    budget = await redis.hgetall("budgeter:{t:mb}:budget")
    assert budget["day:reserved"] == "2000"
    assert float(budget.get(f"m:{OPUS}:day:reserved", 0)) == 0
    settled = await admission(redis).settle("mb", "r1", Usage(1000, 10), now_ms=1_700_000_000_001)
    assert settled.settled == 1 and await held(redis, "mb") == {}


async def test_a_tenant_usd_budget_refusal_falls_back_to_the_cheaper_model(
    redis: Redis,
) -> None:
    # opus reserves 1000 x 6.25 + 1000 x 25 = $0.03125, sonnet 1000 x 3.75 + 1000 x 15 = $0.01875
    await TenantStore(redis).put("usd", TenantPolicy(usd_budgets={"day": 0.025}))
    decision, served = await reserve(redis, "usd", "r1")
    assert (decision.kind, decision.reason, served) == ("ADMIT", FALLBACK_REASON, SONNET)
    assert decision.detail == "too_large:budget:usd:day"


async def test_an_exhausted_budget_with_on_exhausted_wait_falls_back(redis: Redis) -> None:
    policy = TenantPolicy(models={OPUS: {"budgets": {"day": 2500}}}, on_exhausted="wait")
    await TenantStore(redis).put("w", policy)
    first, served = await reserve(redis, "w", "r1")
    assert (first.kind, first.reason, served) == ("ADMIT", "", OPUS)
    await admission(redis).settle("w", "r1", Usage(1000, 1000), now_ms=1_700_000_000_000)
    second, served = await reserve(redis, "w", "r2")  # 2000 used of 2500: a DEFER till reset
    assert (second.kind, second.reason, served) == ("ADMIT", FALLBACK_REASON, SONNET)
    assert second.detail == "exhausted:model:day"


async def test_an_ancestor_budget_refusal_falls_back(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("org", TenantPolicy(models={OPUS: {"budgets": {"day": 1500}}}))
    await store.put("team", TenantPolicy(parent="org"))
    decision, served = await reserve(redis, "team", "r1")
    assert (decision.kind, decision.reason, served) == ("ADMIT", FALLBACK_REASON, SONNET)
    assert decision.detail == "parent:org:too_large:budget:model:day"
    assert list(await held(redis, "org")) == ["r1"]  # held in the parent too, as the fallback
    assert SONNET in (await held(redis, "org"))["r1"]


async def test_a_rate_refusal_does_not_fall_back(redis: Redis) -> None:
    await TenantStore(redis).put("rate", TenantPolicy(models={OPUS: {"rate": {"rpm": 1}}}))
    first, _ = await reserve(redis, "rate", "r1")
    assert first.kind == "ADMIT"
    second, served = await reserve(redis, "rate", "r2")
    assert (second.kind, second.reason, served) == ("DEFER", "rate:model:rpm", OPUS)
    assert list(await held(redis, "rate")) == ["r1"]


async def test_a_refused_fallback_answers_the_first_refusal(redis: Redis) -> None:
    both = {OPUS: {"budgets": {"day": 1500}}, SONNET: {"rate": {"rpm": 1}}}
    await TenantStore(redis).put("both", TenantPolicy(models=both))
    await reserve_with_fallback(
        admission(redis), "both", "s0", 10, 10, model=SONNET, fallback_models=FALLBACKS
    )  # the fallback's rpm is used up
    decision, served = await reserve(redis, "both", "r1")
    assert (decision.kind, decision.reason, served) == (
        "REJECT",
        "too_large:budget:model:day",
        OPUS,
    )
    assert list(await held(redis, "both")) == ["s0"]


async def test_no_fallback_named_answers_the_refusal(redis: Redis) -> None:
    await TenantStore(redis).put("none", TenantPolicy(budgets={"day": 1500}))
    decision, served = await reserve_with_fallback(
        admission(redis), "none", "r1", 1000, 1000, model=OPUS, fallback_models={}
    )
    assert (decision.kind, decision.reason, served) == ("REJECT", "too_large:budget:day", OPUS)


@pytest.mark.parametrize(
    ("decision", "falls_back"),
    [
        (Decision("REJECT", 0, "exhausted:day", 1), True),
        (Decision("REJECT", 0, "too_large:budget:model:usd:day", 1), True),
        (Decision("REJECT", 0, "parent:org:exhausted:month", 1), True),
        (Decision("DEFER", 5, "exhausted:day", 1), True),
        (Decision("DEFER", 0, "inflight:day", 1), False),
        (Decision("DEFER", 5, "rate:itpm", 1), False),
        (Decision("REJECT", 0, "too_large:rate:itpm", 1), False),
        (Decision("DEFER", 0, "concurrency", 1), False),
        (Decision("REJECT", 0, "model_not_allowed", 1), False),
        (Decision("REJECT", 0, "global:exhausted:day", 1), False),
        (Decision("REJECT", 0, "key:exhausted:day", 1), False),
        (Decision("DEFER", 5, "not_replicated", 1), False),
        (Decision("ADMIT", 0, "", 1), False),
    ],
)
def test_only_a_budget_refusal_falls_back(decision: Decision, falls_back: bool) -> None:
    assert is_budget_refusal(decision) is falls_back


async def test_the_policy_s_fallbacks_are_read_lazily_and_cached(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("c", TenantPolicy(fallback_models=FALLBACKS))
    now = [0.0]
    models = FallbackModels(store, clock=lambda: now[0])
    assert await models.of("c") == FALLBACKS
    await store.put("c", TenantPolicy())
    assert await models.of("c") == FALLBACKS  # within the cache time
    now[0] = 5.0
    assert await models.of("c") == {}
    assert await models.of("nobody") == {}


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        ({OPUS: OPUS}, "falls back to itself"),
        ({OPUS: SONNET, SONNET: "claude-haiku-4-5"}, "is a chain"),
        ({"": SONNET}, "invalid model name"),
        ({OPUS: "x" * 201}, "invalid model name"),
    ],
)
def test_bad_fallback_models_are_refused(fallbacks: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TenantPolicy(fallback_models=fallbacks)


def test_a_fallback_outside_allowed_models_is_refused() -> None:
    with pytest.raises(ValidationError, match="not in allowed_models"):
        TenantPolicy(fallback_models=FALLBACKS, allowed_models=[OPUS])
    assert TenantPolicy(fallback_models=FALLBACKS, allowed_models=[OPUS, SONNET])
