"""Admission along a chain of scopes (tenant, API key, ancestors) on a real Redis."""

from __future__ import annotations

import json
from typing import Any, cast

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.admission.tree_view import TreeView
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import reason_label
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
DAY = 86_400_000


async def tree(redis: Any, policies: dict[str, dict[str, object]]) -> Admission:
    """Write ``policies`` in order (parents first) and an Admission that sees the tree."""
    store = TenantStore(redis)
    for tenant, policy in policies.items():
        await store.put(tenant, TenantPolicy.model_validate(policy))
    return Admission(redis, tree=TreeView(redis, refresh_s=0))


async def budget(redis: Any, tenant: str) -> dict[str, str]:
    return cast(dict[str, str], await redis.hgetall(TenantKeys.of("budgeter", tenant).budget))


async def record(redis: Redis, tenant: str, rid: str) -> dict[str, object]:
    raw = await redis.hget(TenantKeys.of("budgeter", tenant).resv, rid)
    assert raw is not None
    return cast(dict[str, object], json.loads(raw))


async def test_a_parents_budget_holds_for_its_children_and_the_refusal_names_it(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "org": {"budgets": {"day": 1000}},
            "team-a": {"parent": "org", "budgets": {"day": 800}},
            "team-b": {"parent": "org", "budgets": {"day": 800}},
        },
    )
    assert (await adm.reserve("team-a", "a1", 300, 300, now_ms=NOW)).kind == "ADMIT"
    await adm.settle("team-a", "a1", Usage(300, 300), now_ms=NOW)
    # team-b's own budget holds 600 more, the organisation's only 400
    refused = await adm.reserve("team-b", "b1", 300, 300, now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "parent:org:exhausted:day")
    assert refused.detail == "600/1000" and refused.until_ms == NOW + DAY
    assert refused.describe() == (
        "the parent tenant 'org''s day token budget exhausted (600 of 1000 used); "
        "it resets at 2025-11-28T00:00:00Z"
    )
    assert reason_label(refused.reason) == "parent:exhausted:day"
    # rolled back: team-b holds nothing, and both levels counted team-a's 600
    assert (await budget(redis, "team-b")).get("day:reserved", "0") == "0"
    assert await redis.hlen(TenantKeys.of("budgeter", "team-b").resv) == 0
    assert (await budget(redis, "org"))["day:used"] == "600"
    assert (await budget(redis, "team-a"))["day:used"] == "600"
    assert (await adm.reserve("team-b", "b2", 200, 200, now_ms=NOW)).kind == "ADMIT"


async def test_the_latest_defer_of_the_chain_is_the_answer_and_nothing_is_held(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "org": {"rate": {"itpm": 6000}},  # 100 input tokens a second
            "team": {"parent": "org", "rate": {"itpm": 12000}},  # 200 a second
            "other": {"parent": "org"},
        },
    )
    assert (await adm.reserve("team", "t1", 6000, 1, now_ms=NOW)).kind == "ADMIT"
    # team's bucket fits 2000 more in 10 s, org's in 20 s: the answer is org's moment
    deferred = await adm.reserve("team", "t2", 2000, 1, now_ms=NOW)
    assert (deferred.kind, deferred.reason) == ("DEFER", "parent:org:rate:itpm")
    assert deferred.until_ms == NOW + 20_000
    assert await redis.hlen(TenantKeys.of("budgeter", "org").resv) == 1  # only t1
    # a sibling with no limits of its own waits for the same parent
    sibling = await adm.reserve("other", "o1", 2000, 1, now_ms=NOW)
    assert (sibling.reason, sibling.until_ms) == ("parent:org:rate:itpm", NOW + 20_000)
    assert (await adm.reserve("team", "t2", 2000, 1, now_ms=NOW + 20_000)).kind == "ADMIT"


