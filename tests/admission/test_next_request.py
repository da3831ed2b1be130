"""An ADMIT's ``until_ms`` (issue 20, item 3): when an admission leaves the tenant's request
rate (its policy-wide ``rate:rpm``) no room, the answer says the first ms the bucket takes
the next request, so a worker parks the tenant until then instead of leasing a job the
bucket would defer (budgeter/worker/lease_pacing.py). Exact values, on a real Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.admission.tree_view import TreeView
from budgeter.domain.policy import TenantPolicy
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z


async def tree(redis: Redis, policies: dict[str, dict[str, object]]) -> Admission:
    store = TenantStore(redis)
    for tenant, policy in policies.items():
        await store.put(tenant, TenantPolicy.model_validate(policy))
    return Admission(redis, tree=TreeView(redis, refresh_s=0))


async def test_the_admit_that_empties_the_request_rate_names_when_it_takes_the_next(
    redis: Redis,
) -> None:
    """60 rpm (one request a second, a minute's burst): the 59 first leave room (0), the
    60th fits exactly (the next one would not) and says when the next fits: NOW + 1 s."""
    adm = await tree(redis, {"acme": {"rate": {"rpm": 60}}})
    untils = [(await adm.reserve("acme", f"r{n}", 1, 1, now_ms=NOW)).until_ms for n in range(60)]
    assert untils == [0] * 59 + [NOW + 1000]
    deferred = await adm.reserve("acme", "r60", 1, 1, now_ms=NOW)
    assert (deferred.kind, deferred.until_ms, deferred.reason) == ("DEFER", NOW + 1000, "rate:rpm")
    at_next = await adm.reserve("acme", "r61", 1, 1, now_ms=NOW + 1000)
    assert (at_next.kind, at_next.until_ms) == ("ADMIT", NOW + 2000)
    assert at_next.next_request_ms == NOW + 2000
    again = await adm.reserve("acme", "r61", 1, 1, now_ms=NOW + 1500)  # the same id
    assert (again.kind, again.until_ms, again.reason) == ("ADMIT", 0, "already_reserved")
    assert again.next_request_ms == 0


async def test_one_call_of_many_answers_each_admit_after_its_own(redis: Redis) -> None:
    adm = await tree(redis, {"acme": {"rate": {"rpm": 3}}})
    decisions = await asyncio.gather(
        *(adm.reserve("acme", f"r{n}", 1, 1, now_ms=NOW) for n in range(4))
    )  # one script call: the bucket fills in order
    assert [(d.kind, d.until_ms) for d in decisions] == [
        ("ADMIT", 0),
        ("ADMIT", 0),
        ("ADMIT", NOW + 20_000),
        ("DEFER", NOW + 20_000),
    ]


async def test_only_the_policy_wide_request_rate_is_looked_at(redis: Redis) -> None:
    """A model's rpm, a token rate and a key's rpm leave until 0: the tenant's other work
    (other models, no key, smaller requests) may still fit."""
    adm = await tree(
        redis,
        {"acme": {"models": {"m1": {"rate": {"rpm": 1}}}, "rate": {"itpm": 10, "otpm": 10}}},
    )
    admitted = await adm.reserve("acme", "r1", 10, 10, model="m1", now_ms=NOW)
    assert (admitted.kind, admitted.until_ms) == ("ADMIT", 0)
    assert (await adm.reserve("acme", "r2", 1, 1, model="m1", now_ms=NOW)).kind == "DEFER"
    scope = KeyScopeKeys("budgeter", "acme", "k1")
    await redis.hset(scope.policy, mapping={"rate:rpm": "1"})
    await redis.sadd(TenantKeys.of("budgeter", "acme").limited_keys, "k1")
    keyed = await adm.reserve("acme", "r3", 0, 0, model="m2", now_ms=NOW + 60_000, key="k1")
    assert (keyed.kind, keyed.until_ms) == ("ADMIT", 0)


async def test_a_chain_answers_the_latest_next_request_of_its_scopes(redis: Redis) -> None:
    adm = await tree(
        redis,
        {
            "org": {"rate": {"rpm": 1}},  # next request a minute later
            "team": {"parent": "org", "rate": {"rpm": 2}},  # 30 s, after its second
            "acme": {"parent": "team", "rate": {"rpm": 4}},  # 15 s, after its fourth
        },
    )
    first = await adm.reserve("acme", "r1", 1, 1, now_ms=NOW)
    assert (first.kind, first.until_ms) == ("ADMIT", NOW + 60_000)  # the organisation's
    refused = await adm.reserve("acme", "r2", 1, 1, now_ms=NOW)
    assert (refused.kind, refused.until_ms, refused.reason) == (
        "DEFER",
        NOW + 60_000,
        "parent:org:rate:rpm",
    )
    later = await adm.reserve("team", "t1", 1, 1, now_ms=NOW + 60_000)
    assert (later.kind, later.until_ms) == ("ADMIT", NOW + 120_000)  # org's again, not team's
