"""The core engine's and the Batches API's integration tests, run again against a real
three-master Redis Cluster (started by the suite on loopback ports).

Every test of these modules that needs only ``redis`` (and ``client``, the API built on
it) is collected here and run with a RedisCluster client instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from budgeter.api.app import create_app
from budgeter.settings import Settings
from tests.admission import test_admission
from tests.api import test_admin_consistency
from tests.api import test_app as test_api_http
from tests.domain import test_policy as test_policy_depth
from tests.queue import test_job_layout, test_jobqueue, test_priorities_and_deadlines
from tests.store import test_hash_slots
from tests.system import test_review_fixes
from tests.tenants import test_merge_patch
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
)
SUPPORTED = {"redis", "client"}


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
        settings = Settings(
            redis_url=redis_cluster_url,
            admin_token="admin-secret",  # type: ignore[arg-type]
            api_max_body_mb=1,
            upstream_url="http://127.0.0.1:9",
        )
        async with TestClient(TestServer(create_app(settings, redis=cluster_redis))) as client:
            kwargs["client"] = client
            await test(**kwargs)
        return
    await test(**kwargs)
