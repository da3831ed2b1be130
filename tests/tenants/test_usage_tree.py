"""Usage along the organisation tree (issue 17 item 5): a tenant's own totals, each direct
child's (its own and its subtree's), each API key (what was charged to it), and the
rollup of the whole subtree, summed exactly from what ``Admission.reserve/settle`` charged
to each tenant; bounded by a cap that says when it cut. The admin route, ``/v1/usage``, the
CLI, and a 3-master cluster with the tree's members on different nodes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.api.app import create_app
from budgeter.cli.commands import main
from budgeter.domain.policy import TenantPolicy
from budgeter.settings import Settings
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import PeriodTotals, UsageAnswer
from budgeter.tenants.usage_tree import KEYS_NOTE, subtree, usage_report

ADMIN_TOKEN = "usage-tree-admin-token-0123"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}

# org ─┬─ research ─┬─ nlp
#      │            └─ vision
#      └─ sales
TREE = {"org": None, "research": "org", "sales": "org", "nlp": "research", "vision": "research"}
# tenant -> the (input, output, cache_creation, cache_read) of each request settled
SETTLED: dict[str, list[tuple[int, int, int, int]]] = {
    "org": [(100, 10, 0, 0)],
    "research": [(200, 20, 5, 0), (300, 30, 0, 7)],
    "nlp": [(1000, 100, 0, 0), (1100, 110, 0, 0), (1200, 120, 9, 11)],
    "vision": [(400, 40, 0, 0)],
    "sales": [(50, 5, 0, 0), (60, 6, 0, 0)],
}
INFLIGHT = {"vision": (70, 30), "org": (11, 9)}  # (input, max_tokens) still reserved


def used_of(tenants: list[str]) -> int:
    return sum(sum(r) for t in tenants for r in SETTLED[t])


def requests_of(tenants: list[str]) -> int:
    return sum(len(SETTLED[t]) for t in tenants)


def reserved_of(tenants: list[str]) -> int:
    return sum(sum(INFLIGHT[t]) for t in tenants if t in INFLIGHT)


async def build_tree(redis: Any) -> None:
    store = TenantStore(redis)
    for tenant in ("org", "research", "sales", "nlp", "vision"):  # parents first
        await store.put(tenant, TenantPolicy.model_validate({"parent": TREE[tenant]}))
    adm = Admission(redis)
    for tenant, rows in SETTLED.items():
        for n, (inp, out, cc, cr) in enumerate(rows):
            rid = f"{tenant}-{n}"
            assert (await adm.reserve(tenant, rid, inp + cc + cr, out + 50)).kind == "ADMIT"
            await adm.settle(tenant, rid, Usage(inp, out, cc, cr))
    for tenant, (inp, max_tokens) in INFLIGHT.items():
        assert (await adm.reserve(tenant, f"{tenant}-open", inp, max_tokens)).kind == "ADMIT"


def by_period(totals: list[PeriodTotals] | None) -> dict[str, tuple[int, int, int]]:
    assert totals is not None
    return {t.period: (t.requests, t.used, t.reserved) for t in totals}


def expect(tenants: list[str]) -> dict[str, tuple[int, int, int]]:
    row = (requests_of(tenants), used_of(tenants), reserved_of(tenants))
    return {"day": row, "month": row, "total": row}


def check_org(report: UsageAnswer | None) -> None:
    assert report is not None and report.parent is None
    assert by_period(report.totals) == expect(list(TREE))  # charged for everything below
    assert report.rollup is not None and not report.rollup.capped
    assert (report.rollup.tenants, report.rollup.descendants) == (5, 4)
    assert report.rollup.counters_include_descendants is True
    assert by_period(report.rollup.totals) == expect(list(TREE))
    assert report.children is not None
    kids = {c.tenant: c for c in report.children}
    assert list(kids) == ["research", "sales"]  # direct children only
    assert kids["research"].descendants == 2
    assert by_period(kids["research"].totals) == expect(["research", "nlp", "vision"])
    assert by_period(kids["research"].rollup) == expect(["research", "nlp", "vision"])
    assert kids["sales"].descendants == 0
    assert by_period(kids["sales"].rollup) == by_period(kids["sales"].totals) == expect(["sales"])


async def test_a_three_level_tree_rolls_up_exactly(redis: Redis) -> None:
    await build_tree(redis)
    now_ms = int(time.time() * 1000)
    check_org(await usage_report(redis, "org", now_ms=now_ms))
    research = await usage_report(redis, "research", now_ms=now_ms)
    assert research is not None and research.parent == "org"
    assert [c.tenant for c in research.children or []] == ["nlp", "vision"]
    assert by_period(research.rollup.totals if research.rollup else None) == expect(
        ["research", "nlp", "vision"]
    )
    leaf = await usage_report(redis, "vision", now_ms=now_ms)
    assert leaf is not None and leaf.children == [] and leaf.rollup is not None
    assert by_period(leaf.rollup.totals) == by_period(leaf.totals) == expect(["vision"])
    # the existing fields are unchanged: usage per model, the in-flight count
    assert leaf.inflight == 1 and leaf.usage[0].amount("input") == 400
    # a new period (tomorrow) starts from nothing, except 'total'
    later = await usage_report(redis, "org", now_ms=now_ms + 40 * 86_400_000)
    assert later is not None and later.rollup is not None
    assert by_period(later.rollup.totals)["day"] == (0, 0, 0)
    assert by_period(later.rollup.totals)["total"] == expect(list(TREE))["total"]


async def test_the_rollup_is_capped_and_says_so(redis: Redis) -> None:
    await build_tree(redis)
    report = await usage_report(redis, "org", now_ms=int(time.time() * 1000), max_descendants=2)
    assert report is not None and report.rollup is not None
    assert report.rollup.capped and (report.rollup.tenants, report.rollup.descendants) == (3, 4)
    # breadth first: the direct children are read before the grandchildren; a member read
    # whose children were not counts with its whole records, so the sum is still exact
    assert by_period(report.rollup.totals) == expect(list(TREE))
    assert subtree({"a": ["b", "c"], "b": ["d"]}, "a", 10) == (["a", "b", "c", "d"], 3)
    assert subtree({"a": ["b", "c"], "b": ["d"]}, "a", 0) == (["a"], 3)


async def test_keys_are_listed_with_their_own_usage(redis: Redis) -> None:
    await build_tree(redis)
    key_id, key = await KeyStore(redis).create("org")
    adm = Admission(redis)
    assert (await adm.reserve("org", "k1", 30, 20, meta={"k": key_id})).kind == "ADMIT"
    await adm.settle("org", "k1", Usage(30, 5))
    report = await usage_report(redis, "org", now_ms=int(time.time() * 1000))
    assert report is not None and report.keys is not None
    [listed] = report.keys
    assert listed.id == key_id and listed.usage is not None
    assert by_period(listed.usage) == {p: (1, 35, 0) for p in ("day", "month", "total")}
    assert report.keys_note == KEYS_NOTE
    assert key not in report.model_dump_json()  # never the key, nor its hash
    bare = await usage_report(redis, "sales", now_ms=int(time.time() * 1000))
    assert bare is not None and bare.keys == [] and bare.keys_note is None


@pytest.fixture
async def client(
    redis: Redis, redis_url: str
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = Settings(
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,
        upstream_url="http://127.0.0.1:9",
        auth_failures_per_minute=1_000_000,
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as test_client:
        yield test_client


async def test_the_admin_route_and_v1_usage_show_the_tree(
    client: TestClient[web.Request, web.Application], redis: Redis
) -> None:
    await build_tree(redis)
    resp = await client.get("/admin/tenants/org/usage", headers=ADMIN)
    assert resp.status == 200
    check_org(UsageAnswer.model_validate(await resp.json()))
    _, key = await KeyStore(redis).create("research")
    own = await client.get("/v1/usage", headers={"x-api-key": key})
    assert own.status == 200
    body = await own.json()
    assert body["tenant"] == "research" and body["parent"] == "org"
    assert [c["tenant"] for c in body["children"]] == ["nlp", "vision"]  # its own branch only
    assert body["rollup"]["descendants"] == 2
    assert body["keys"][0]["usage"][0]["used"] == 0 and "key" not in body["keys"][0]


async def test_the_cli_prints_the_tree(
    redis: Redis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await build_tree(redis)
    await KeyStore(redis).create("org")
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    monkeypatch.setenv("COLUMNS", "160")
    assert await asyncio.to_thread(main, ["usage", "--tenant", "org"]) == 0
    text = capsys.readouterr().out
    assert "tokens used (+reserved) by org" in text
    total = f"{used_of(list(TREE)):,} (+{reserved_of(list(TREE))})"
    assert any("with 4 below" in line and total in line for line in text.splitlines()), text
    assert any("└ research" in line for line in text.splitlines())
    assert "0 (+0) today, 0 requests" in text
    assert await asyncio.to_thread(main, ["usage", "--tenant", "org", "--json"]) == 0
    answer = UsageAnswer.model_validate(json.loads(capsys.readouterr().out))
    check_org(answer)


async def test_on_a_cluster_the_members_sit_on_different_nodes(cluster_redis: Any) -> None:
    await build_tree(cluster_redis)
    slots = {cluster_redis.keyslot(f"budgeter:{{t:{t}}}:usage") for t in TREE}
    nodes = {cluster_redis.get_node_from_key(f"budgeter:{{t:{t}}}:usage").name for t in TREE}
    assert len(slots) == 5 and len(nodes) >= 2, nodes
    check_org(await usage_report(cluster_redis, "org", now_ms=int(time.time() * 1000)))
