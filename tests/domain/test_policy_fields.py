"""domain/policy_fields.py: the flat policy hash's field names, formatted and parsed in
one place, and exactly the names admission/reserve.lua reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.domain.periods import PERIODS
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.policy_fields import (
    RATE_KINDS,
    LimitField,
    bucket_field,
    budget_counter,
    counter_field,
    field_models,
    format_field,
    format_tat,
    parse_bucket_field,
    parse_field,
    parse_tat,
)
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z

models = st.text(
    st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
) | st.sampled_from(["claude-sonnet-4", "a:b", "m:x:budget:day", "usd"])


@st.composite
def limit_fields(draw: st.DrawFn) -> LimitField:
    kind = draw(st.sampled_from(["budget", "usd", "rate"]))
    name = draw(st.sampled_from(RATE_KINDS if kind == "rate" else PERIODS))
    return LimitField(kind, name, draw(st.none() | models))  # type: ignore[arg-type]


@given(limit_fields())
def test_parse_inverts_format(field: LimitField) -> None:
    assert parse_field(format_field(field)) == field


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("budget:day", LimitField("budget", "day")),
        ("usd:month", LimitField("usd", "month")),
        ("rate:itpm", LimitField("rate", "itpm")),
        ("m:claude:x:rate:rpm", LimitField("rate", "rpm", "claude:x")),
        ("m:a:usd:total", LimitField("usd", "total", "a")),
    ],
)
def test_the_names_reserve_lua_reads(name: str, field: LimitField) -> None:
    assert parse_field(name) == field
    assert format_field(field) == name


@pytest.mark.parametrize(
    "name",
    [
        "json",
        "weight",
        "on_exhausted",
        "max_concurrency",
        "allowlist",
        "allow:m",
        "budget:week",
        "rate:day",
        "m::budget:day",
        "m:budget:day",
        "usd",
    ],
)
def test_other_fields_are_no_limit(name: str) -> None:
    assert parse_field(name) is None


@given(
    st.dictionaries(st.sampled_from(PERIODS), st.integers(1, 10**9)),
    st.dictionaries(models, st.dictionaries(st.sampled_from(PERIODS), st.integers(1, 10**6))),
)
def test_every_limit_of_a_policy_round_trips(
    budgets: dict[str, int], per_model: dict[str, dict[str, int]]
) -> None:
    policy = TenantPolicy.model_validate(
        {
            "budgets": budgets,
            "rate": {"rpm": 5},
            "usd_budgets": {"day": 1.5},
            "models": {m: {"budgets": b, "rate": {"otpm": 3}} for m, b in per_model.items()},
            "allowed_models": sorted(per_model),
            "max_concurrency": 2,
        }
    )
    fields = policy.redis_fields()
    parsed = {name: parse_field(name) for name in fields}
    for name, field in parsed.items():
        if field is not None:
            assert format_field(field) == name
    limits = {f for f in parsed.values() if f is not None}
    assert LimitField("rate", "rpm") in limits and LimitField("usd", "day") in limits
    assert {LimitField("budget", p) for p in budgets} <= limits
    assert field_models(fields) == sorted(per_model)


def test_budget_counters() -> None:
    assert budget_counter("day") == "day"
    assert budget_counter("month", usd=True) == "usd:month"
    assert budget_counter("hour", usd=True, model="a:b") == "m:a:b:usd:hour"
    assert counter_field(budget_counter("day", model="x"), "reserved") == "m:x:day:reserved"


async def test_reserve_lua_keeps_the_counters_named_here(redis: Redis) -> None:
    policy = {"budgets": {"day": 1000}, "models": {"a:b": {"budgets": {"hour": 500}}}}
    await TenantStore(redis).put("acme", TenantPolicy.model_validate(policy))
    adm = Admission(redis)
    decision = await adm.reserve("acme", "r1", 10, 20, model="a:b", now_ms=NOW)
    assert decision.kind == "ADMIT"
    fields = await redis.hgetall(adm.keys("acme").budget)
    for counter in (budget_counter("day"), budget_counter("hour", model="a:b")):
        assert fields[counter_field(counter, "reserved")] == "30"
        assert counter_field(counter, "id") in fields


@given(st.sampled_from(RATE_KINDS), st.none() | models)
def test_bucket_fields_round_trip(kind: str, model: str | None) -> None:
    assert parse_bucket_field(bucket_field(kind, model)) == (kind, model)


@pytest.mark.parametrize("name", ["", "rpm:", "m:rpm", "m::rpm", "tpm", "m:a:day", "rate:rpm"])
def test_other_bucket_fields_are_none(name: str) -> None:
    assert parse_bucket_field(name) is None


@given(st.floats(0, 1e13, allow_nan=False))
def test_tat_round_trips_as_lua_writes_it(tat: float) -> None:
    parsed = parse_tat(format_tat(tat))
    assert parsed is not None and abs(parsed - tat) <= 0.0005 + 1e-9 * tat
    assert parse_tat(None) is None and parse_tat("nan") is None and parse_tat("x") is None


async def test_the_bucket_fields_reserve_lua_writes(redis: Redis) -> None:
    """reserve.lua writes the buckets hash in exactly this format (field and number)."""
    policy = TenantPolicy.model_validate(
        {"rate": {"rpm": 60, "otpm": 6000}, "models": {"a:b": {"rate": {"itpm": 1000}}}}
    )
    await TenantStore(redis).put("bk", policy)
    assert (await Admission(redis).reserve("bk", "r1", 100, 50, model="a:b")).kind == "ADMIT"
    tats = await redis.hgetall("budgeter:{t:bk}:buckets")
    assert {parse_bucket_field(name) for name in tats} == {
        ("rpm", None),
        ("otpm", None),
        ("itpm", "a:b"),
    }
    for name, value in tats.items():
        assert format_tat(parse_tat(value) or -1) == value, name
