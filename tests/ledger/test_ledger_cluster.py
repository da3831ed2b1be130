"""The ledger on a real Redis Cluster (issue 18, "tested against a real Redis and on the
cluster"): a tenant under a parent whose members sit on different nodes; settles, a
charge in full, a release and a reap each append one entry to the tenant's own stream
(its slot) in the settle's call, with the ancestors and tags; the ledger equals the
counters per model and kind; the per-minute rollups are there; the ancestors keep no
entries."""

from __future__ import annotations

import time
from typing import Any

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.ledger.read import LedgerFilter, iter_entries
from budgeter.store.keys import TenantKeys
from budgeter.tenants.rollups import read_minutes
from budgeter.tenants.store import TenantStore
from tests.ledger.test_reconcile import counter_sums, ledger_sums

MODEL = "claude-haiku-4-5"


async def test_the_ledger_reconciles_on_a_cluster(cluster_redis: Any) -> None:
    tenants = TenantStore(cluster_redis)
    await tenants.put("org-l", TenantPolicy(budgets={"day": 1_000_000}))
    await tenants.put("team-l", TenantPolicy(parent="org-l", budgets={"day": 100_000}))
    nodes = {
        cluster_redis.get_node_from_key(TenantKeys.of("budgeter", t).ledger).name
        for t in ("org-l", "team-l")
    }
    assert len(nodes) == 2, "the tenant and its parent on different nodes"
    adm = Admission(cluster_redis)
    meta: dict[str, object] = {"s": "batch:b1/c-1", "g": {"team": "search"}}
    for n in range(6):
        decision = await adm.reserve("team-l", f"r{n}", 100, 50, model=MODEL, meta=meta)
        assert decision.kind == "ADMIT", decision
    await adm.settle("team-l", "r0", Usage(100, 20))
    await adm.settle("team-l", "r1", Usage(90, 50, cache_read_input_tokens=10))
    await adm.charge_full("team-l", "r2")
    await adm.release("team-l", "r3")
    assert await adm.mark_sent("team-l", "r4")
    later = int(time.time() * 1000) + 10**7  # past every hold: r4 charged, r5 released
    await adm.reap("team-l", now_ms=later)

    keys = TenantKeys.of("budgeter", "team-l")
    entries = [e async for e in iter_entries(cluster_redis, keys, LedgerFilter(), page=2)]
    assert sorted(e.outcome for e in entries) == sorted(
        ["settled", "settled", "charged_full", "released", "charged_full", "released"]
    )
    assert all(e.ancestors == ["org-l"] and e.tags == {"team": "search"} for e in entries)
    assert {e.source for e in entries} == {"batch:b1/c-1"}
    sums, _ = await ledger_sums(cluster_redis, "team-l")
    assert +sums == +(await counter_sums(cluster_redis, "team-l"))  # to the token
    assert sums[(MODEL, "input")] == 100 + 90 + 100 + 100
    assert [
        e
        async for e in iter_entries(
            cluster_redis, TenantKeys.of("budgeter", "org-l"), LedgerFilter()
        )
    ] == []

    now_ms = int(time.time() * 1000)
    rows = await read_minutes(cluster_redis, keys, since_ms=now_ms - 120_000, now_ms=later)
    charged = sum(r.input + r.output + r.cache_creation + r.cache_read for r in rows)
    assert charged == sum(e.tokens for e in entries)
