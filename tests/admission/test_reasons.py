"""admission/reasons.py: every reason reserve.lua answers parses to a typed Reason and
formats back to the same string."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Decision, Usage
from budgeter.admission.reasons import (
    LIMIT_KINDS,
    REASON_KINDS,
    Limit,
    Reason,
    format_reason,
    metric_reason,
    parse_reason,
)
from budgeter.domain.periods import PERIODS
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.policy_fields import RATE_KINDS
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z


@st.composite
def reasons(draw: st.DrawFn) -> Reason:
    kind = draw(st.sampled_from(sorted(REASON_KINDS)))
    scope = draw(st.sampled_from(["tenant", "account", "key", "parent"]))
    account, key = scope == "account", scope == "key"
    parent = draw(st.sampled_from(["research", "a", "team_1-x"])) if scope == "parent" else ""
    if kind not in LIMIT_KINDS:
        return Reason(kind, None, account, parent, key)  # type: ignore[arg-type]
    budget = kind != "rate" and (kind != "too_large" or draw(st.booleans()))
    name = draw(st.sampled_from(PERIODS if budget else RATE_KINDS))
    usd = budget and draw(st.booleans())
    limit = Limit(name, budget=budget, of_model=draw(st.booleans()), usd=usd)
    return Reason(kind, limit, account, parent, key)  # type: ignore[arg-type]


@given(reasons())
def test_parse_inverts_format(reason: Reason) -> None:
    assert parse_reason(format_reason(reason)) == reason


def test_an_ancestors_reason_names_it_and_its_metric_label_does_not() -> None:
    reason = parse_reason("parent:research:exhausted:day")
    assert (reason.parent, reason.kind, reason.limit) == (
        "research",
        "exhausted",
        Limit("day", budget=True),
    )
    assert metric_reason("parent:research:exhausted:day") == "parent:exhausted:day"
    assert metric_reason("key:rate:rpm") == "key:rate:rpm"
    assert parse_reason("key:concurrency").key
    for bad in ("parent::exhausted:day", "parent:research:global:rate:rpm", "key:global:paused"):
        with pytest.raises(ValueError):
            parse_reason(bad)


@pytest.mark.parametrize(
    "text",
    [
        "rate:itpm",
        "rate:model:rpm",
        "exhausted:day",
        "exhausted:model:usd:month",
        "inflight:usd:total",
        "too_large:budget:model:day",
        "too_large:rate:otpm",
        "too_large:rate:model:itpm",
        "concurrency",
        "paused",
        "model_not_allowed",
        "unpriced_model",
        "unknown_tenant",
        "global:paused",
        "global:rate:model:otpm",
        "global:exhausted:usd:day",
    ],
)
def test_format_inverts_parse(text: str) -> None:
    assert format_reason(parse_reason(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "weird", "rate", "rate:", "rate:usd:day", "too_large:day", "paused:x", "global:"],
)
def test_not_a_reason_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reason(text)
    # describe() falls back to the raw string
    assert Decision("DEFER", 0, text, NOW).parsed_reason is None


def test_typed_fields() -> None:
    reason = parse_reason("global:too_large:budget:model:usd:day")
    assert reason == Reason("too_large", Limit("day", budget=True, of_model=True, usd=True), True)
    assert reason.limit is not None and reason.limit.label("x") == "day USD budget of model x"
    assert parse_reason("rate:model:rpm").limit == Limit("rpm", budget=False, of_model=True)


async def test_every_reason_reserve_lua_answers_round_trips(redis: Redis) -> None:
    """What the script writes is exactly what format_reason gives back."""
    store = TenantStore(redis)
    await store.put(
        "beta",
        TenantPolicy.model_validate(
            {
                "budgets": {"day": 1000},
                "rate": {"rpm": 2, "otpm": 500},
                "models": {"m1": {"budgets": {"hour": 100}, "rate": {"itpm": 600}}},
                "max_concurrency": 1,
            }
        ),
    )
    await store.put("gamma", TenantPolicy.model_validate({"budgets": {"day": 100}}))
    await store.put("delta", TenantPolicy.model_validate({"usd_budgets": {"day": 1.0}}))
    adm = Admission(redis)

    async def reason(tenant: str, rid: str, i: int, o: int, model: str = "m0") -> str:
        decision = await adm.reserve(tenant, rid, i, o, model=model, now_ms=NOW)
        if decision.kind == "ADMIT":
            await adm.settle(tenant, rid, Usage(i, o), now_ms=NOW)
        return decision.reason

    got = [await reason("beta", "r0", 10, 600, "m1")]
    held = await adm.reserve("beta", "r1", 50, 10, model="m1", now_ms=NOW)  # kept in flight
    got += [
        held.reason,
        await reason("beta", "r2", 30, 20, "m1"),
        await reason("beta", "r3", 10, 600),
        await reason("beta", "r4", 10, 10),
    ]
    await adm.settle("beta", "r1", Usage(50, 10), now_ms=NOW)
    got += [await reason("beta", "r5", 1, 1), await reason("beta", "r6", 1, 1)]
    got += [await reason("gamma", "g1", 50, 40), await reason("gamma", "g2", 10, 10)]
    got += [await reason("delta", "d1", 1, 1), await reason("nobody", "x", 1, 1)]
    assert got == [
        "too_large:budget:model:hour",
        "",
        "inflight:model:hour",
        "too_large:rate:otpm",
        "concurrency",
        "",
        "rate:rpm",
        "",
        "exhausted:day",
        "unpriced_model",
        "unknown_tenant",
    ]
    for text in filter(None, got):
        assert format_reason(parse_reason(text)) == text
