"""The core engine's and the Batches API's integration tests, run again against a real
three-master Redis Cluster (started by the suite on loopback ports).

Every test of these modules that needs only ``redis`` (and ``client``, the API built on
it) is collected here and run with a RedisCluster client instead. A module whose own
``client`` fixture needs other settings (admin tokens) names them in ``app_settings``.
The organisations' modules (fallback, audit, tree store, status tree and ``top``) each have
a tree whose members sit on different masters: checked after the test (``SPREAD``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from budgeter.api.app import create_app
from budgeter.settings import Settings
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from tests.admission import test_admission, test_fallback
from tests.api import test_admin_consistency, test_audit
from tests.api import test_app as test_api_http
from tests.domain import test_policy as test_policy_depth
from tests.queue import test_job_layout, test_jobqueue, test_priorities_and_deadlines
from tests.store import test_hash_slots
from tests.system import test_review_fixes
from tests.tenants import test_merge_patch, test_status_tree, test_tree_store
from tests.upstream import test_token_counter as test_count_fallback
from tests.worker import test_worker

MODULES = (
    test_admission,
    test_jobqueue,
    test_job_layout,
    test_worker,
    test_api_http,
    test_hash_slots,
    test_review_fixes,
    test_policy_depth,
    test_count_fallback,
    test_priorities_and_deadlines,
    test_merge_patch,
    test_admin_consistency,
    test_fallback,
    test_audit,
    test_tree_store,
    test_status_tree,
)
SUPPORTED = {"redis", "client"}
# the tenants of a tree each of these tests leaves behind: some child's parent sits on
# another master (an ancestor's budget, the tree's compare-and-set, the audited writes and
# the status tree all cross nodes)
SPREAD: dict[Callable[..., Awaitable[None]], tuple[str, ...]] = {
    test_fallback.test_an_ancestor_budget_refusal_falls_back: ("org", "team"),
    test_audit.test_a_tree_s_writes_are_logged_and_a_refused_one_is_not: ("org", "team"),
    test_tree_store.test_parents_must_exist_and_make_no_cycle: ("org", "team", "dev"),
    test_status_tree.test_the_snapshot_carries_the_tree: tuple(test_status_tree.PARENTS),
    test_status_tree.test_top_draws_the_tree_indented: tuple(test_status_tree.PARENTS),
}


def _cases() -> list[Any]:
    cases = []
    for module in MODULES:
        for name, func in vars(module).items():
            if not name.startswith("test_") or not inspect.iscoroutinefunction(func):
                continue
            params = set(inspect.signature(func).parameters)
            marks = getattr(func, "pytestmark", [])
            if params <= SUPPORTED and params and not marks:
                cases.append(pytest.param(func, id=f"{module.__name__.split('.')[-1]}::{name}"))
    return cases


@pytest.mark.parametrize("test", _cases())
async def test_on_redis_cluster(
    test: Callable[..., Awaitable[None]], cluster_redis: Any, redis_cluster_url: str
) -> None:
    params = inspect.signature(test).parameters
    kwargs: dict[str, Any] = {}
    if "redis" in params:
        kwargs["redis"] = cluster_redis
    if "client" in params:
        app_settings = getattr(sys.modules[test.__module__], "app_settings", None)
        settings = (
            app_settings(redis_cluster_url)
            if app_settings is not None
            else Settings(
                redis_url=redis_cluster_url,
                admin_token="admin-secret",  # type: ignore[arg-type]
                api_max_body_mb=1,
                upstream_url="http://127.0.0.1:9",
            )
        )
        async with TestClient(TestServer(create_app(settings, redis=cluster_redis))) as client:
            kwargs["client"] = client
            await test(**kwargs)
    else:
        await test(**kwargs)
    if test in SPREAD:
        await assert_spans_masters(cluster_redis, SPREAD[test])


async def assert_spans_masters(cluster_redis: Any, tenants: tuple[str, ...]) -> None:
    """The tenants are in the stored tree, and some child's parent is on another master."""
    parents = await TenantStore(cluster_redis).parents()
    assert set(tenants) <= set(parents), parents

    def node(tenant: str) -> str:
        return str(cluster_redis.get_node_from_key(TenantKeys.of("budgeter", tenant).budget).name)

    crossing = [(t, p) for t in tenants if (p := parents[t]) is not None and node(t) != node(p)]
    assert crossing, {t: (parents[t], node(t)) for t in tenants}
    slots = {cluster_redis.keyslot(TenantKeys.of("budgeter", t).budget) for t in tenants}
    assert len(slots) == len(tenants)  # each tenant its own slot
