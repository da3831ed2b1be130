"""Reconciliation (issue 18, item 3): after a run against a real Redis and the mock upstream
with faults (429/500/529 a third of the time), plain and streamed calls, streams the client
cuts short, reservations reaped (charged in full when sent, released when not) and released
refusals, the ledger's sum equals the usage counters per tenant and model, to the token,
and the entries the upstream answered equal what the mock served."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.ledger.read import LedgerFilter, iter_entries
from budgeter.store.keys import TenantKeys
from tests.api.test_proxy import Proxy, ask, proxy  # noqa: F401 -- the fixture

KINDS = ("input", "output", "cache_creation", "cache_read")
TENANTS = ("rec-a", "rec-b")


async def _call(proxy: Proxy, key: str, n: int, *, stream: bool, cut: bool) -> None:  # noqa: F811
    body = {**ask(n, max_tokens=40 + n % 50), "stream": stream}
    headers = {"x-api-key": key, "budgeter-tags": f"run=r{n % 3}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy.url}/v1/messages", json=body, headers=headers) as r,
    ):
        if cut and r.status == 200:
            await r.content.readany()  # the first bytes, then the client goes away
            return
        await r.read()


async def ledger_sums(redis: Redis, tenant: str) -> tuple[Counter[tuple[str, str]], Counter[str]]:
    sums: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[str] = Counter()
    async for e in iter_entries(redis, TenantKeys("budgeter", tenant), LedgerFilter(), page=50):
        for kind in KINDS:
            sums[(e.model, kind)] += getattr(e, kind)
        sums[(e.model, "requests")] += e.outcome != "released"
        outcomes[e.outcome] += 1
    return sums, outcomes


async def counter_sums(redis: Redis, tenant: str) -> Counter[tuple[str, str]]:
    sums: Counter[tuple[str, str]] = Counter()
    for field, value in (await redis.hgetall(TenantKeys("budgeter", tenant).usage)).items():
        per, _, rest = str(field).partition(":")
        if per != "total":
            continue
        _pid, _, model_kind = rest.partition(":")
        model, _, kind = model_kind.rpartition(":")
        if kind in (*KINDS, "requests"):
            sums[(model, kind)] += int(value)
    return sums


async def test_ledger_equals_counters_equals_what_the_mock_served(
    proxy: Proxy,  # noqa: F811
    redis: Redis,
) -> None:
    keys = {t: await proxy.tenant(t, {"budgets": {"day": 10_000_000}}) for t in TENANTS}
    rng = random.Random(18)
    async with aiohttp.ClientSession() as http:  # clean calls first: what the mock served
        await http.post(f"{proxy.upstream_url}/mock/config", json={"latency_ms": 5})
    clean = [_call(proxy, keys[TENANTS[n % 2]], n, stream=n % 3 == 0, cut=False) for n in range(24)]
    await asyncio.gather(*clean)
    await proxy.settled()
    served = await proxy.mock_stats()
    clean_sums = {t: await ledger_sums(redis, t) for t in TENANTS}
    ledger_in = sum(s[(m, "input")] for s, _ in clean_sums.values() for m in {m for m, _ in s})
    ledger_out = sum(s[(m, "output")] for s, _ in clean_sums.values() for m in {m for m, _ in s})
    assert (ledger_in, ledger_out) == (served["input_tokens"], served["output_tokens"])
    assert all(o == Counter(settled=12) for _, o in clean_sums.values())

    # then faults, streams cut short, reaps and releases
    async with aiohttp.ClientSession() as http:
        chaos: dict[str, Any] = {"latency_ms": 5, "fault_rate": 0.33, "retry_after_s": 0}
        await http.post(f"{proxy.upstream_url}/mock/config", json=chaos)
    calls = []
    for n in range(100, 160):
        stream, cut = rng.random() < 0.5, rng.random() < 0.3
        calls.append(_call(proxy, keys[rng.choice(TENANTS)], n, stream=stream, cut=cut))
    await asyncio.gather(*calls)
    await proxy.settled()
    adm = Admission(redis)
    for n, tenant in enumerate(TENANTS * 4):
        rid = f"reaped{n}"
        d = await adm.reserve(tenant, rid, 100 + n, 30, model="claude-haiku-4-5", hold_ms=1)
        assert d.kind == "ADMIT"
        if n % 2:
            assert await adm.mark_sent(tenant, rid)
    await asyncio.sleep(0.01)
    for tenant in TENANTS:
        await adm.reap(tenant)
        assert not await redis.hlen(TenantKeys("budgeter", tenant).resv)
    outcomes: Counter[str] = Counter()
    for tenant in TENANTS:
        sums, seen = await ledger_sums(redis, tenant)
        counters = await counter_sums(redis, tenant)
        assert +sums == +counters, tenant  # per model and kind, to the token
        outcomes += seen
    assert outcomes["charged_full"] >= 4 and outcomes["released"] >= 4
    assert sum(outcomes.values()) == 24 + 60 + 8


async def test_batch_jobs_write_their_source_and_the_batch_tags_under_faults(
    redis: Redis,
) -> None:
    from budgeter.domain.passthrough import Passthrough
    from budgeter.domain.policy import TenantPolicy
    from budgeter.queue.batches import BatchStore
    from budgeter.tenants.store import TenantStore
    from budgeter.upstream.mock import MockConfig
    from tests.helpers import requests_for, wait_ended
    from tests.worker.test_worker import running_worker

    await TenantStore(redis).put("jobs", TenantPolicy(budgets={"day": 10_000_000}))
    store = BatchStore(redis)
    faults = MockConfig(fault_rate=0.3, retry_after_s=0, seed=18)
    async with running_worker(redis, faults) as (_worker, url):
        tagged = Passthrough(tags=(("team", "batchy"),))
        ids = [
            await store.create("jobs", requests_for("jobs", 20), passthrough=tagged),
            await store.create("jobs", requests_for("jobs", 10)),
        ]
        await wait_ended(store, ids)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as r:
            served = await r.json()
    entries = [e async for e in iter_entries(redis, TenantKeys("budgeter", "jobs"), LedgerFilter())]
    by_batch = Counter(e.source.partition("/")[0] for e in entries if e.outcome == "settled")
    assert by_batch == {f"batch:{ids[0]}": 20, f"batch:{ids[1]}": 10}
    assert {e.tags.get("team") for e in entries if e.source.startswith(f"batch:{ids[0]}/")} == {
        "batchy"
    }
    assert all(not e.tags for e in entries if e.source.startswith(f"batch:{ids[1]}/"))
    sums, _ = await ledger_sums(redis, "jobs")
    assert +sums == +(await counter_sums(redis, "jobs"))
    answered = [e for e in entries if e.outcome == "settled"]
    assert sum(e.input for e in answered) == served["input_tokens"]
    assert sum(e.output for e in answered) == served["output_tokens"]
