"""Admission along a chain, exactly (issue 21: mutmut's survivors in ``_reserve_chain``,
``_release_unreplicated``, ``charge_full`` and ``admission_from_settings``).

An ADMIT carries the latest next request of every scope it was made in; of equal DEFERs
the nearest scope is named; a REJECT ends the checks (a later DEFER cannot replace it) and
is the answer even after an earlier scope's DEFER; a reservation that a scope of the chain,
or the account's scope, made without the replicas acknowledging it is released in every
scope it was made in and the caller gets the failure; a charge in full rolls up in the
minute it was made."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage, admission_from_settings
from budgeter.admission.decision import SettleResult
from budgeter.admission.global_limits import GlobalLimits
from budgeter.admission.scopes import reserve_keys, settle_keys
from budgeter.admission.tree_view import TreeView
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.settings import Settings
from budgeter.store.durability import NotReplicated
from budgeter.store.keys import (
    GlobalModelKeys,
    KeyScopeKeys,
    TenantKeys,
    global_policy_key,
    notify_pending_key,
    tree_parents_key,
)
from budgeter.tenants.store import TenantStore
from tests.admission.test_chain import NOW, budget, record, tree
from tests.helpers import UnreplicatedAfter


async def test_an_admit_carries_the_latest_next_request_of_its_chain(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "top": {"rate": {"rpm": 2}},  # a request every 30 s
            "mid": {"parent": "top", "rate": {"rpm": 3}},  # every 20 s
            "leaf": {"parent": "mid"},  # no rate of its own: its ADMIT says nothing
        },
    )
    first = await adm.reserve("leaf", "r0", 10, 10, now_ms=NOW)
    assert (first.kind, first.until_ms) == ("ADMIT", 0)
    second = await adm.reserve("leaf", "r1", 10, 10, now_ms=NOW)
    assert (second.kind, second.until_ms) == ("ADMIT", NOW + 30_000)  # top's, the latest
    assert second.next_request_ms == NOW + 30_000


async def test_of_equal_defers_the_nearest_scope_is_named(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "top": {"rate": {"rpm": 2}},
            "mid": {"parent": "top", "rate": {"rpm": 2}},
            "leaf": {"parent": "mid"},
        },
    )
    for rid in ("r0", "r1"):
        assert (await adm.reserve("leaf", rid, 10, 10, now_ms=NOW)).kind == "ADMIT"
    third = await adm.reserve("leaf", "r2", 10, 10, now_ms=NOW)
    assert (third.kind, third.reason, third.until_ms) == (
        "DEFER",
        "parent:mid:rate:rpm",
        NOW + 30_000,
    )


async def test_a_later_scopes_reject_is_the_answer_after_an_earlier_scopes_defer(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "top": {"allowed_models": ["x"]},
            "mid": {"parent": "top", "rate": {"rpm": 1}},
            "leaf": {"parent": "mid"},
        },
    )
    assert (await adm.reserve("leaf", "q1", 10, 10, model="x", now_ms=NOW)).kind == "ADMIT"
    refused = await adm.reserve("leaf", "q2", 10, 10, model="y", now_ms=NOW)
    assert (refused.kind, refused.reason, refused.detail) == (
        "REJECT",
        "parent:top:model_not_allowed",
        "y",
    )


async def test_a_reject_ends_the_checks_and_a_later_defer_does_not_replace_it(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "top": {"rate": {"rpm": 1}},
            "mid": {"parent": "top", "allowed_models": ["x"]},
            "leaf": {"parent": "mid"},
        },
    )
    assert (await adm.reserve("leaf", "q1", 10, 10, model="x", now_ms=NOW)).kind == "ADMIT"
    refused = await adm.reserve("leaf", "q2", 10, 10, model="y", now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "parent:mid:model_not_allowed")
    assert refused.until_ms == 0


def unreplicated_at(adm: Admission, call: int) -> UnreplicatedAfter:
    """The ``call``-th reservation script call (1 = the tenant's) runs, then fails as a
    WAIT that fell short would: the write is on the master, the caller gets the error."""
    failing = UnreplicatedAfter(adm._reserve, {call})
    adm._reserve = failing  # type: ignore[assignment]
    return failing


async def reserved_in(redis: Redis, *scopes: TenantKeys | KeyScopeKeys) -> list[str]:
    return [(await redis.hgetall(s.budget)).get("day:reserved", "0") for s in scopes]


async def test_an_unreplicated_reservation_in_the_chain_is_released_in_every_scope(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "top": {"budgets": {"day": 10_000}},
            "mid": {"parent": "top", "budgets": {"day": 10_000}},
            "leaf": {"budgets": {"day": 10_000}, "parent": "mid"},
        },
    )
    key = KeyScopeKeys("budgeter", "leaf", "k1")
    await redis.hset(key.policy, mapping={"budget:day": "10000"})
    await redis.sadd(TenantKeys.of("budgeter", "leaf").limited_keys, "k1")
    plain = adm._reserve
    calls = unreplicated_at(adm, 3)  # leaf (with its key), mid, then top's fails
    with pytest.raises(NotReplicated):
        await adm.reserve("leaf", "r1", 100, 100, now_ms=NOW, key="k1")
    assert calls.calls == 3
    scopes = [TenantKeys.of("budgeter", t) for t in ("leaf", "mid", "top")]
    assert await reserved_in(redis, *scopes, key) == ["0", "0", "0", "0"]
    for scope in (*scopes, key):
        assert await redis.hlen(scope.resv) == 0
    assert "r1" not in adm._chains
    # nothing is left held: the next reservation is admitted in every scope
    adm._reserve = plain
    assert (await adm.reserve("leaf", "r2", 100, 100, now_ms=NOW, key="k1")).kind == "ADMIT"
    assert await reserved_in(redis, *scopes, key) == ["200", "200", "200", "200"]


async def test_an_unreplicated_reservation_in_the_accounts_scope_is_released_everywhere(
    redis: Redis,
) -> None:
    store = TenantStore(redis)
    await store.put("org", TenantPolicy(budgets={"day": 10_000}))
    await store.put("team", TenantPolicy(parent="org", budgets={"day": 10_000}))
    await redis.set(
        global_policy_key("budgeter"),
        GlobalPolicy.model_validate(
            {"models": {"big": {"rate": {"otpm": 100_000}}}}
        ).model_dump_json(),
    )
    adm = Admission(
        redis, global_limits=GlobalLimits(redis, refresh_s=0), tree=TreeView(redis, refresh_s=0)
    )
    calls = unreplicated_at(adm, 3)  # team, org, then the account's scope of "big"
    with pytest.raises(NotReplicated):
        await adm.reserve("team", "g1", 100, 100, model="big", now_ms=NOW)
    assert calls.calls == 3
    team, org = TenantKeys.of("budgeter", "team"), TenantKeys.of("budgeter", "org")
    assert await reserved_in(redis, team, org) == ["0", "0"]
    account = GlobalModelKeys("budgeter", "big")
    for scope in (team, org, account):
        assert await redis.hlen(scope.resv) == 0


async def test_a_charge_in_full_rolls_up_in_the_minute_given(redis: Redis) -> None:
    adm = await tree(redis, {"cf": {"budgets": {"day": 10_000}}})
    assert (await adm.reserve("cf", "c1", 100, 50, now_ms=NOW)).kind == "ADMIT"
    await adm.charge_full("cf", "c1", now_ms=NOW)
    minutes = await redis.hgetall(TenantKeys.of("budgeter", "cf").minutes)
    minute = NOW // 60_000
    assert (minutes[f"{minute}:input"], minutes[f"{minute}:output"]) == ("100", "50")
    assert (await budget(redis, "cf"))["day:used"] == "150"


def test_admission_from_settings_sees_the_tree_under_its_prefix(redis: Redis) -> None:
    adm = admission_from_settings(redis, Settings(key_prefix="acme"))
    assert adm.tree._parents_key == tree_parents_key("acme")


FUTURE = 10**13  # 2286: later than Redis's own clock, so a reap at Redis time reaps nothing


async def test_the_account_scopes_are_reaped_at_the_time_given_and_counted(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("acct", TenantPolicy(budgets={"day": 10**9}))
    await redis.set(
        global_policy_key("budgeter"),
        GlobalPolicy.model_validate(
            {"rate": {"rpm": 1000}, "models": {"big": {"rate": {"otpm": 10**6}}}}
        ).model_dump_json(),
    )
    adm = Admission(redis, global_limits=GlobalLimits(redis, refresh_s=0))
    assert await Admission(redis).reap_global(now_ms=FUTURE) == 0  # no account limits
    for rid, model in (("a1", "big"), ("a2", "small"), ("a3", "small")):
        decision = await adm.reserve("acct", rid, 10, 10, model=model, hold_ms=1_000, now_ms=FUTURE)
        assert decision.kind == "ADMIT"
    assert await adm.reap_global(now_ms=FUTURE + 500) == 0  # still held
    assert await adm.reap_global(now_ms=FUTURE + 2_000) == 3  # both models' scopes
    assert await adm.reap_global(now_ms=FUTURE + 3_000) == 0
    for model in ("big", "small"):
        assert await redis.hlen(GlobalModelKeys("budgeter", model).resv) == 0


async def test_a_reap_at_the_time_given_covers_the_keys_scope_and_writes_the_ledger(
    redis: Redis,
) -> None:
    adm = await tree(redis, {"rteam": {"budgets": {"day": 10**9}}})
    key = KeyScopeKeys("budgeter", "rteam", "k1")
    await redis.hset(key.policy, mapping={"budget:day": "100000"})
    await redis.sadd(TenantKeys.of("budgeter", "rteam").limited_keys, "k1")
    decision = await adm.reserve("rteam", "d1", 10, 10, hold_ms=1_000, now_ms=FUTURE, key="k1")
    assert decision.kind == "ADMIT"
    assert await adm.mark_sent("rteam", "d1")
    assert (await adm.reap("rteam", now_ms=FUTURE + 500)).settled == 0  # still held
    reaped = await adm.reap("rteam", now_ms=FUTURE + 2_000)
    assert (reaped.settled, reaped.charged_full) == (1, 1)
    for scope in (TenantKeys.of("budgeter", "rteam"), key):
        assert await redis.hlen(scope.resv) == 0
    assert (await redis.hgetall(key.budget))["day:used"] == "20"  # the key's: in full
    entries = await redis.xrange(TenantKeys.of("budgeter", "rteam").ledger)
    assert [fields["outcome"] for _, fields in entries] == ["charged_full"]


async def test_a_settle_rolls_up_in_the_minute_given(redis: Redis) -> None:
    adm = await tree(redis, {"sm": {"budgets": {"day": 10_000}}})
    assert (await adm.reserve("sm", "s1", 100, 50, now_ms=NOW)).kind == "ADMIT"
    await adm.settle("sm", "s1", Usage(40, 20), now_ms=NOW)
    minutes = await redis.hgetall(TenantKeys.of("budgeter", "sm").minutes)
    minute = NOW // 60_000
    assert (minutes[f"{minute}:input"], minutes[f"{minute}:output"]) == ("40", "20")


def settled_with(*ancestors: str, waiting: bool = False) -> SettleResult:
    return SettleResult(1, waiting, 0, 0, 0, 0, waiting_ancestors=ancestors)


async def test_the_tenants_to_wake_are_those_below_each_ancestor_that_waited(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "top": {},
            "mid": {"parent": "top"},
            "a": {"parent": "mid"},
            "b": {"parent": "mid"},
            "c": {"parent": "top"},
            "d": {"parent": "a"},
        },
    )
    assert await adm.to_wake("a", settled_with()) == []
    assert await adm.to_wake("a", settled_with(waiting=True)) == ["a"]
    # below mid: a is the settling tenant itself (nor what is below it), b
    assert await adm.to_wake("a", settled_with("mid")) == ["b"]
    assert await adm.to_wake("a", settled_with("top", waiting=True)) == ["a", "c", "mid", "b"]
    assert await adm.to_wake("c", settled_with("top")) == ["mid", "a", "b", "d"]  # breadth first
    assert await adm.to_wake("a", settled_with("top"), limit=2) == ["c", "mid"]
    assert await adm.to_wake("a", settled_with("top"), limit=1) == ["c"]


async def account_limits(redis: Redis, policy: dict[str, object], **wall: Any) -> GlobalLimits:
    await redis.set(
        global_policy_key("budgeter"), GlobalPolicy.model_validate(policy).model_dump_json()
    )
    return GlobalLimits(redis, refresh_s=0, **wall)


async def test_the_accounts_refusal_is_named_and_rolls_back_the_tenant_and_its_chain(
    redis: Redis,
) -> None:
    store = TenantStore(redis)
    await store.put("gorg", TenantPolicy(budgets={"day": 10_000}))
    await store.put("gteam", TenantPolicy(parent="gorg", budgets={"day": 10_000}))
    limits = await account_limits(redis, {"rate": {"rpm": 1}})
    adm = Admission(redis, global_limits=limits, tree=TreeView(redis, refresh_s=0))
    assert (await adm.reserve("gteam", "g1", 10, 10, model="m", now_ms=NOW)).kind == "ADMIT"
    assert adm._held_globally == {"g1": "m"}
    refused = await adm.reserve("gteam", "g2", 10, 10, model="m", now_ms=NOW)
    assert (refused.kind, refused.reason, refused.until_ms) == (
        "DEFER",
        "global:rate:rpm",
        NOW + 60_000,
    )
    for tenant in ("gteam", "gorg"):  # g2 rolled back everywhere, g1 still held
        keys = TenantKeys.of("budgeter", tenant)
        assert (await budget(redis, tenant))["day:reserved"] == "20"
        assert list(await redis.hkeys(keys.resv)) == ["g1"]
    assert "g2" not in adm._chains and "g2" not in adm._held_globally
    account = GlobalModelKeys("budgeter", "m")
    assert list(await redis.hkeys(account.resv)) == ["g1"]


async def test_a_paused_model_defers_until_the_pause_ends_at_the_accounts_time(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("gp", TenantPolicy())
    limits = await account_limits(redis, {}, wall=lambda: 1_000.5)  # long before the pause
    until = await limits.pause("pm", 30)
    adm = Admission(redis, global_limits=limits)
    decision = await adm.reserve("gp", "p1", 10, 10, model="pm", now_ms=NOW)
    assert (decision.kind, decision.until_ms, decision.reason, decision.now_ms) == (
        "DEFER",
        until,
        "global:paused",
        1_000_500,
    )
    assert await redis.hlen(TenantKeys.of("budgeter", "gp").resv) == 0  # nothing reserved
    other = await adm.reserve("gp", "p2", 10, 10, model="other", now_ms=NOW)
    assert other.kind == "ADMIT"  # a pause is the model's only


async def test_the_price_argument_is_worked_out_once_a_utc_day_for_that_day(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    adm = Admission(redis)
    asked: list[tuple[str, object]] = []
    real = adm.prices.price

    def price(model: str, day: object) -> Any:
        asked.append((model, day))
        return real(model, day)  # type: ignore[arg-type]

    monkeypatch.setattr(adm.prices, "price", price)
    day = NOW // 86_400_000
    first = adm.price_arg("claude-sonnet-4-5", NOW)
    assert adm.price_arg("claude-sonnet-4-5", NOW + 1_000) == first  # the same day: kept
    assert asked == [("claude-sonnet-4-5", dt.date(2025, 11, 27))]
    assert adm._price_day == day
    adm.price_arg("claude-sonnet-4-5", NOW + 86_400_000)  # the next day: worked out again
    assert asked[-1] == ("claude-sonnet-4-5", dt.date(2025, 11, 28))
    assert adm._price_day == day + 1 and len(adm._price_args) == 1
    adm._price_args.update({f"m{i}": "" for i in range(999)})  # 1,000 remembered: the bound
    adm.price_arg("claude-sonnet-4-5", NOW + 86_400_000)
    assert len(adm._price_args) == 1  # cleared, then only this one
    adm.price_arg("claude-sonnet-4-5")  # no time given: today, by the clock
    assert adm._price_day == int(time.time() * 1000) // 86_400_000


# --- issue 21, second round: the account's scope, the hint, the defaults and the caches ---


async def test_an_admission_under_a_prefix_sees_the_tree_under_that_prefix(redis: Redis) -> None:
    store = TenantStore(redis, prefix="acme")
    await store.put("porg", TenantPolicy(budgets={"day": 10_000}))
    await store.put("pteam", TenantPolicy(parent="porg"))
    adm = Admission(redis, prefix="acme")  # its own tree view, of acme's tree
    assert adm.tree._parents_key == tree_parents_key("acme")
    assert (await adm.reserve("pteam", "p1", 10, 10, now_ms=NOW)).kind == "ADMIT"
    parent = await redis.hgetall(TenantKeys.of("acme", "porg").budget)
    assert parent["day:reserved"] == "20"
    assert list(await redis.hkeys(TenantKeys.of("acme", "porg").resv)) == ["p1"]


async def test_a_mapping_of_prices_overrides_the_table_and_a_price_table_is_kept(
    redis: Redis,
) -> None:
    adm = Admission(redis, prices={"house-model": ModelPrice(input=3, output=15)})
    assert adm.price_arg("house-model", NOW) == ModelPrice(input=3, output=15).lua_arg()
    assert adm.price_arg("house-model", NOW) == "3 15 3.75 0.3"
    table = PriceTable(bundled=False)
    assert Admission(redis, prices=table).prices is table


def test_a_tenants_key_names_are_remembered_and_forgotten_only_for_a_new_tenant(
    redis: Redis,
) -> None:
    adm = Admission(redis)
    names = adm._names("kn")
    assert adm._names("kn") is names  # remembered: worked out once
    assert names[0] == reserve_keys(TenantKeys.of("budgeter", "kn"))
    assert names[1] == settle_keys(TenantKeys.of("budgeter", "kn"), ledger=True)
    adm._key_names.update({f"t{i}": names for i in range(9_999)})  # 10,000 remembered
    assert adm._names("kn") is names and len(adm._key_names) == 10_000  # known: kept
    adm._names("another")
    assert list(adm._key_names) == ["another"]  # a new one at the bound: cleared first


class AskedPrices(PriceTable):
    """The price table, recording the (model, day) of every price asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, dt.date | None]] = []

    def price(self, model: str, day: dt.date | None = None) -> ModelPrice | None:
        self.asked.append((model, day))
        return super().price(model, day)


