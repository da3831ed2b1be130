"""Per-key limits (issue 17 item 3) through the admin API, the proxy and a batch worked by
the worker: a real Redis, the mock upstream, the official SDK."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import pytest
from redis.asyncio import Redis

from budgeter.domain.key_limits import KeyLimits
from budgeter.domain.passthrough import Passthrough
from budgeter.queue.batches import BatchStore
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from budgeter.tenants.credentials import KeyStore
from tests.api.test_proxy import ADMIN, Proxy, ask, proxy  # noqa: F401 - the fixture
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import running_worker


async def admin(
    proxy: Proxy,  # noqa: F811 - the fixture's type
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{proxy.url}{path}", json=body, headers=headers or ADMIN) as r,
    ):
        return r.status, await r.json()


async def tenant_with_key(
    proxy: Proxy,  # noqa: F811 - the fixture's type
    tenant: str,
    policy: dict[str, Any],
    limits: dict[str, Any] | None,
    name: str = "dev",
) -> dict[str, Any]:
    status, _ = await admin(proxy, "PUT", f"/admin/tenants/{tenant}", policy)
    assert status in (200, 201)
    body: dict[str, Any] = {"name": name}
    if limits is not None:
        body["limits"] = limits
    status, created = await admin(proxy, "POST", f"/admin/tenants/{tenant}/keys", body)
    assert status == 201, created
    return dict(created)


async def test_limits_are_stored_listed_with_usage_and_dropped_by_revoke(
    proxy: Proxy,  # noqa: F811 - the fixture
    redis: Redis,
) -> None:
    limits = {"budgets": {"day": 5000}, "rate": {"rpm": 10}, "max_concurrency": 2}
    created = await tenant_with_key(proxy, "kl", {"budgets": {"day": 100_000}}, limits)
    assert created["name"] == "dev" and created["limits"]["budgets"] == {"day": 5000}
    key_id = created["id"]
    scope = KeyScopeKeys("budgeter", "kl", key_id)
    assert await redis.hgetall(scope.policy) == KeyLimits.model_validate(limits).redis_fields()
    assert await redis.smembers(TenantKeys.of("budgeter", "kl").limited_keys) == {key_id}
    # a key without limits: no scope, not in the set
    status, plain = await admin(proxy, "POST", "/admin/tenants/kl/keys")
    assert status == 201 and plain["limits"] is None and plain["name"] is None

    message = await proxy.client(created["key"]).messages.create(**ask())
    await proxy.settled()
    used = message.usage.input_tokens + message.usage.output_tokens
    assert int((await redis.hgetall(scope.budget))["day:used"]) == used  # the key's scope
    status, listed = await admin(proxy, "GET", "/admin/tenants/kl/keys")
    assert status == 200
    rows = {row["id"]: row for row in listed["data"]}
    assert rows[key_id]["name"] == "dev" and rows[key_id]["limits"]["max_concurrency"] == 2
    day = next(t for t in rows[key_id]["usage"] if t["period"] == "day")
    assert (day["used"], day["requests"], day["reserved"]) == (used, 1, 0)
    assert next(t for t in rows[plain["id"]]["usage"] if t["period"] == "day")["used"] == 0
    for row in listed["data"]:  # never the key nor its hash
        assert "key" not in row and "hash" not in row
        assert created["key"] not in str(listed)

    status, _ = await admin(proxy, "DELETE", f"/admin/tenants/kl/keys/{key_id}")
    assert status == 200
    assert await redis.exists(scope.policy, scope.budget, scope.buckets) == 0
    assert await redis.smembers(TenantKeys.of("budgeter", "kl").limited_keys) == set()


async def test_a_keys_limits_only_narrow_both_scopes_hold(
    proxy: Proxy,  # noqa: F811 - the fixture
    redis: Redis,
) -> None:
    small = await tenant_with_key(
        proxy, "kn", {"budgets": {"day": 100_000}}, {"budgets": {"day": 300}}
    )
    # a key "allowed" more than its tenant: the tenant's budget still refuses
    status, big = await admin(
        proxy, "POST", "/admin/tenants/kn/keys", {"limits": {"budgets": {"day": 10**9}}}
    )
    assert status == 201
    with pytest.raises(anthropic.RateLimitError) as refused:
        await proxy.client(small["key"]).messages.create(**ask(max_tokens=400))
    assert "key" in str(refused.value)  # the key's own scope refused
    # the other key and the tenant are untouched by the refusal
    assert await redis.hlen(TenantKeys.of("budgeter", "kn").resv) == 0
    await proxy.client(big["key"]).messages.create(**ask(max_tokens=400))
    await proxy.settled()
    status, _ = await admin(proxy, "PUT", "/admin/tenants/kn", {"budgets": {"day": 200}})
    assert status == 200
    with pytest.raises(anthropic.RateLimitError):  # the tenant's is narrower now: it holds
        await proxy.client(big["key"]).messages.create(**ask(max_tokens=400))
    # a key allowed one model only
    only = await tenant_with_key(
        proxy, "km", {}, {"allowed_models": ["claude-haiku-4-5"]}, name="haiku-only"
    )
    with pytest.raises(anthropic.APIStatusError):
        await proxy.client(only["key"]).messages.create(**ask())
    await proxy.settled()
    assert await redis.hlen(TenantKeys.of("budgeter", "km").resv) == 0


async def test_a_key_allowed_more_than_its_tenant_is_still_refused_by_the_tenant(
    proxy: Proxy,  # noqa: F811 - the fixture
    redis: Redis,
) -> None:
    """A key's ``allowed_models`` that lists a model its tenant's ``allowed_models`` forbids
    does not allow it: the tenant's scope refuses it (``model_not_allowed``, 403, the
    tenant's sentence, not the key's); and a key with a bigger rate than its tenant is held
    to the tenant's. Neither refusal reserves anything nor reaches the upstream."""
    sonnet, haiku = "claude-sonnet-4-6", "claude-haiku-4-5"
    wide = await tenant_with_key(
        proxy, "ko", {"allowed_models": [haiku]}, {"allowed_models": [sonnet, haiku]}
    )
    assert wide["limits"]["allowed_models"] == [sonnet, haiku]  # stored as asked
    calls = (await proxy.mock_stats())["requests"]["messages"]
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await proxy.client(wide["key"]).messages.create(**{**ask(), "model": sonnet})
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message == f"model {sonnet!r} is not in this tenant's allowed_models"  # not the key's
    assert await redis.hlen(TenantKeys.of("budgeter", "ko").resv) == 0
    scope = KeyScopeKeys("budgeter", "ko", wide["id"])
    assert await redis.hlen(scope.resv) == 0
    # the model both allow is served (the key's list is read: the request is the key's)
    await proxy.client(wide["key"]).messages.create(**{**ask(), "model": haiku})
    await proxy.settled()
    assert (await proxy.mock_stats())["requests"]["messages"] == calls + 1
    status, listed = await admin(proxy, "GET", "/admin/tenants/ko/keys")
    [row] = listed["data"]
    day = next(t for t in row["usage"] if t["period"] == "day")
    assert (status, day["requests"]) == (200, 1)  # the served one only

    # one request a minute for the tenant, a thousand for its key: the tenant's holds
    fast = await tenant_with_key(
        proxy, "kr", {"rate": {"rpm": 1}, "max_wait_seconds": 0}, {"rate": {"rpm": 1000}}
    )
    client = proxy.client(fast["key"])
    await client.messages.create(**ask(1))
    await proxy.settled()
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(**ask(2))
    message = limited.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("the rpm rate limit reached"), message  # the tenant's, not the key's
    assert await redis.hlen(TenantKeys.of("budgeter", "kr").resv) == 0
    assert (await proxy.mock_stats())["requests"]["messages"] == calls + 2

    # the key narrower than its tenant: the key's own refusal is a 403 too, naming the key
    narrow = await tenant_with_key(proxy, "kn", {}, {"allowed_models": [haiku]})
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await proxy.client(narrow["key"]).messages.create(**{**ask(), "model": sonnet})
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message == f"model {sonnet!r} is not in the allowed_models of this API key"
    assert (await proxy.mock_stats())["requests"]["messages"] == calls + 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limits": {"budgets": {"day": -1}}}, "limits.budgets.day"),
        ({"limits": {"budgets": {"week": 10}}}, "limits.budgets.week"),
        ({"limits": {"usd_budgets": {"day": "5"}}}, "limits.usd_budgets.day"),
        ({"limits": {"rate": {"rpm": 0}}}, "limits.rate.rpm"),
        ({"limits": {"max_concurrency": 1.5}}, "limits.max_concurrency"),
        ({"limits": {"allowed_models": [""]}}, "limits.allowed_models"),
        ({"limits": {"weight": 5}}, "limits.weight"),  # a tenant's field, not a key's
        ({"limits": {"parent": "other"}}, "limits.parent"),
        ({"limits": []}, "limits"),
        ({"name": 5}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"nam": "x"}, "nam"),
        ([], "invalid key"),
    ],
)
async def test_bad_key_bodies_are_400_naming_the_field_and_write_nothing(
    proxy: Proxy,  # noqa: F811 - the fixture
    redis: Redis,
    body: Any,
    field: str,
) -> None:
    status, _ = await admin(proxy, "PUT", "/admin/tenants/kb", {})
    before = await redis.hgetall(TenantKeys.of("budgeter", "kb").api_keys)
    status, answer = await admin(proxy, "POST", "/admin/tenants/kb/keys", body)
    assert status == 400, answer
    assert field in answer["error"]["message"]
    assert await redis.hgetall(TenantKeys.of("budgeter", "kb").api_keys) == before
    assert await redis.exists(TenantKeys.of("budgeter", "kb").limited_keys) == 0


