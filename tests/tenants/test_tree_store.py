"""The organisation tree in Redis (issue 17, item 1): ``TenantStore`` checks every parent
against the stored tree with a compare-and-set, so concurrent writers never build a cycle;
a tenant with children cannot be deleted; the admin API answers 400 naming the chain and
409 naming the children; ``tenants apply`` orders parents first and refuses a bad tree
before it writes anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis, RedisCluster

from budgeter.api.app import create_app
from budgeter.cli.commands import main
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.tree import HasChildrenError, TreeError
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore
from tests.api.test_app import expect_error

ADMIN = {"authorization": "Bearer tree-admin-token-0123"}


def under(parent: str | None, **extra: object) -> TenantPolicy:
    return TenantPolicy.model_validate({"parent": parent, **extra})


async def test_parents_must_exist_and_make_no_cycle(redis: Redis) -> None:
    store = TenantStore(redis)
    with pytest.raises(TreeError, match="'org' not found"):
        await store.put("team", under("org"))
    assert not await store.exists("team")  # nothing stored
    await store.put("org", under(None))
    await store.put("team", under("org"))
    await store.put("dev", under("team"))
    with pytest.raises(TreeError, match="cycle: org → dev → team → org"):
        await store.put("org", under("dev"))
    assert (await store.get("org")) == under(None)
    assert await store.parents() == {"org": None, "team": "org", "dev": "team"}


async def test_concurrent_writers_never_make_a_cycle(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("a", under(None))
    await store.put("b", under(None))
    results = await asyncio.gather(
        TenantStore(redis).put("a", under("b")),
        TenantStore(redis).put("b", under("a")),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, TreeError)]
    assert len(errors) == 1, results
    parents = await store.parents()
    assert sorted(parents.items(), key=str) in (
        [("a", "b"), ("b", None)],
        [("a", None), ("b", "a")],
    )


async def test_the_tree_write_is_a_compare_and_set_on_its_version(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("a", under(None))
    stale, _ = await store.tree()
    await store.put("b", under(None))
    fresh, parents = await store.tree()
    assert fresh != stale and parents == {"a": None, "b": None}
    ops = ["set", "b", "a"]
    assert await store._tree_set(keys=store._tree_keys, args=[stale, *ops]) == 0
    assert await store.parents() == {"a": None, "b": None}  # nothing written
    assert await store._tree_set(keys=store._tree_keys, args=[fresh, *ops]) == 1
    assert await store.parents() == {"a": None, "b": "a"}


async def _hgetalls(redis: Redis) -> int:
    """HGETALL calls so far (on a cluster, summed over its masters)."""
    if isinstance(redis, RedisCluster):
        stats = [
            await redis.info("commandstats", target_nodes=node) for node in redis.get_primaries()
        ]
    else:
        stats = [await redis.info("commandstats")]
    return sum(int(s.get("cmdstat_hgetall", {}).get("calls", 0)) for s in stats)


async def test_roots_are_written_without_reading_the_tree_or_retrying(redis: Redis) -> None:
    """Creating many tenants at once: a root is valid in any tree, so each put of one is
    one unconditional tree write (no read of the whole tree, no compare-and-set retry)."""
    store = TenantStore(redis)
    await store.put("org", under(None))
    await store.put("team", under("org"))
    version, _ = await store.tree()
    before = await _hgetalls(redis)
    await asyncio.gather(*(store.put(f"r{n}", under(None)) for n in range(200)))
    await store.put("team", under(None))  # a child made a root: its chain only gets shorter
    assert await _hgetalls(redis) == before
    after, parents = await store.tree()
    assert int(after) == int(version) + 201  # one write each, none retried
    assert parents == {"org": None, "team": None, **{f"r{n}": None for n in range(200)}}
    # the unconditional form applies on any version; a stale compare-and-set still does not
    ops = ["set", "x", ""]
    assert await store._tree_set(keys=store._tree_keys, args=["*", *ops]) == 1
    assert await store._tree_set(keys=store._tree_keys, args=[version, "set", "y", "x"]) == 0
    assert (await store.parents())["x"] is None and "y" not in await store.parents()


async def test_depth_is_at_most_four_below_the_root(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("l0", under(None))
    for level in range(1, 5):
        await store.put(f"l{level}", under(f"l{level - 1}"))
    with pytest.raises(TreeError, match="5 levels below the root"):
        await store.put("l5", under("l4"))


async def test_a_tenant_with_children_is_not_deleted(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("org", under(None))
    await store.put("team-b", under("org"))
    await store.put("team-a", under("org"))
    with pytest.raises(HasChildrenError) as caught:
        await store.delete("org")
    assert caught.value.children == ["team-a", "team-b"]
    assert await store.exists("org")
    await store.delete("team-a")
    await store.put("team-b", under(None))  # re-parented to a root
    assert await store.delete("org")
    assert await store.parents() == {"team-b": None}


async def test_a_tenant_made_before_the_tree_can_be_a_parent(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("old", under(None))
    await redis.hdel("budgeter:{tree}:parents", "old")  # as an older version left it
    await store.put("new", under("old"))
    assert await store.parents() == {"old": None, "new": "old"}


async def test_a_patch_re_parents_through_the_same_checks(redis: Redis) -> None:
    store = TenantStore(redis)
    for tenant, parent in (("org", None), ("x", "org"), ("y", "org")):
        await store.put(tenant, under(parent))
    both = await store.patch_with_before("y", {"parent": "x"})
    assert both is not None and (both[0].parent, both[1].parent) == ("org", "x")
    with pytest.raises(TreeError, match="cycle"):
        await store.patch("x", {"parent": "y"})
    assert (await store.parents())["x"] == "org"


# the admin API ---------------------------------------------------------------------------


def app_settings(redis_url: str) -> Settings:
    """The API's settings here (and in tests/system/test_cluster.py, on the cluster)."""
    return Settings(
        redis_url=redis_url,
        admin_token="tree-admin-token-0123",  # type: ignore[arg-type]
        upstream_url="http://127.0.0.1:9",
        auth_failures_per_minute=1_000_000,
    )


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    app = create_app(app_settings(redis_url), redis=redis)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_the_api_answers_400_naming_the_chain_and_409_naming_children(
    client: TestClient,
) -> None:
    missing = await client.put("/admin/tenants/team", json={"parent": "org"}, headers=ADMIN)
    await expect_error(missing, 400, "invalid_request_error")
    assert "tenant 'org' not found" in (await missing.json())["error"]["message"]
    assert (await client.put("/admin/tenants/org", json={}, headers=ADMIN)).status == 201
    made = await client.put("/admin/tenants/team", json={"parent": "org"}, headers=ADMIN)
    assert made.status == 201
    assert (await made.json())["policy"]["parent"] == "org"
    cycle = await client.patch("/admin/tenants/org", json={"parent": "team"}, headers=ADMIN)
    await expect_error(cycle, 400, "invalid_request_error")
    assert "cycle: org → team → org" in (await cycle.json())["error"]["message"]
    bad_id = await client.put("/admin/tenants/x", json={"parent": "Not An Id"}, headers=ADMIN)
    await expect_error(bad_id, 400, "invalid_request_error")
    refused = await client.delete("/admin/tenants/org", headers=ADMIN)
    await expect_error(refused, 409, "invalid_request_error")
    assert "has children ('team')" in (await refused.json())["error"]["message"]
    assert (await client.put("/admin/tenants/org2", json={}, headers=ADMIN)).status == 201
    moved = await client.put("/admin/tenants/team", json={"parent": "org2"}, headers=ADMIN)
    note = (await moved.json())["note"]
    assert note.startswith("moved from 'org' to 'org2': usage already charged stays")