@pytest.fixture
def local_time_behind_utc() -> Iterator[None]:
    """The process's local time zone twelve hours behind UTC (a POSIX TZ), restored after."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC+12"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("local_time_behind_utc")
def test_the_price_day_is_the_utc_day_whatever_the_local_time_zone(redis: Redis) -> None:
    prices = AskedPrices()
    adm = Admission(redis, prices=prices)
    one_am = NOW + 3_600_000  # 2025-11-27T01:00Z: still the 26th twelve hours west
    assert dt.datetime.fromtimestamp(one_am / 1000).date() == dt.date(2025, 11, 26)
    adm.price_arg("claude-sonnet-4-5", one_am)
    assert prices.asked == [("claude-sonnet-4-5", dt.date(2025, 11, 27))]


async def test_a_reservation_is_priced_on_the_day_of_the_time_given(redis: Redis) -> None:
    await TenantStore(redis).put("pd", TenantPolicy())
    prices = AskedPrices()
    adm = Admission(redis, prices=prices)
    decision = await adm.reserve("pd", "d1", 10, 10, model="claude-sonnet-4-5", now_ms=NOW)
    assert decision.kind == "ADMIT"
    assert prices.asked == [("claude-sonnet-4-5", dt.date(2025, 11, 27))]


async def test_a_reservation_without_a_model_is_accounted_to_the_unknown_model(
    redis: Redis,
) -> None:
    adm = await tree(redis, {"nm": {"budgets": {"day": 10_000}}})
    assert (await adm.reserve("nm", "u1", 10, 10, now_ms=NOW)).kind == "ADMIT"
    assert (await record(redis, "nm", "u1"))["m"] == "unknown"
    await adm.settle("nm", "u1", Usage(4, 6), now_ms=NOW)
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await redis.xrange(TenantKeys.of("budgeter", "nm").ledger),
    )
    assert [fields["model"] for _, fields in entries] == ["unknown"]
    usage = await redis.hgetall(TenantKeys.of("budgeter", "nm").usage)
    assert (usage["day:2025-11-27:unknown:input"], usage["day:2025-11-27:unknown:output"]) == (
        "4",
        "6",
    )


async def test_a_refusal_of_a_tenant_with_a_keys_limits_remembers_no_chain(
    redis: Redis,
) -> None:
    adm = await tree(redis, {"kd": {"rate": {"rpm": 1}}})
    key = KeyScopeKeys("budgeter", "kd", "k1")
    await redis.hset(key.policy, mapping={"budget:day": "100000"})
    await redis.sadd(TenantKeys.of("budgeter", "kd").limited_keys, "k1")
    assert (await adm.reserve("kd", "r1", 10, 10, now_ms=NOW, key="k1")).kind == "ADMIT"
    assert list(adm._chains) == ["r1"]  # its key's scope, for mark_sent and settle
    deferred = await adm.reserve("kd", "r2", 10, 10, now_ms=NOW, key="k1")
    assert (deferred.kind, deferred.reason) == ("DEFER", "rate:rpm")
    assert list(adm._chains) == ["r1"]
    assert list(await redis.hkeys(key.resv)) == ["r1"]


async def test_a_flat_tenants_admission_remembers_no_chain(redis: Redis) -> None:
    adm = await tree(redis, {"flat": {"budgets": {"day": 10_000}}})
    assert (await adm.reserve("flat", "f1", 10, 10, now_ms=NOW)).kind == "ADMIT"
    assert adm._chains == {}


async def test_a_tenants_own_reject_is_the_answer_and_its_ancestors_are_not_asked(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "rtop": {"allowed_models": ["x"]},
            "rleaf": {"parent": "rtop", "allowed_models": ["x"]},
        },
    )
    refused = await adm.reserve("rleaf", "q1", 10, 10, model="y", now_ms=NOW)
    assert (refused.kind, refused.reason, refused.detail) == ("REJECT", "model_not_allowed", "y")
    assert adm._chains == {}


async def test_the_accounts_reservation_is_marked_sent_and_reaped_in_full(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("gs", TenantPolicy(budgets={"day": 10**9}))
    limits = await account_limits(redis, {"budgets": {"day": 10**9}})
    adm = Admission(redis, global_limits=limits)
    decision = await adm.reserve("gs", "s1", 10, 5, model="m", hold_ms=1_000, now_ms=FUTURE)
    assert decision.kind == "ADMIT"
    account = GlobalModelKeys("budgeter", "m")
    assert await redis.hgetall(account.resv_sent) == {"s1": "1"}
    assert await redis.hlen(TenantKeys.of("budgeter", "gs").resv_sent) == 0  # not asked to
    assert await adm.reap_global(now_ms=FUTURE + 2_000) == 1
    budget_of_account = await redis.hgetall(account.budget)
    assert (budget_of_account["day:used"], budget_of_account["day:reserved"]) == ("15", "0")


async def test_the_accounts_refusal_rolls_back_a_tenant_without_a_chain(redis: Redis) -> None:
    await TenantStore(redis).put("solo", TenantPolicy(budgets={"day": 10_000}))
    limits = await account_limits(redis, {"rate": {"rpm": 1}})
    adm = Admission(redis, global_limits=limits)
    assert (await adm.reserve("solo", "g1", 10, 10, model="m", now_ms=NOW)).kind == "ADMIT"
    refused = await adm.reserve("solo", "g2", 10, 10, model="m", now_ms=NOW)
    assert (refused.kind, refused.reason, refused.until_ms) == (
        "DEFER",
        "global:rate:rpm",
        NOW + 60_000,
    )
    assert (await budget(redis, "solo"))["day:reserved"] == "20"
    assert list(await redis.hkeys(TenantKeys.of("budgeter", "solo").resv)) == ["g1"]
    assert adm._held_globally == {"g1": "m"} and adm._chains == {}


async def test_a_settle_settles_the_accounts_scope_and_forgets_the_reservation(
    redis: Redis,
) -> None:
    store = TenantStore(redis)
    await store.put("sorg", TenantPolicy(budgets={"day": 10_000}))
    await store.put("steam", TenantPolicy(parent="sorg", budgets={"day": 10_000}))
    limits = await account_limits(redis, {"budgets": {"day": 10_000}})
    adm = Admission(redis, global_limits=limits, tree=TreeView(redis, refresh_s=0))
    assert (await adm.reserve("steam", "s1", 10, 10, model="m", now_ms=NOW)).kind == "ADMIT"
    account = GlobalModelKeys("budgeter", "m")
    assert (await redis.hgetall(account.budget))["day:reserved"] == "20"
    assert list(adm._chains) == ["s1"] and adm._held_globally == {"s1": "m"}
    result = await adm.settle("steam", "s1", Usage(3, 4), now_ms=NOW)
    assert (result.settled, result.actual_tokens) == (1, 7)
    for keys in (account, TenantKeys.of("budgeter", "sorg"), TenantKeys.of("budgeter", "steam")):
        counters = await redis.hgetall(keys.budget)
        assert (counters["day:used"], counters["day:reserved"]) == ("7", "0")
        assert await redis.hlen(keys.resv) == 0
    assert adm._chains == {} and adm._held_globally == {}


async def notified_admission(redis: Redis, tenant: str) -> Admission:
    """``tenant`` (under the prefix "acme") told at half of its day's 1,000 tokens."""
    policy = {"budgets": {"day": 1000}, "notify": {"thresholds": [0.5]}}
    await TenantStore(redis, prefix="acme").put(tenant, TenantPolicy.model_validate(policy))
    return Admission(redis, prefix="acme", prices=PriceTable(bundled=False))