async def test_a_parents_reject_wins_over_a_childs_defer(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "org": {"budgets": {"total": 100}},
            "team": {"parent": "org", "rate": {"rpm": 1}},
        },
    )
    assert (await adm.reserve("team", "t1", 10, 10, now_ms=NOW)).kind == "ADMIT"
    # team's rpm would make it wait; the organisation's total budget can never hold it
    refused = await adm.reserve("team", "t2", 60, 50, now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "parent:org:too_large:budget:total")
    # the check of org changed nothing there
    assert (await budget(redis, "org"))["total:reserved"] == "20"


async def test_settle_charge_full_and_release_cover_every_level(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "org": {"budgets": {"day": 10_000}},
            "div": {"parent": "org", "budgets": {"day": 10_000}},
            "team": {"parent": "div", "budgets": {"day": 10_000}},
        },
    )
    for rid in ("s", "f", "r"):
        assert (await adm.reserve("team", rid, 100, 100, now_ms=NOW)).kind == "ADMIT"
    for tenant in ("org", "div", "team"):
        assert (await budget(redis, tenant))["day:reserved"] == "600"
    await adm.settle("team", "s", Usage(100, 50), now_ms=NOW)
    await adm.charge_full("team", "f", now_ms=NOW)
    await adm.release("team", "r", now_ms=NOW)
    for tenant in ("org", "div", "team"):
        assert await budget(redis, tenant) == {
            "day:id": "2025-11-27",
            "day:used": "350",
            "day:reserved": "0",
        }, tenant
        assert await redis.hlen(TenantKeys.of("budgeter", tenant).resv) == 0


async def test_the_tenants_reservation_records_its_ancestors_and_the_callers_meta(
    redis: Redis,
) -> None:
    adm = await tree(redis, {"org": {}, "team": {"parent": "org"}, "app": {"parent": "team"}})
    meta = {"s": "batch:b1/c1"}
    assert (await adm.reserve("app", "r1", 10, 10, now_ms=NOW, meta=meta)).kind == "ADMIT"
    assert (await record(redis, "app", "r1"))["x"] == {"s": "batch:b1/c1", "a": ["team", "org"]}
    parent_record = await record(redis, "team", "r1")
    assert "x" not in parent_record and parent_record["i"] == 10
    # a root with no meta records nothing extra
    assert (await adm.reserve("org", "r2", 10, 10, now_ms=NOW)).kind == "ADMIT"
    assert "x" not in await record(redis, "org", "r2")


async def test_checks_of_later_scopes_record_no_decision(redis: Redis) -> None:
    adm = await tree(redis, {"org": {}, "team": {"parent": "org", "rate": {"rpm": 1}}})
    assert (await adm.reserve("team", "t1", 10, 10, now_ms=NOW)).kind == "ADMIT"
    assert (await adm.reserve("team", "t2", 10, 10, now_ms=NOW)).kind == "DEFER"
    recent = await redis.lrange(TenantKeys.of("budgeter", "org").recent, 0, -1)
    assert [line.split()[1] for line in recent] == ["ADMIT"]  # t1 only: t2 was checked


async def test_a_reparented_tenants_reservation_settles_where_it_was_made(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "old": {"budgets": {"day": 1000}},
            "new": {"budgets": {"day": 1000}},
            "team": {"parent": "old"},
        },
    )
    assert (await adm.reserve("team", "t1", 100, 100, now_ms=NOW)).kind == "ADMIT"
    await TenantStore(redis).put("team", TenantPolicy(parent="new"))
    await adm.settle("team", "t1", Usage(100, 100), now_ms=NOW)
    assert (await budget(redis, "old"))["day:used"] == "200"
    assert "day:used" not in await budget(redis, "new")
    assert (await adm.reserve("team", "t2", 100, 100, now_ms=NOW)).kind == "ADMIT"
    assert (await budget(redis, "new"))["day:reserved"] == "200"


