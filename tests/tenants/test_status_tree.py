"""The status snapshot carries the organisation tree (parent, children busiest first,
depth, roots, a subtree folded only when all of it is idle, what a subtree used today), and
``budgeter top`` draws it indented, busiest first, idle subtrees folded into one line."""

from __future__ import annotations

import io
import time
from typing import Any

from redis.asyncio import Redis
from rich.console import Console

from budgeter.admission.admission import Admission, Usage
from budgeter.cli.top import render_snapshot, tree_rows
from budgeter.domain.policy import TenantPolicy
from budgeter.tenants.status import arrange_tree, status_snapshot
from budgeter.tenants.store import TenantStore
from tests.tenants.test_status import NOW, row

# org ─┬─ research ─┬─ nlp     (3 in flight: the busiest)
#      │            └─ vision  (1 in flight)
#      └─ sales                (idle)
# api                          (one settled request: a decision lately)
# solo                         (idle)
PARENTS = {
    "org": None,
    "research": "org",
    "sales": "org",
    "nlp": "research",
    "vision": "research",
    "api": None,
    "solo": None,
}


async def busy_tree(redis: Any) -> None:
    store = TenantStore(redis)
    for tenant in ("org", "research", "sales", "nlp", "vision", "api", "solo"):
        policy = {"parent": PARENTS[tenant], "budgets": {"day": 1_000_000}}
        await store.put(tenant, TenantPolicy.model_validate(policy))
    adm = Admission(redis)
    for i in range(3):
        assert (await adm.reserve("nlp", f"n{i}", 100, 50, model="m-1")).kind == "ADMIT"
    assert (await adm.reserve("vision", "v0", 100, 50, model="m-1")).kind == "ADMIT"
    for tenant, n in (("research", 2), ("api", 1), ("nlp", 1)):
        for i in range(n):
            assert (await adm.reserve(tenant, f"s{i}", 40, 60, model="m-1")).kind == "ADMIT"
            await adm.settle(tenant, f"s{i}", Usage(40, 10))


async def test_the_snapshot_carries_the_tree(redis: Redis) -> None:
    await busy_tree(redis)
    snap = await status_snapshot(redis, now_ms=int(time.time() * 1000))
    rows = {t["tenant"]: t for t in snap["tenants"]}
    assert {t: r.get("parent") for t, r in rows.items()} == PARENTS
    assert snap["roots"] == ["org", "api", "solo"]  # org's subtree is the busiest
    assert rows["org"]["children"] == ["research", "sales"]
    assert rows["research"]["children"] == ["nlp", "vision"]
    assert [rows[t].get("depth") for t in ("org", "research", "nlp")] == [0, 1, 2]
    # org carries its subtree's reservations and decisions (charged along the chain), so
    # it is not idle; sales is idle and so is its subtree
    assert not rows["org"]["idle"] and not rows["org"].get("subtree_idle")
    assert rows["sales"]["idle"] and rows["sales"].get("subtree_idle")
    assert rows["solo"].get("subtree_idle") and not rows["api"].get("subtree_idle")
    # what the subtree used today: research (2 x 50) and nlp (1 x 50)
    assert rows["org"].get("subtree_today") == {
        "tenants": 5,
        "requests": 3,
        "tokens": 150,
        "usd": 0.0,
    }
    assert rows["nlp"].get("subtree_today") is None  # a leaf
    # the flat order: busiest first (a parent holds its subtree's in-flight work: org and
    # research 4 each, nlp 3), idle ones last by name
    assert [t["tenant"] for t in snap["tenants"]][:3] == ["org", "research", "nlp"]


def test_siblings_order_by_their_busiest_descendant() -> None:
    rows = [
        row("a", queued=1),
        row("b"),
        row("b-kid", queued=5),
        row("c", queued=3),
        row("lost", queued=2),
    ]
    parents = {"a": None, "b": None, "b-kid": "b", "c": None, "lost": "gone"}
    from budgeter.tenants.status import order_by_activity

    roots = arrange_tree(order_by_activity(rows, NOW), parents, NOW)
    assert roots == ["b", "c", "lost", "a"]  # 'lost': its parent has no row, so a root
    assert rows[1].get("children") == ["b-kid"] and rows[4].get("parent") is None


async def test_top_draws_the_tree_indented(redis: Redis) -> None:
    await busy_tree(redis)
    snap = await status_snapshot(redis, now_ms=int(time.time() * 1000))
    shown, folded = tree_rows(snap)
    assert [t["tenant"] for t in shown] == ["org", "research", "nlp", "vision", "api"]
    assert folded == ["sales", "solo"]
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, force_terminal=False).print(
        render_snapshot(snap, width=200)
    )
    lines = out.getvalue().splitlines()
    names = [line.split()[0:2] for line in lines if line.strip()]
    tree = [
        n[1] if n[0] == "└" else n[0] for n in names if n[0] in ("org", "api", "└") and len(n) > 1
    ]
    assert tree == ["org", "research", "nlp", "vision", "api"], out.getvalue()
    indents = {
        name: line.index("└")
        for line in lines
        for name in ("research", "nlp")
        if f"└ {name}" in line
    }
    assert indents["nlp"] == indents["research"] + 2  # one level deeper
    assert "2 idle: sales, solo" in out.getvalue()
