"""Policy depth against a real Redis: the upstream account's limits per model (with the
tenant's reservation rolled back when they refuse, and a 429 pausing the model for every
process), per-model limits and an allow-list inside a tenant policy, and USD budgets."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.admission.global_limits import GlobalLimits
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.domain.pricing import ModelPrice
from budgeter.store.keys import TenantKeys, global_policy_key
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from budgeter.upstream.client import UpstreamClient, UpstreamError
from budgeter.upstream.mock import MockConfig
from tests.api.test_app import ADMIN, client, expect_error, new_tenant, request_line
from tests.helpers import mock_upstream

__all__ = ["client"]  # the API fixture

NOW = 1_790_000_000_000  # a fixed Redis-independent clock for the scripts


async def _global(redis: Redis, policy: dict[str, Any]) -> None:
    await redis.set(
        global_policy_key("budgeter"), GlobalPolicy.model_validate(policy).model_dump_json()
    )


def _admission(redis: Redis, **kw: Any) -> Admission:
    return Admission(redis, global_limits=GlobalLimits(redis, refresh_s=0), **kw)


async def _tenant_state(redis: Redis, tenant: str) -> dict[str, Any]:
    keys = TenantKeys.of("budgeter", tenant)
    return {
        "buckets": await redis.hgetall(keys.buckets),
        "budget": await redis.hgetall(keys.budget),
        "resv": await redis.hgetall(keys.resv),
    }


async def test_the_account_limit_of_a_model_is_shared_by_tenants_and_rolls_back_theirs(
    redis: Redis,
) -> None:
    store = TenantStore(redis)
    for tenant in ("ga", "gb"):
        await store.put(tenant, TenantPolicy(budgets={"day": 1_000_000}, rate={"rpm": 100}))
    await _global(redis, {"rate": {"rpm": 2}, "models": {"big": {"rate": {"otpm": 1000}}}})
    admission = _admission(redis)

    assert (await admission.reserve("ga", "r1", 10, 10, model="m", now_ms=NOW)).kind == "ADMIT"
    assert (await admission.reserve("gb", "r2", 10, 10, model="m", now_ms=NOW)).kind == "ADMIT"
    before = await _tenant_state(redis, "gb")
    third = await admission.reserve("gb", "r3", 10, 10, model="m", now_ms=NOW)
    assert (third.kind, third.reason) == ("DEFER", "global:rate:rpm")
    assert third.until_ms == NOW + 30_000  # two per minute: the next fits in 30 s
    assert "the upstream account's rpm rate limit reached" in third.describe("m")
    assert "upstream account" in third.describe("m")
    # the tenant's reservation was rolled back: its counters are as before (the bucket
    # moved forward and back by the same cost)
    after = await _tenant_state(redis, "gb")
    assert after["budget"] == before["budget"] and after["resv"] == before["resv"]
    assert float(after["buckets"]["rpm"]) == pytest.approx(float(before["buckets"]["rpm"]))

    # another model has its own account buckets; 'models' replaces the default
    assert (await admission.reserve("ga", "r4", 10, 10, model="n", now_ms=NOW)).kind == "ADMIT"
    big = await admission.reserve("ga", "r5", 10, 900, model="big", now_ms=NOW)
    assert big.kind == "ADMIT"  # rpm 2 does not apply to 'big', its otpm does
    big2 = await admission.reserve("ga", "r6", 10, 900, model="big", now_ms=NOW)
    assert (big2.kind, big2.reason) == ("DEFER", "global:rate:otpm")
    too_big = await admission.reserve("ga", "r7", 10, 5000, model="big", now_ms=NOW)
    assert (too_big.kind, too_big.reason) == ("REJECT", "global:too_large:rate:otpm")

    # settling refunds the unused output in both scopes
    result = await admission.settle("ga", "r5", Usage(10, 100), now_ms=NOW)
    assert result.settled == 1
    after_settle = await admission.reserve("ga", "r8", 10, 900, model="big", now_ms=NOW)
    assert after_settle.kind == "ADMIT"
    assert await admission.global_limits.models() == ["big", "m", "n"]  # type: ignore[union-attr]


async def test_account_reservations_of_a_dead_process_are_reaped_in_full(redis: Redis) -> None:
    await TenantStore(redis).put("ga", TenantPolicy())
    await _global(redis, {"budgets": {"day": 1000}})
    dead = _admission(redis)
    assert (
        await dead.reserve("ga", "r1", 100, 400, model="m", now_ms=NOW, hold_ms=1000)
    ).kind == "ADMIT"
    survivor = _admission(redis)  # another process: knows nothing of r1
    assert await survivor.reap_global(now_ms=NOW + 500) == 0
    assert await survivor.reap_global(now_ms=NOW + 2000) == 1
    # charged in full (marked sent at once): 500 of the 1000 are used
    next_one = await survivor.reserve("ga", "r2", 100, 400, model="m", now_ms=NOW + 2000)
    assert next_one.kind == "ADMIT"
    over = await survivor.reserve("ga", "r3", 1, 1, model="m", now_ms=NOW + 2000)
    assert (over.kind, over.reason) == ("DEFER", "global:inflight:day")


async def test_an_upstream_429_pauses_the_model_for_every_process(redis: Redis) -> None:
    await TenantStore(redis).put("ga", TenantPolicy())
    config = MockConfig(fault_rate=1.0, fault_kinds=["429"], retry_after_s=30)
    worker_a = GlobalLimits(redis, refresh_s=0)
    async with mock_upstream(config) as (url, _), aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, url, "k", max_attempts=1, on_rate_limited=worker_a.pause)
        with pytest.raises(UpstreamError) as info:
            await upstream.create_message(
                {"model": "hot", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
            )
        assert info.value.status == 429
    # another process, with its own view, defers that model and only that model
    other = Admission(redis, global_limits=GlobalLimits(redis, refresh_s=0))
    paused = await other.reserve("ga", "r1", 10, 10, model="hot")
    assert (paused.kind, paused.reason) == ("DEFER", "global:paused")
    assert 25_000 < paused.until_ms - paused.now_ms <= 30_000
    assert "429" in paused.describe("hot")
    assert (await other.reserve("ga", "r2", 10, 10, model="cold")).kind == "ADMIT"
    # the tenant was not charged for the paused attempt
    assert "r1" not in await redis.hgetall(TenantKeys.of("budgeter", "ga").resv)
    # with account limits on the model, the script itself sees the pause too
    await _global(redis, {"rate": {"rpm": 100}})
    script_view = Admission(redis, global_limits=GlobalLimits(redis, refresh_s=0))
    script_view.global_limits._pauses = {}  # type: ignore[union-attr]
    script_view.global_limits.refresh_s = 3600  # type: ignore[union-attr]
    script_view.global_limits._loaded_at = 0.0  # type: ignore[union-attr]
    script_view.global_limits.clock = lambda: 1.0  # type: ignore[union-attr]
    script_view.global_limits._policy = GlobalPolicy(rate={"rpm": 100})  # type: ignore[union-attr]
    again = await script_view.reserve("ga", "r3", 10, 10, model="hot")
    assert (again.kind, again.reason) == ("DEFER", "global:paused")
    assert "r3" not in await redis.hgetall(TenantKeys.of("budgeter", "ga").resv)


async def test_per_model_limits_and_the_allow_list(redis: Redis) -> None:
    policy = TenantPolicy.model_validate(
        {
            "budgets": {"day": 100_000},
            "models": {
                "fast": {"rate": {"rpm": 1}},
                "big": {"budgets": {"day": 300}},
            },
            "allowed_models": ["fast", "big", "other"],
        }
    )
    await TenantStore(redis).put("pm", policy)
    admission = Admission(redis)
    assert (await admission.reserve("pm", "a", 10, 10, model="fast", now_ms=NOW)).kind == "ADMIT"
    second = await admission.reserve("pm", "b", 10, 10, model="fast", now_ms=NOW)
    assert (second.kind, second.reason) == ("DEFER", "rate:model:rpm")
    assert "rpm rate limit of model fast" in second.describe("fast")
    assert (await admission.reserve("pm", "c", 10, 10, model="other", now_ms=NOW)).kind == "ADMIT"

    huge = await admission.reserve("pm", "d", 100, 400, model="big", now_ms=NOW)
    assert (huge.kind, huge.reason) == ("REJECT", "too_large:budget:model:day")
    assert "day token budget of model big is 300" in huge.describe("big")
    assert (await admission.reserve("pm", "e", 100, 100, model="big", now_ms=NOW)).kind == "ADMIT"
    await admission.settle("pm", "e", Usage(100, 100), now_ms=NOW)
    spent = await admission.reserve("pm", "f", 100, 100, model="big", now_ms=NOW)
    assert (spent.kind, spent.reason) == ("REJECT", "exhausted:model:day")

    refused = await admission.reserve("pm", "g", 10, 10, model="forbidden", now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "model_not_allowed")
    assert "allowed_models" in refused.describe("forbidden")

    report = await tenant_usage(redis, "pm", now_ms=NOW)
    assert report is not None
    rows = {(r.period, r.unit, r.model): r for r in report.budgets}
    assert rows[("day", "tokens", "big")].used == 200
    assert rows[("day", "tokens", None)].used == 200


async def test_usd_budgets_are_reserved_and_settled_at_the_model_price(redis: Redis) -> None:
    # 1000 / 2000 USD per million tokens: 0.001 $ per input token, 0.002 $ per output token
    prices = {"m": ModelPrice(input=1000, output=2000, cache_write=1250, cache_read=100)}
    await TenantStore(redis).put("usd", TenantPolicy(usd_budgets={"day": 1.0}))
    admission = Admission(redis, prices=prices)
    first = await admission.reserve("usd", "a", 100, 200, model="m", now_ms=NOW)
    assert first.kind == "ADMIT"  # 100 * 0.00125 (dearest input) + 200 * 0.002 = 0.525 $
    second = await admission.reserve("usd", "b", 100, 200, model="m", now_ms=NOW)
    assert (second.kind, second.reason) == ("DEFER", "inflight:usd:day")
    too_big = await admission.reserve("usd", "c", 100, 1000, model="m", now_ms=NOW)
    assert (too_big.kind, too_big.reason) == ("REJECT", "too_large:budget:usd:day")
    assert "the day USD budget is 1" in too_big.describe("m")

    await admission.settle("usd", "a", Usage(80, 50, 20, 0), now_ms=NOW)  # 0.08 + 0.1 + 0.025
    assert (await admission.reserve("usd", "b", 100, 200, model="m", now_ms=NOW)).kind == "ADMIT"
    report = await tenant_usage(redis, "usd", now_ms=NOW)
    assert report is not None
    [row] = [r for r in report.budgets if r.unit == "usd"]
    assert row.used == pytest.approx(0.205)
    assert row.reserved == pytest.approx(0.525)
    assert row.remaining == pytest.approx(1.0 - 0.205 - 0.525)
    [day] = [r for r in report.usage if r.period == "day"]
    assert day.amount("usd") == pytest.approx(0.205) and day.amount("input") == 80

    unpriced = await admission.reserve("usd", "d", 1, 1, model="zzz", now_ms=NOW)
    assert (unpriced.kind, unpriced.reason) == ("REJECT", "unpriced_model")
    # a charge in full costs the reservation's price
    await admission.charge_full("usd", "b", now_ms=NOW)
    report = await tenant_usage(redis, "usd", now_ms=NOW)
    assert report is not None
    [row] = [r for r in report.budgets if r.unit == "usd"]
    assert row.used == pytest.approx(0.73) and row.reserved == 0


async def test_prices_are_matched_exactly_then_by_prefix_then_star() -> None:
    from budgeter.domain.pricing import price_of

    table = {
        "claude-sonnet-4-5": ModelPrice(input=3, output=15),
        "claude": ModelPrice(input=9, output=9),
        "*": ModelPrice(input=1, output=1),
    }
    assert price_of(table, "claude-sonnet-4-5-20250929").input == 3  # type: ignore[union-attr]
    assert price_of(table, "claude-x").input == 9  # type: ignore[union-attr]
    assert price_of(table, "gpt").input == 1  # type: ignore[union-attr]
    assert price_of({}, "gpt") is None
    assert ModelPrice(input=3, output=15).lua_arg() == "3 15 3.75 0.3"


async def test_the_global_policy_validates_and_stored_json_is_lenient() -> None:
    assert GlobalPolicy.from_stored(json.dumps({"rate": {"rpm": 5}, "weight": 3})).rate.rpm == 5
    assert GlobalPolicy.from_stored(None) == GlobalPolicy()
    with pytest.raises(ValueError):
        GlobalPolicy.model_validate({"models": {"": {}}})


async def test_the_api_refuses_models_outside_the_allow_list_and_stores_the_global_policy(
    client: TestClient,
) -> None:
    key = await new_tenant(client, "al", {"allowed_models": ["claude-test"]})
    auth = {"x-api-key": key}
    resp = await client.post(
        "/v1/messages/batches",
        json={"requests": [request_line("ok"), request_line("no", model="other-model")]},
        headers=auth,
    )
    message = await expect_error(resp, 403, "permission_error")
    assert message.startswith("requests.1.params.model: model 'other-model' is not in")
    listed = await (await client.get("/v1/messages/batches", headers=auth)).json()
    assert listed["data"] == []  # nothing was queued

    policy = {"rate": {"rpm": 50}, "models": {"claude-test": {"rate": {"itpm": 1000}}}}
    resp = await client.put("/admin/global-policy", json=policy, headers=ADMIN)
    assert resp.status == 200
    got = await (await client.get("/admin/global-policy", headers=ADMIN)).json()
    assert got["policy"]["rate"]["rpm"] == 50
    assert got["policy"]["models"]["claude-test"]["rate"]["itpm"] == 1000
    await expect_error(
        await client.put("/admin/global-policy", json={"weight": 2}, headers=ADMIN),
        400,
        "invalid_request_error",
    )


async def test_the_proxy_answers_403_for_a_model_outside_the_allow_list(
    redis: Redis, redis_url: str
) -> None:
    from aiohttp.test_utils import TestServer

    from budgeter.api.app import create_app
    from budgeter.settings import Settings

    async with mock_upstream() as (url, _):
        settings = Settings(redis_url=redis_url, admin_token="admin-secret", upstream_url=url)
        async with TestClient(TestServer(create_app(settings, redis=redis))) as api:
            key = await new_tenant(api, "al", {"allowed_models": ["claude-test"]})
            body = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
            resp = await api.post(
                "/v1/messages", json={**body, "model": "other"}, headers={"x-api-key": key}
            )
            message = await expect_error(resp, 403, "permission_error")
            assert "'other' is not in this tenant's allowed_models" in message
            resp = await api.post(
                "/v1/messages", json={**body, "model": "claude-test"}, headers={"x-api-key": key}
            )
            assert resp.status == 200
