"""Hierarchical fair share (issue 17, item 4) on the suite's 3-master Redis Cluster: every
test of test_hier_fair_share runs again with a RedisCluster client. The tree's tenants sit
on different nodes (their own hash tags); the scheduler's keys, lib/hfq.lua's per-node
zsets included, all carry the ``{sched}`` tag, so pick and activate stay one-slot calls.
A few examples of the scheduler's property tests (tests/queue/test_hfq_property.py) run
here too."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from budgeter.store.keys import SchedKeys, TenantKeys
from tests.admission.test_admission_property import TIMEOUT_S
from tests.queue import test_hfq_property, test_hier_fair_share

CASES = [
    pytest.param(func, id=name)
    for name, func in vars(test_hier_fair_share).items()
    if name.startswith("test_") and inspect.iscoroutinefunction(func)
]


@pytest.mark.parametrize("test", CASES)
async def test_on_redis_cluster(test: Callable[..., Awaitable[None]], cluster_redis: Any) -> None:
    await test(redis=cluster_redis)


async def test_the_tree_spans_nodes_and_the_scheduler_is_one_slot(cluster_redis: Any) -> None:
    queue = await test_hier_fair_share.two_orgs(cluster_redis)
    await test_hier_fair_share.served(queue, 5)
    tenants = ["orga", "orgb", "b0", *(f"a{i}" for i in range(10))]
    nodes = {
        cluster_redis.get_node_from_key(TenantKeys.of("budgeter", t).queue).name for t in tenants
    }
    assert len(nodes) == 3  # the tree's members live on every master
    s = SchedKeys("budgeter")
    levels = [f"{s.hfq}:{node}" for node in ("", "orga", "orgb", "a0", "b0")]
    for level in levels:
        assert await cluster_redis.zcard(level) > 0
    slots = {cluster_redis.keyslot(k) for k in [*s.pick_keys, *levels, s.hfq + "|v"]}
    assert len(slots) == 1


@pytest.mark.timeout(TIMEOUT_S)
def test_the_tree_scheduler_properties_hold_on_the_cluster(redis_cluster_url: str) -> None:
    """A few examples of tests/queue/test_hfq_property.py's properties, on the cluster."""
    stats, _ = test_hfq_property.interleaved(redis_cluster_url, 15)
    assert stats["bounded waits checked"] > 50, stats
    assert len(test_hfq_property.always_backlogged(redis_cluster_url, 4)) >= 4