async def test_mark_sent_covers_the_chain_and_each_scope_reaps_its_own(redis: Redis) -> None:
    adm = await tree(redis, {"org": {"budgets": {"day": 1000}}, "team": {"parent": "org"}})
    assert (await adm.reserve("team", "sent", 100, 100, now_ms=NOW, hold_ms=1000)).kind == "ADMIT"
    assert (await adm.reserve("team", "not", 100, 100, now_ms=NOW, hold_ms=1000)).kind == "ADMIT"
    assert await adm.mark_sent("team", "sent")
    assert await redis.hget(TenantKeys.of("budgeter", "org").resv_sent, "sent") == "1"
    # a dead worker: the reapers of both scopes settle them alike
    later = NOW + 2000
    reaped = await adm.reap("team", now_ms=later)
    assert (reaped.charged_full, reaped.released) == (1, 1)
    parent = await adm.reap("org", now_ms=later)
    assert (parent.charged_full, parent.released) == (1, 1)
    assert (await budget(redis, "org"))["day:used"] == "200"


async def test_a_keys_limits_are_one_more_scope_under_its_tenant(redis: Redis) -> None:
    adm = await tree(redis, {"acme": {"budgets": {"day": 10_000}}})
    scope = KeyScopeKeys("budgeter", "acme", "k1")
    # a key with no limits hash yet: nothing refuses, the scope counts it
    assert (await adm.reserve("acme", "r0", 10, 10, now_ms=NOW, key="k1")).kind == "ADMIT"
    await adm.settle("acme", "r0", Usage(10, 10), now_ms=NOW)
    await redis.hset(scope.policy, mapping={"budget:day": "100"})
    await redis.sadd(TenantKeys.of("budgeter", "acme").limited_keys, "k1")
    refused = await adm.reserve("acme", "r1", 60, 60, now_ms=NOW, key="k1")
    assert (refused.kind, refused.reason) == ("REJECT", "key:too_large:budget:day")
    assert refused.describe().startswith("request needs 120 tokens but this API key's day")
    assert (await budget(redis, "acme")).get("day:reserved") == "0"
    assert (await adm.reserve("acme", "r2", 30, 30, now_ms=NOW, key="k1", hold_ms=10)).kind == (
        "ADMIT"
    )
    assert (await adm.reserve("acme", "r3", 30, 30, now_ms=NOW, key="k1")).kind == "DEFER"
    assert (await redis.hgetall(scope.budget))["day:reserved"] == "60"
    # the tenant's reaper reaps the key's scope too (not sent: released)
    await adm.reap("acme", now_ms=NOW + 100)
    assert await redis.hlen(scope.resv) == 0
    key_budget = await redis.hgetall(scope.budget)
    assert (key_budget["day:used"], key_budget["day:reserved"]) == ("0", "0")


async def test_a_settle_names_the_ancestors_where_a_request_waited(redis: Redis) -> None:
    adm = await tree(
        redis,
        {"org": {"budgets": {"day": 1000}}, "a": {"parent": "org"}, "b": {"parent": "org"}},
    )
    assert (await adm.reserve("a", "a1", 300, 300, now_ms=NOW)).kind == "ADMIT"
    waiting = await adm.reserve("b", "b1", 300, 300, now_ms=NOW)
    assert (waiting.reason, waiting.waits_for_settle) == ("parent:org:inflight:day", True)
    settled = await adm.settle("a", "a1", Usage(100, 100), now_ms=NOW)
    assert settled.waiting_ancestors == ("org",) and not settled.waiting_settle
    assert await adm.to_wake("a", settled) == ["b"]  # below org, but not the settling one
    assert (await adm.reserve("b", "b1", 300, 300, now_ms=NOW)).kind == "ADMIT"


async def test_equal_moments_name_the_first_bucket(redis: Redis) -> None:
    """rpm and itpm both fit again at the same moment: the reason is the first checked."""
    adm = await tree(redis, {"acme": {"rate": {"rpm": 1, "itpm": 600}}})
    assert (await adm.reserve("acme", "a", 600, 1, now_ms=NOW)).kind == "ADMIT"
    both = await adm.reserve("acme", "b", 600, 1, now_ms=NOW)
    assert (both.reason, both.until_ms) == ("rate:rpm", NOW + 60_000)


