"""An API key's limits are decided in its tenant's own reserve.lua call (KEYS[9..16]):
one script call, both scopes admit or neither is changed (issue 17 item 3)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.admission.scopes import reserve_keys
from budgeter.admission.tree_view import TreeView
from budgeter.domain.policy import TenantPolicy
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z


async def setup(
    redis: Any, policies: dict[str, dict[str, object]], key_limits: dict[str, str]
) -> Admission:
    store = TenantStore(redis)
    for tenant, policy in policies.items():
        await store.put(tenant, TenantPolicy.model_validate(policy))
    scope = KeyScopeKeys("budgeter", "acme", "k1")
    await redis.hset(scope.policy, mapping=key_limits)
    await redis.sadd(TenantKeys.of("budgeter", "acme").limited_keys, "k1")
    return Admission(redis, tree=TreeView(redis, refresh_s=0))


async def evalsha_calls(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def snapshot(redis: Any, keys: TenantKeys | KeyScopeKeys) -> dict[str, object]:
    return {
        "buckets": await redis.hgetall(keys.buckets),
        "budget": await redis.hgetall(keys.budget),
        "resv": await redis.hgetall(keys.resv),
        "deadline": await redis.zrange(keys.resv_deadline, 0, -1, withscores=True),
        "state": await redis.hgetall(keys.state),
        "sent": await redis.hgetall(keys.resv_sent),
    }


TENANT = TenantKeys.of("budgeter", "acme")
KEY = KeyScopeKeys("budgeter", "acme", "k1")
EMPTY: dict[str, object] = {
    "buckets": {},
    "budget": {},
    "resv": {},
    "deadline": [],
    "state": {},
    "sent": {},
}


async def test_one_call_reserves_in_the_tenant_and_the_key(redis: Redis) -> None:
    adm = await setup(
        redis, {"acme": {"budgets": {"day": 10_000}}}, {"budget:day": "1000", "rate:rpm": "10"}
    )
    await adm.reserve("other", "w", 1, 1, now_ms=NOW)  # loads the script (NOSCRIPT, EVAL)
    before = await evalsha_calls(redis)
    decision = await adm.reserve("acme", "r1", 100, 50, now_ms=NOW, key="k1", sent_at_once=True)
    assert decision.kind == "ADMIT"
    assert await evalsha_calls(redis) - before == 1
    for keys in (TENANT, KEY):
        assert (await redis.hgetall(keys.budget))["day:reserved"] == "150"
        assert await redis.hget(keys.resv_sent, "r1") == "1"
        assert await redis.zscore(keys.resv_deadline, "r1") == NOW + 90_000
    assert "rpm" in await redis.hgetall(KEY.buckets)
    assert len(await redis.lrange(TENANT.recent, 0, -1)) == 1
    assert len(await redis.lrange(KEY.recent, 0, -1)) == 1
    # idempotent: the same id again changes nothing and answers already_reserved
    again = await adm.reserve("acme", "r1", 100, 50, now_ms=NOW, key="k1")
    assert (again.kind, again.reason) == ("ADMIT", "already_reserved")
    assert (await redis.hgetall(KEY.budget))["day:reserved"] == "150"
    await adm.settle("acme", "r1", Usage(40, 10), now_ms=NOW)
    for keys in (TENANT, KEY):
        got = await redis.hgetall(keys.budget)
        assert (got["day:used"], got["day:reserved"]) == ("50", "0")


async def test_a_key_refusal_leaves_the_tenant_untouched(redis: Redis) -> None:
    adm = await setup(
        redis, {"acme": {"budgets": {"day": 10_000}, "rate": {"rpm": 100}}}, {"budget:day": "100"}
    )
    assert (await adm.reserve("acme", "r0", 30, 30, now_ms=NOW, key="k1")).kind == "ADMIT"
    tenant_before, key_before = await snapshot(redis, TENANT), await snapshot(redis, KEY)
    before = await evalsha_calls(redis)
    refused = await adm.reserve("acme", "r1", 30, 30, now_ms=NOW, key="k1")
    assert (refused.kind, refused.reason, refused.until_ms) == ("DEFER", "key:inflight:day", 0)
    assert await evalsha_calls(redis) - before == 1  # no rollback calls
    assert await snapshot(redis, TENANT) == tenant_before
    key_after = await snapshot(redis, KEY)
    assert key_after["state"] == {"waiting_settle": "1"}  # the scope that waits is told
    assert {**key_after, "state": key_before["state"]} == key_before
    recent = await redis.lrange(TENANT.recent, 0, -1)
    assert recent[0].split()[1:3] == ["DEFER", "key:inflight:day"]
    too_large = await adm.reserve("acme", "r2", 100, 100, now_ms=NOW, key="k1")
    assert (too_large.kind, too_large.reason) == ("REJECT", "key:too_large:budget:day")
    assert too_large.describe().startswith("request needs 200 tokens but this API key's day")
    assert await snapshot(redis, TENANT) == tenant_before


async def test_a_tenant_refusal_leaves_the_key_untouched(redis: Redis) -> None:
    adm = await setup(redis, {"acme": {"budgets": {"day": 100}}}, {"budget:day": "1000"})
    assert (await adm.reserve("acme", "r0", 30, 30, now_ms=NOW, key="k1")).kind == "ADMIT"
    key_before = await snapshot(redis, KEY)
    refused = await adm.reserve("acme", "r1", 30, 30, now_ms=NOW, key="k1")
    assert (refused.kind, refused.reason) == ("DEFER", "inflight:day")
    assert await snapshot(redis, KEY) == key_before
    rejected = await adm.reserve("acme", "r2", 100, 100, now_ms=NOW, key="k1")
    assert (rejected.kind, rejected.reason) == ("REJECT", "too_large:budget:day")
    assert await snapshot(redis, KEY) == key_before


async def test_the_later_defer_of_the_two_wins_and_a_tie_is_the_tenants(redis: Redis) -> None:
    adm = await setup(redis, {"acme": {"rate": {"rpm": 1}}}, {"rate:rpm": "2"})
    assert (await adm.reserve("acme", "r0", 1, 1, now_ms=NOW, key="k1")).kind == "ADMIT"
    both = await adm.reserve("acme", "r1", 1, 1, now_ms=NOW, key="k1")
    assert (both.kind, both.reason, both.until_ms) == ("DEFER", "rate:rpm", NOW + 60_000)
    adm2 = await setup(redis, {"acme": {"rate": {"rpm": 2}}}, {"rate:rpm": "1"})
    assert (await adm2.reserve("acme", "r2", 1, 1, now_ms=NOW, key="k1")).kind == "DEFER"


async def test_an_ancestor_refusal_releases_the_key_scope(redis: Redis) -> None:
    adm = await setup(
        redis,
        {"org": {"budgets": {"day": 100}}, "acme": {"parent": "org"}},
        {"budget:day": "1000"},
    )
    key_before = await snapshot(redis, KEY)
    refused = await adm.reserve("acme", "r1", 100, 100, now_ms=NOW, key="k1")
    assert (refused.kind, refused.reason) == ("REJECT", "parent:org:too_large:budget:day")
    after = await snapshot(redis, KEY)
    assert after["resv"] == {} and after["sent"] == {}
    assert (await redis.hgetall(KEY.budget)).get("day:reserved", "0") == "0"
    assert key_before["resv"] == {}


async def test_on_a_cluster_the_key_scope_is_in_the_tenants_call(cluster_redis: Any) -> None:
    adm = await setup(cluster_redis, {"acme": {"budgets": {"day": 10_000}}}, {"budget:day": "100"})
    assert cluster_redis.keyslot(KEY.budget) == cluster_redis.keyslot(TENANT.budget)
    assert (await adm.reserve("acme", "c1", 30, 30, now_ms=NOW, key="k1")).kind == "ADMIT"
    refused = await adm.reserve("acme", "c2", 30, 30, now_ms=NOW, key="k1")
    assert (refused.kind, refused.reason) == ("DEFER", "key:inflight:day")
    assert (await cluster_redis.hgetall(TENANT.budget))["day:reserved"] == "60"
    await adm.charge_full("acme", "c1", now_ms=NOW)
    for keys in (TENANT, KEY):
        assert (await cluster_redis.hgetall(keys.budget))["day:used"] == "60"


async def test_check_only_and_many_requests_of_one_call(redis: Redis) -> None:
    adm = await setup(redis, {"acme": {"budgets": {"day": 10_000}}}, {"budget:day": "100"})
    names = (*adm._names("acme")[0], *reserve_keys(KEY))
    checked = await adm._reserve(names, (str(NOW), ""), ["c", 30, 30, 1000, "m", "", "", "", "1"])
    assert list(checked[:3]) == ["ADMIT", 0, ""]
    assert await snapshot(redis, TENANT) == await snapshot(redis, KEY) == EMPTY
    assert await redis.llen(TENANT.recent) == 0
    # three at once go in one call and are decided in turn: the third waits for the key
    got = await asyncio.gather(
        *(adm.reserve("acme", f"r{i}", 20, 20, now_ms=NOW, key="k1") for i in range(3))
    )
    assert sorted((d.kind, d.reason) for d in got) == [
        ("ADMIT", ""),
        ("ADMIT", ""),
        ("DEFER", "key:inflight:day"),
    ]
    for keys in (TENANT, KEY):
        assert (await redis.hgetall(keys.budget))["day:reserved"] == "80"
        assert await redis.hlen(keys.resv) == 2
        assert await redis.hlen(keys.resv_sent) == 0
    # the key's record carries no "x" (the tenant's ledger entry does)
    assert all('"x"' not in v for v in (await redis.hgetall(KEY.resv)).values())


async def test_when_both_wait_for_settles_the_tenants_reason_wins(redis: Redis) -> None:
    adm = await setup(redis, {"acme": {"budgets": {"day": 100}}}, {"max_concurrency": "1"})
    assert (await adm.reserve("acme", "r0", 30, 30, now_ms=NOW, key="k1")).kind == "ADMIT"
    both = await adm.reserve("acme", "r1", 30, 30, now_ms=NOW, key="k1")
    assert (both.kind, both.until_ms, both.reason) == ("DEFER", 0, "inflight:day")
    for keys in (TENANT, KEY):
        assert await redis.hget(keys.state, "waiting_settle") == "1"


async def test_a_key_that_already_holds_the_id_is_not_reserved_again(redis: Redis) -> None:
    """The tenant's reservation settled without the key's (made with the id but without the
    key): the same id with the key again reserves in the tenant only; the key keeps its one
    hold (its reaper settles it), as a scope of its own answers already_reserved."""
    adm = await setup(
        redis,
        {"acme": {"budgets": {"day": 10_000}}},
        {"budget:day": "1000", "max_concurrency": "1"},
    )
    assert (await adm.reserve("acme", "r1", 100, 50, now_ms=NOW, key="k1")).kind == "ADMIT"
    await adm._settle_scope(adm._names("acme")[1], "release", "r1", now_ms=NOW)
    assert await redis.hget(TENANT.resv, "r1") is None
    again = await adm.reserve("acme", "r1", 100, 50, now_ms=NOW, key="k1")
    assert (again.kind, again.reason) == ("ADMIT", "")
    assert (await redis.hgetall(TENANT.budget))["day:reserved"] == "150"
    assert (await redis.hgetall(KEY.budget))["day:reserved"] == "150"
    assert list(await redis.hgetall(KEY.resv)) == ["r1"]


async def test_mark_sent_marks_the_keys_scope_and_then_the_tenants(redis: Redis) -> None:
    """A reservation not sent at once is marked later, in both scopes (the reaper then
    charges either in full); once the tenant's reservation is gone, mark_sent says so."""
    adm = await setup(redis, {"acme": {"budgets": {"day": 1000}}}, {"budget:day": "1000"})
    assert (await adm.reserve("acme", "r1", 100, 50, now_ms=NOW, key="k1")).kind == "ADMIT"
    assert await redis.hgetall(TENANT.resv_sent) == {}
    assert await redis.hgetall(KEY.resv_sent) == {}
    assert await adm.mark_sent("acme", "r1") is True
    assert await redis.hgetall(TENANT.resv_sent) == {"r1": "1"}
    assert await redis.hgetall(KEY.resv_sent) == {"r1": "1"}
    await adm.release("acme", "r1", now_ms=NOW)
    assert await adm.mark_sent("acme", "r1") is False  # released: the upstream is not called
    assert await redis.hgetall(TENANT.resv_sent) == {}