async def test_a_tenant_key_never_reads_or_creates_another_branchs_keys(
    proxy: Proxy,  # noqa: F811 - the fixture
) -> None:
    await tenant_with_key(proxy, "org", {}, None)
    await tenant_with_key(proxy, "team-a", {"parent": "org"}, {"budgets": {"day": 100}})
    other = await tenant_with_key(proxy, "team-b", {"parent": "org"}, None)
    as_tenant = {"x-api-key": other["key"]}
    for method, path in (
        ("GET", "/admin/tenants/team-a/keys"),
        ("GET", "/admin/tenants/org/keys"),
        ("POST", "/admin/tenants/team-a/keys"),
    ):
        status, answer = await admin(proxy, method, path, headers=as_tenant)
        assert status in (401, 403), (path, answer)
    as_bearer = {"authorization": f"Bearer {other['key']}"}
    status, _ = await admin(proxy, "GET", "/admin/tenants/team-a/keys", headers=as_bearer)
    assert status in (401, 403)


async def test_a_batch_remembers_its_key_and_the_worker_charges_its_scope(
    redis: Redis,
) -> None:
    from budgeter.domain.policy import TenantPolicy
    from budgeter.tenants.store import TenantStore

    await TenantStore(redis).put("kw", TenantPolicy(budgets={"day": 1_000_000}))
    keys = KeyStore(redis)
    key_id, _ = await keys.create("kw", limits=KeyLimits(budgets={"day": 1_000_000}))
    store = BatchStore(redis)
    batch = await store.create(
        "kw", requests_for("w", 3), passthrough=Passthrough(key=key_id, key_limited=True)
    )
    remembered = await BatchStore(redis).passthrough("kw", batch)
    assert (remembered.key, remembered.scope_key) == (key_id, key_id)
    async with running_worker(redis):
        await wait_ended(store, [batch])
    scope = KeyScopeKeys("budgeter", "kw", key_id)
    tenant_used = int((await redis.hgetall(TenantKeys.of("budgeter", "kw").budget))["day:used"])
    assert int((await redis.hgetall(scope.budget))["day:used"]) == tenant_used > 0
    assert await redis.hlen(scope.resv) == 0
    listed = {row["id"]: row for row in await keys.list_keys("kw")}
    assert listed[key_id]["limits"] == {"budgets": {"day": 1_000_000}}