async def test_on_a_cluster_each_level_is_its_own_slot_and_still_holds(cluster_redis: Any) -> None:
    """The tree's members sit on different nodes: each scope is its own script call."""
    adm = await tree(
        cluster_redis,
        {
            "org": {"budgets": {"day": 1000}},
            "division": {"parent": "org", "budgets": {"day": 5000}},
            "team-a": {"parent": "division"},
            "team-b": {"parent": "division"},
        },
    )
    nodes = {
        cluster_redis.get_node_from_key(TenantKeys.of("budgeter", t).budget).name
        for t in ("org", "division", "team-a", "team-b")
    }
    assert len(nodes) >= 2, nodes
    assert (await adm.reserve("team-a", "a1", 300, 300, now_ms=NOW)).kind == "ADMIT"
    await adm.settle("team-a", "a1", Usage(300, 300), now_ms=NOW)
    refused = await adm.reserve("team-b", "b1", 300, 300, now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "parent:org:exhausted:day")
    assert (await budget(cluster_redis, "division"))["day:reserved"] == "0"  # rolled back
    assert (await adm.reserve("team-b", "b2", 100, 100, now_ms=NOW)).kind == "ADMIT"
    await adm.charge_full("team-b", "b2", now_ms=NOW)
    for tenant in ("org", "division"):
        assert (await budget(cluster_redis, tenant))["day:used"] == "800", tenant


async def test_an_ancestors_allowed_models_and_concurrency_hold_and_say_whose(
    redis: Redis,
) -> None:
    adm = await tree(
        redis,
        {
            "org": {"allowed_models": ["claude-a"], "max_concurrency": 1},
            "team": {"parent": "org"},
        },
    )
    refused = await adm.reserve("team", "t1", 10, 10, model="claude-b", now_ms=NOW)
    assert (refused.kind, refused.reason) == ("REJECT", "parent:org:model_not_allowed")
    assert refused.reason_kind == "model_not_allowed"  # a 403 permission_error, as the tenant's
    assert refused.describe("claude-b") == (
        "model 'claude-b' is not in the allowed_models of the parent tenant 'org'"
    )
    assert (await adm.reserve("team", "t2", 10, 10, model="claude-a", now_ms=NOW)).kind == "ADMIT"
    busy = await adm.reserve("team", "t3", 10, 10, model="claude-a", now_ms=NOW)
    assert (busy.kind, busy.reason, busy.until_ms) == ("DEFER", "parent:org:concurrency", 0)


async def test_another_process_settles_along_the_chain_the_reservation_recorded(
    redis: Redis,
) -> None:
    """A settle by a process that did not make the reservation (a restarted worker) reads
    the chain it recorded (ancestors "a", key "k"): a re-parent since does not move it."""
    adm = await tree(
        redis,
        {
            "old": {"budgets": {"day": 1000}},
            "new": {"budgets": {"day": 1000}},
            "team": {"parent": "old"},
        },
    )
    scope = KeyScopeKeys("budgeter", "team", "k1")
    await redis.hset(scope.policy, mapping={"budget:day": "1000"})
    await redis.sadd(TenantKeys.of("budgeter", "team").limited_keys, "k1")
    made = await adm.reserve("team", "t1", 100, 100, now_ms=NOW, key="k1", meta={"k": "k1"})
    assert made.kind == "ADMIT"
    await TenantStore(redis).put("team", TenantPolicy(parent="new"))
    other = Admission(redis, tree=TreeView(redis, refresh_s=0))
    await other.settle("team", "t1", Usage(100, 50), now_ms=NOW)
    assert (await budget(redis, "old"))["day:used"] == "150"
    assert "day:used" not in await budget(redis, "new")
    assert (await redis.hgetall(scope.budget))["day:used"] == "150"
    assert await redis.hlen(scope.resv) == 0
    # settled already: a retry settles nothing twice
    again = await other.settle("team", "t1", Usage(100, 50), now_ms=NOW)
    assert again.settled == 0
    assert (await budget(redis, "old"))["day:used"] == "150"