# tenants apply ----------------------------------------------------------------------------


@pytest.fixture
def env(redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ARG001
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)  # (the redis fixture: a flushed db)


@pytest.mark.usefixtures("env")
def test_apply_creates_parents_first_and_refuses_a_bad_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tenants.yaml"
    # alphabetical order would create each child before its parent
    tree.write_text(
        "tenants:\n"
        "  a-team: {parent: m-division}\n"
        "  m-division: {parent: z-org}\n"
        "  z-org: {budgets: {day: 1000}}\n"
    )
    assert main(["tenants", "apply", str(tree)]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tenants:\n"
        "  a-team: {parent: ghost}\n"
        "  m-division: {parent: a-team}\n"
        "  z-org: {parent: m-division}\n"
    )
    assert main(["tenants", "apply", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"budgeter: error: {bad}: tenants.a-team: parent: tenant 'ghost' not found "
        "(create the parent first)",
    ]
    orphaning = tmp_path / "orphaning.yaml"
    orphaning.write_text(
        "prune: true\ntenants:\n  a-team: {parent: m-division}\n  m-division: {parent: z-org}\n"
    )
    assert main(["tenants", "apply", str(orphaning)]) == 2  # z-org pruned, its child kept
    assert [line.split(": ", 3)[3] for line in capsys.readouterr().err.splitlines()] == [
        "tenants.m-division: parent: tenant 'z-org' not found (create the parent first)",
        "tenants.z-org: tenant 'z-org' has children ('m-division'): delete them or give "
        "them another parent first",
    ]
    prune = tmp_path / "prune.yaml"
    prune.write_text("prune: true\ntenants:\n  z-org: {}\n")
    assert main(["tenants", "apply", str(prune)]) == 0  # a-team goes before m-division
    capsys.readouterr()
    assert main(["tenants", "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["tenant"] for t in listed] == ["z-org"]