async def test_key_limits_on_a_cluster_create_admit_and_revoke(cluster_redis: Any) -> None:
    """On the 3-master cluster: the key's scope is in its tenant's slot, so creating,
    looking up (one pipeline), reserving in both scopes and revoking all work."""
    from budgeter.admission.admission import Admission
    from budgeter.domain.policy import TenantPolicy
    from budgeter.store.keys import key_index_key
    from budgeter.tenants.store import TenantStore

    await TenantStore(cluster_redis).put("kc", TenantPolicy(budgets={"day": 10_000}))
    keys = KeyStore(cluster_redis)
    key_id, key = await keys.create("kc", name="c", limits=KeyLimits(budgets={"day": 100}))
    principal = await keys.authenticate(key)
    assert principal is not None and principal.scope_key == key_id
    admission = Admission(cluster_redis)
    refused = await admission.reserve("kc", "r1", 50, 100, key=principal.scope_key)
    assert refused.kind == "REJECT" and refused.reason.startswith("key:")
    admitted = await admission.reserve("kc", "r2", 20, 30, key=principal.scope_key)
    assert admitted.kind == "ADMIT"
    await admission.release("kc", "r2")
    assert await keys.revoke("kc", key_id)
    scope = KeyScopeKeys("budgeter", "kc", key_id)
    assert await cluster_redis.exists(scope.policy) == 0
    assert await keys.authenticate(key) is None
    assert await cluster_redis.hlen(key_index_key("budgeter")) == 0
