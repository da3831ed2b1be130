"""JSON merge patch (RFC 7396): the RFC's own examples, the policy merged and validated
whole, and TenantStore.patch against a real Redis (compare and set: no lost update)."""

from __future__ import annotations

import asyncio
import copy

import pytest
from redis.asyncio import Redis

from budgeter.domain.messages import JsonValue
from budgeter.domain.policy import TenantPolicy
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.store.scripts import register
from budgeter.tenants.merge_patch import (
    InvalidPolicyError,
    merge_patch,
    patched_policy,
    policy_answer,
    stored_form,
)
from budgeter.tenants.store import TenantStore

# RFC 7396, Appendix A: (original, patch, result)
RFC_EXAMPLES: list[tuple[JsonValue, JsonValue, JsonValue]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC_EXAMPLES)
def test_the_rfc_appendix_examples(
    original: JsonValue, patch: JsonValue, result: JsonValue
) -> None:
    before = copy.deepcopy((original, patch))
    assert merge_patch(original, patch) == result
    assert (original, patch) == before  # neither argument is changed


def test_the_rfc_section_3_example() -> None:
    target: JsonValue = {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    }
    patch: JsonValue = {
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {"familyName": None},
        "tags": ["example"],
    }
    assert merge_patch(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    }


POLICY = TenantPolicy.model_validate(
    {"weight": 2, "budgets": {"day": 1000, "month": 9000}, "rate": {"rpm": 60, "otpm": 800}}
)


def test_a_patch_merges_into_the_stored_policy_and_null_deletes() -> None:
    patched = patched_policy(POLICY, {"budgets": {"day": None, "hour": 50}, "rate": {"rpm": 5}})
    assert stored_form(patched) == {
        "weight": 2.0,
        "budgets": {"month": 9000, "hour": 50},
        "rate": {"rpm": 5, "otpm": 800},
    }
    # deleting a field brings its default back
    assert patched_policy(POLICY, {"weight": None, "rate": None}) == TenantPolicy(
        budgets={"day": 1000, "month": 9000}
    )


def test_the_merged_policy_is_validated_whole() -> None:
    with pytest.raises(InvalidPolicyError, match=r"^invalid policy: rate\.rpm: "):
        patched_policy(POLICY, {"rate": {"rpm": 0}})
    with pytest.raises(InvalidPolicyError, match=r"budgets\.week"):
        patched_policy(POLICY, {"budgets": {"week": 5}})
    with pytest.raises(InvalidPolicyError, match="invalid policy"):
        patched_policy(POLICY, ["not", "an", "object"])  # replaces the whole policy


def test_the_answer_is_the_whole_policy_with_defaults() -> None:
    answer = policy_answer("acme", POLICY)
    assert answer == {"tenant": "acme", "policy": POLICY.model_dump(mode="json")}
    assert answer["policy"]["on_exhausted"] == "reject"  # defaults included


async def test_the_store_patches_the_policy_hash_and_the_scheduler_weight(redis: Redis) -> None:
    store = TenantStore(redis)
    assert await store.patch("acme", {"weight": 3}) is None  # no tenant: nothing created
    assert not await redis.exists(TenantKeys.of("budgeter", "acme").policy)
    await store.put("acme", POLICY)
    patched = await store.patch("acme", {"weight": 3, "budgets": {"day": None}})
    assert patched is not None and await store.get("acme") == patched
    fields = await redis.hgetall(TenantKeys.of("budgeter", "acme").policy)
    assert fields == patched.redis_fields()  # the flat fields reserve.lua reads, and only them
    assert "budget:day" not in fields
    assert await redis.hget(SchedKeys("budgeter").weight, "acme") == "3.0"


async def test_an_invalid_patch_stores_nothing(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("acme", POLICY)
    key = TenantKeys.of("budgeter", "acme").policy
    before = await redis.hgetall(key)
    with pytest.raises(InvalidPolicyError, match=r"rate\.rpm"):
        await store.patch("acme", {"budgets": {"hour": 5}, "rate": {"rpm": -1}})
    assert await redis.hgetall(key) == before


async def test_concurrent_patches_are_never_lost(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("acme", TenantPolicy())
    writers = [TenantStore(redis) for _ in range(4)]
    await asyncio.gather(
        *(
            writers[i % 4].patch("acme", {"models": {f"m{i}": {"budgets": {"day": i + 1}}}})
            for i in range(24)
        )
    )
    final = await store.get("acme")
    assert final is not None
    assert {name: limits.budgets["day"] for name, limits in final.models.items()} == {
        f"m{i}": i + 1 for i in range(24)
    }


async def test_the_compare_and_set_script(redis: Redis) -> None:
    replace = register(redis, "tenants/replace_policy.lua")
    key = TenantKeys.of("budgeter", "acme").policy
    assert await replace(keys=[key], args=["{}", "json", "{}"]) == -1  # no policy
    assert not await redis.exists(key)
    await redis.hset(key, mapping={"json": '{"weight":2.0}', "weight": "2.0", "rate:rpm": "5"})
    assert await replace(keys=[key], args=["{}", "json", "{}"]) == 0  # changed meanwhile
    assert await redis.hget(key, "rate:rpm") == "5"
    assert await replace(keys=[key], args=['{"weight":2.0}', "json", "{}", "weight", "1.0"]) == 1
    assert await redis.hgetall(key) == {"json": "{}", "weight": "1.0"}
