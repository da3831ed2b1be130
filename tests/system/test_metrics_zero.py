"""Every tenant-labelled counter is exported at 0 as soon as a process knows the tenant
(issue 20 item 4), so Prometheus' rate()/increase() see its first increment; the children
are cached per tenant label (item 2), within the label cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from budgeter.api.app import create_app
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import (
    INITIAL_DECISIONS,
    OTHER,
    REAP_ACTIONS,
    TERMINAL_OUTCOMES,
    TOKEN_KINDS,
    Metrics,
)
from budgeter.settings import Settings
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from tests.helpers import mock_upstream, start_budgeter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """The exposition format, read back by prometheus_client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def expected_zeros(tenant: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The samples a known tenant exports at 0 before any event."""
    return [
        *(key("budgeter_jobs_total", tenant=tenant, outcome=o) for o in TERMINAL_OUTCOMES),
        *(
            key("budgeter_admission_decisions_total", tenant=tenant, decision=d, reason=r)
            for d, r in INITIAL_DECISIONS
        ),
        *(key("budgeter_reaped_reservations_total", tenant=tenant, action=a) for a in REAP_ACTIONS),
        key("budgeter_dead_lettered_total", tenant=tenant),
        key("budgeter_count_tokens_estimated_total", tenant=tenant),
        key("budgeter_admission_wait_seconds_count", tenant=tenant),
        key("budgeter_admission_wait_seconds_bucket", tenant=tenant, le="+Inf"),
    ]


def assert_zeros(samples: Samples, tenant: str) -> None:
    missing = [k for k in expected_zeros(tenant) if k not in samples]
    assert not missing, f"not exported for {tenant}: {missing}"
    moved = {k: samples[k] for k in expected_zeros(tenant) if samples[k] != 0}
    assert not moved, moved


def tenant_values(samples: Samples, name: str) -> set[str]:
    return {dict(labels)["tenant"] for n, labels in samples if n == name}


def test_a_fresh_metrics_exports_every_tenant_counter_at_0_for_a_known_tenant() -> None:
    metrics = Metrics()
    before = parse(generate_latest(metrics.registry).decode())
    assert not tenant_values(before, "budgeter_jobs_total")
    # the count_tokens cache results are a fixed enum: there from the start
    for result in ("hit", "miss", "error"):
        assert before[key("budgeter_count_tokens_cache_total", result=result)] == 0

    metrics.know_tenants(["acme"])
    samples = parse(generate_latest(metrics.registry).decode())
    assert_zeros(samples, "acme")

    # an increment moves only its own series
    metrics.for_tenant("acme").dead_lettered.inc()
    metrics.for_tenant("acme").decision("DEFER", "rate:otpm").inc()
    metrics.for_tenant("acme").decision("REJECT", "too_large:budget:day").inc()
    samples = parse(generate_latest(metrics.registry).decode())
    assert samples[key("budgeter_dead_lettered_total", tenant="acme")] == 1
    decided = key(
        "budgeter_admission_decisions_total", tenant="acme", decision="DEFER", reason="rate:otpm"
    )
    assert samples[decided] == 1
    new_reason = key(
        "budgeter_admission_decisions_total",
        tenant="acme",
        decision="REJECT",
        reason="too_large:budget:day",
    )
    assert samples[new_reason] == 1  # a reason outside the initial set appears at first use


def test_tokens_of_a_model_start_at_0_for_every_kind() -> None:
    metrics = Metrics()
    metrics.record_settled(
        "acme",
        "claude-x",
        input_tokens=10,
        output_tokens=5,
        cache_creation=0,
        cache_read=0,
        reserved=30,
    )
    samples = parse(generate_latest(metrics.registry).decode())
    values = {
        kind: samples[key("budgeter_tokens_total", tenant="acme", model="claude-x", kind=kind)]
        for kind in TOKEN_KINDS
    }
    assert values == {"input": 10, "output": 5, "cache_creation": 0, "cache_read": 0}


def test_children_are_cached_per_tenant_label_within_the_cap() -> None:
    metrics = Metrics(max_tenants=2)
    metrics.know_tenants([f"t{i}" for i in range(10)])
    assert metrics.for_tenant("t0") is metrics.for_tenant("t0")
    assert metrics.for_tenant("t5") is metrics.for_tenant("t9")  # both past the cap
    assert metrics.for_tenant("t5").label == OTHER
    a = metrics.for_tenant("t1").decision("ADMIT", "")
    assert a is metrics.for_tenant("t1").decision("ADMIT", "")
    assert set(metrics._series) == {"t0", "t1", OTHER}  # bounded by the label cap
    samples = parse(generate_latest(metrics.registry).decode())
    assert tenant_values(samples, "budgeter_jobs_total") == {"t0", "t1", OTHER}
    assert tenant_values(samples, "budgeter_dead_lettered_total") == {"t0", "t1", OTHER}
    for label in ("t0", "t1", OTHER):
        assert_zeros(samples, label)


async def test_the_api_exports_a_new_tenants_counters_at_0_before_any_request(
    redis: RedisClient, redis_url: str
) -> None:
    settings = Settings(
        redis_url=redis_url, admin_token="admin-secret", upstream_url="http://127.0.0.1:9"
    )
    async with TestClient(TestServer(create_app(settings, redis=redis))) as client:
        resp = await client.put(
            "/admin/tenants/fresh",
            json={"budgets": {"day": 1000}},
            headers={"authorization": "Bearer admin-secret"},
        )
        assert resp.status in (200, 201), await resp.text()
        samples = parse(await (await client.get("/metrics")).text())
    assert_zeros(samples, "fresh")
    # the durable counters too: a tenant with no job yet is at 0, not absent
    assert samples[key("budgeter_jobs_submitted_durable_total", tenant="fresh")] == 0
    for outcome in TERMINAL_OUTCOMES:
        durable = key("budgeter_jobs_terminal_durable_total", tenant="fresh", outcome=outcome)
        assert samples[durable] == 0


async def test_a_worker_exports_a_known_tenants_counters_at_0_before_any_job(
    redis: RedisClient, redis_url: str, tmp_path: Path
) -> None:
    await TenantStore(redis).put("early", TenantPolicy(budgets={"day": 1000}))
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_LOG_LEVEL": "WARNING",
        "BUDGETER_MAINTENANCE_SECONDS": "0.2",
    }
    async with mock_upstream() as (upstream_url, _), aiohttp.ClientSession() as http:
        env["BUDGETER_UPSTREAM_URL"] = upstream_url
        worker, port = await start_budgeter("worker", port_dir=tmp_path, env=env)
        try:
            samples: Samples = {}
            for _ in range(600):  # the first maintenance pass learns the tenant; 60 s at most
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    samples = parse(await resp.text())
                if "early" in tenant_values(samples, "budgeter_dead_lettered_total"):
                    break
                await asyncio.sleep(0.1)
            assert_zeros(samples, "early")
        finally:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), 60) == 0