async def test_a_settle_that_appends_events_names_its_tenant_for_delivery(redis: Redis) -> None:
    adm = await notified_admission(redis, "hn")
    pending = notify_pending_key("acme")
    assert (await adm.reserve("hn", "h1", 0, 400, now_ms=NOW)).kind == "ADMIT"
    assert (await adm.settle("hn", "h1", Usage(0, 400), now_ms=NOW)).events == 0
    assert await redis.smembers(pending) == set()  # nothing to deliver: no hint
    assert (await adm.reserve("hn", "h2", 0, 100, now_ms=NOW)).kind == "ADMIT"
    assert (await adm.settle("hn", "h2", Usage(0, 100), now_ms=NOW)).events == 1
    assert await redis.smembers(pending) == {"hn"}


async def test_a_reap_that_appends_events_names_its_tenant_for_delivery(redis: Redis) -> None:
    adm = await notified_admission(redis, "hr")
    decision = await adm.reserve(
        "hr", "h1", 0, 600, hold_ms=1_000, now_ms=FUTURE, sent_at_once=True
    )
    assert decision.kind == "ADMIT"
    assert (await adm.reap("hr", now_ms=FUTURE + 500)).events == 0
    assert await redis.smembers(notify_pending_key("acme")) == set()
    reaped = await adm.reap("hr", now_ms=FUTURE + 2_000)
    assert (reaped.charged_full, reaped.events) == (1, 1)
    assert await redis.smembers(notify_pending_key("acme")) == {"hr"}


async def test_the_account_scopes_are_reaped_a_thousand_reservations_at_a_time(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("bulk", TenantPolicy())
    limits = await account_limits(redis, {"budgets": {"day": 10**9}})
    adm = Admission(redis, global_limits=limits)
    decisions = await asyncio.gather(
        *(
            adm.reserve("bulk", f"b{i}", 1, 1, model="m", hold_ms=1_000, now_ms=FUTURE)
            for i in range(1_001)
        )
    )
    assert {d.kind for d in decisions} == {"ADMIT"}
    assert await adm.reap_global(now_ms=FUTURE + 2_000) == 1_000
    assert await adm.reap_global(now_ms=FUTURE + 2_000) == 1


async def test_at_most_a_hundred_tenants_are_woken_by_default(redis: Redis) -> None:
    policies: dict[str, dict[str, object]] = {"wtop": {}}
    policies.update({f"w{i:03}": {"parent": "wtop"} for i in range(102)})
    adm = await tree(redis, policies)
    woken = await adm.to_wake("w000", settled_with("wtop"))
    assert woken == [f"w{i:03}" for i in range(1, 101)]
