"""Chaos (issue 7): 5,000 jobs through real processes while workers are SIGKILLed, Redis
restarts and the upstream fails 20 % of the time; afterwards every invariant is checked.

Everything runs on loopback and is started here: an AOF ``redis-server`` (fsync always),
``budgeter mock-upstream`` (429 with retry-after, 500, 529 and answers slower than the
upstream timeout), ``budgeter api`` (scraped for the durable job counters) and four
``budgeter worker`` processes, one of which is SIGKILLed and replaced every couple of
seconds, round robin. Redis is stopped and restarted once mid-run on the same port.

Nothing here waits on speed: the timeouts are generous upper bounds, and what must
happen (refusals, cancellations) is forced by budgets and rate windows, not by timing.
The figures of the run go to ``test-artifacts/chaos.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError

from budgeter.admission.admission import Admission
from budgeter.domain.jobs import TERMINAL_STATES
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.results import BUDGET_ERROR_TYPE
from budgeter.metrics import Metrics, refresh_state_metrics
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.mock import STATE_KEY
from budgeter.upstream.token_counter import TokenCounter
from budgeter.worker.worker import Worker, WorkerConfig
from tests.helpers import listen_args, mock_upstream, read_port, requests_for
from tests.ledger.test_reconcile import counter_sums, ledger_sums

WORKERS = 4
CONCURRENCY = 16
KILL_EVERY_S = 4.0
# each fresh worker costs ~1.5 s of CPU to start, on 2 shared cores: a slow run must not
# spiral into ever more kills
MAX_KILLS = 30
FAULT_KINDS = ["429", "500", "529", "slow"]
BIG = 10**9
TIGHT_BUDGET = 30_000
# a parent whose budget is smaller than the sum of its children's: tight (30,000) and gamma
# (unbounded) together want about 80,000 tokens; the organisation refuses what it cannot hold
ORG = "org"
ORG_BUDGET = 50_000
POLICIES = {
    ORG: TenantPolicy(budgets={"total": ORG_BUDGET}),
    "alpha": TenantPolicy(weight=2, budgets={"total": BIG}),
    "beta": TenantPolicy(budgets={"total": BIG, "month": BIG}, rate={"rpm": 1200}),
    # demand (900 jobs of ~100 actual tokens) is three times the budget: refusals
    "tight": TenantPolicy(parent=ORG, budgets={"total": TIGHT_BUDGET}),
    # one request a second after a burst of 60: its batch is still queued when canceled
    "delta": TenantPolicy(budgets={"total": BIG}, rate={"rpm": 60}),
    "gamma": TenantPolicy(parent=ORG, budgets={"total": BIG}),
}
CHILDREN = ("tight", "gamma")
# (tenant, batch name, requests, ttl ms); phase 1 before the Redis restart, 2 after
PHASE1 = [("alpha", "a1", 1000, 0), ("beta", "b1", 700, 0), ("tight", "t1", 500, 0)]
PHASE1 += [("delta", "d-cancel", 400, 0)]
PHASE2 = [("alpha", "a2", 800, 0), ("beta", "b2", 600, 0), ("tight", "t2", 400, 0)]
PHASE2 += [("gamma", "g1", 500, 0), ("gamma", "g-expire", 100, 1)]
TOTAL = sum(n for *_, n, _ in PHASE1 + PHASE2)


# the durable job counters (fast, one Redis) -------------------------------------------


async def _outcomes(redis: Redis, tenant: str) -> dict[str, int]:
    raw = await redis.hgetall(TenantKeys.of("budgeter", tenant).outcomes)
    return {k: int(v) for k, v in raw.items()}


def _samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_durable_job_counters_follow_every_transition(redis: Redis) -> None:
    tenants = TenantStore(redis)
    for tenant in ("acme", "bravo"):
        await tenants.put(tenant, TenantPolicy(budgets={"day": 10_000}))
    store = BatchStore(redis)
    queue = store.queue
    batch_id = await store.create("acme", requests_for("x", 5))
    await store.create("acme", requests_for("x", 6), batch_id=batch_id)  # a retry: 1 new
    assert await _outcomes(redis, "acme") == {"submitted": 6}

    first = (await queue.pick(lease_ms=10_000)).job
    second = (await queue.pick(lease_ms=10_000)).job
    assert first is not None and second is not None
    assert await queue.ack(first, "succeeded", {"type": "succeeded"})
    assert not await queue.ack(first, "errored", {"type": "errored"})  # once only
    assert await queue.ack(second, "expired", {"type": "expired"}, dead=False)
    await store.cancel(batch_id, tenant="acme")  # the 4 still queued
    assert await _outcomes(redis, "acme") == {
        "submitted": 6,
        "succeeded": 1,
        "expired": 1,
        "canceled": 4,
    }
    await store.create("bravo", requests_for("y", 2))

    # cumulative: deleting the batch and the tenant takes nothing back, and the API still
    # exports the deleted tenant; past the label cap, tenants are summed into `other`
    await store.delete(batch_id, tenant="acme")
    await tenants.delete("acme")
    assert (await _outcomes(redis, "acme"))["submitted"] == 6
    metrics = Metrics(max_tenants=1)
    await refresh_state_metrics(redis, metrics, await tenants.list_ids())
    submitted = _samples(metrics, "budgeter_jobs_submitted_durable_total")
    assert submitted == {(("tenant", "bravo"),): 2.0, (("tenant", "other"),): 6.0}
    terminal = _samples(metrics, "budgeter_jobs_terminal_durable_total")
    assert terminal[(("outcome", "canceled"), ("tenant", "other"))] == 4.0
    assert terminal[(("outcome", "succeeded"), ("tenant", "bravo"))] == 0.0
    assert sum(v for k, v in terminal.items() if ("tenant", "other") in k) == 6.0


# found by the chaos run: a reservation reaped before the upstream call ----------------


async def test_mark_sent_refuses_a_reservation_that_was_reaped(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy(budgets={"day": 10_000}))
    admission = Admission(redis)
    decision = await admission.reserve("acme", "r1", 10, 10, hold_ms=1000)
    assert decision.kind == "ADMIT"
    assert await admission.mark_sent("acme", "r1")
    await admission.charge_full("acme", "r1")
    assert not await admission.mark_sent("acme", "r1")  # settled: gone
    decision = await admission.reserve("acme", "r2", 10, 10, hold_ms=1000)
    reaped = await admission.reap("acme", now_ms=decision.now_ms + 5000)
    assert reaped.released == 1
    assert not await admission.mark_sent("acme", "r2")  # released by the reaper
    keys = TenantKeys.of("budgeter", "acme")
    assert await redis.hlen(keys.resv_sent) == 0  # no mark outlives its reservation


async def test_a_reservation_reaped_while_its_worker_stalls_is_charged_in_full(
    redis: Redis,
) -> None:
    """A worker stalled between reserve and send (Redis away, CPU starved) has its
    reservation reaped. The worker marks a reservation sent in the reserve call itself, so
    the reaper charges it in full rather than releasing it: whatever the upstream then
    serves is covered by a charge, never free (before, the reaper released it and the
    upstream served tokens no budget was charged for), and no resv_sent mark leaks."""
    await TenantStore(redis).put("acme", TenantPolicy(budgets={"day": 10_000}))
    store = BatchStore(redis)
    batch_id = await store.create("acme", requests_for("x", 1, max_tokens=64))
    job = (await store.queue.pick(lease_ms=60_000)).job
    assert job is not None
    async with mock_upstream() as (url, app), aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, url, "test-key")
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(),
            metrics=Metrics(),
            counter=TokenCounter(redis, upstream, ttl_s=0),
        )
        reserve = worker.admission.reserve
        reaped = []

        async def reserve_then_stall(tenant: str, rid: str, *args: Any, **kw: Any) -> Any:
            decision = await reserve(tenant, rid, *args, **kw)
            reaped.append(await worker.admission.reap(tenant, now_ms=decision.now_ms + 10**8))
            return decision

        worker.admission.reserve = reserve_then_stall  # type: ignore[method-assign]
        await worker._handle(job)
        stats = app[STATE_KEY].stats
        served = stats.input_tokens + stats.output_tokens
    assert [(r.charged_full, r.released) for r in reaped] == [(1, 0)]
    keys = TenantKeys.of("budgeter", "acme")
    assert await redis.hlen(keys.resv_sent) == 0 and await redis.hlen(keys.resv) == 0
    report = await tenant_usage(redis, "acme", now_ms=int(time.time() * 1000))
    assert report is not None
    [(used, reserved)] = [(b.used, b.reserved) for b in report.budgets]
    assert reserved == 0 and used >= served > 0  # charged in full: at least what was served
    assert (await store.status(batch_id)).succeeded == 1


# the chaos run --------------------------------------------------------------------------


class Procs:
    """The processes of the run, their logs, and the figures of the killed workers."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.alive: dict[str, asyncio.subprocess.Process] = {}
        self.killed: list[asyncio.subprocess.Process] = []
        self.worker_ports: dict[str, int] = {}
        self.reaped = 0.0  # budgeter_reaped_reservations_total of workers gone
        self.spawned = 0

    async def spawn(self, name: str, *args: str) -> int:
        """Start ``budgeter ARGS`` on port 0; returns the port it bound, once it listens."""
        port_file = self.logs / f"{name}.port"
        port_file.unlink(missing_ok=True)  # a replaced worker's
        with (self.logs / f"{name}.log").open("ab") as log:
            self.alive[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "budgeter",
                *args,
                *listen_args(port_file),
                env=self.env,
                stdout=log,
                stderr=log,
            )
        return await read_port(port_file, self.alive[name])

    async def spawn_worker(self, slot: int) -> None:
        self.spawned += 1
        name = f"worker{slot}"
        self.worker_ports[name] = await self.spawn(
            name, "worker", "--concurrency", str(CONCURRENCY)
        )

    async def worker_reaped(self, http: aiohttp.ClientSession, name: str) -> float:
        url = f"http://127.0.0.1:{self.worker_ports[name]}/metrics"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return _metric_sum(await resp.text(), "budgeter_reaped_reservations_total")
        return 0.0

    async def until_up(self, http: aiohttp.ClientSession, name: str) -> None:
        """A fresh worker has started (it serves /healthz once it runs)."""
        url = f"http://127.0.0.1:{self.worker_ports[name]}/healthz"
        async with asyncio.timeout(60):
            while True:
                proc = self.alive[name]
                assert proc.returncode is None, f"{name} died on its own:\n{self.tail(name)}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)

    async def kill_and_replace(self, http: aiohttp.ClientSession, slot: int) -> None:
        name = f"worker{slot}"
        proc = self.alive[name]
        await self.until_up(http, name)  # a worker killed while still importing tests nothing
        self.reaped += await self.worker_reaped(http, name)  # its counters die with it
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
        self.killed.append(proc)
        await self.spawn_worker(slot)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _until_http_ok(http: aiohttp.ClientSession, url: str, procs: Procs) -> None:
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            for name, proc in procs.alive.items():
                assert proc.returncode is None, f"{name} exited:\n{procs.tail(name)}"
            await asyncio.sleep(0.1)


async def _terminal_count(store: BatchStore, batches: dict[str, str]) -> int:
    done = 0
    for batch_id in batches:
        status = await store.status(batch_id)
        done += status.total - status.processing
    return done


@pytest.mark.timeout(400)
async def test_chaos_kills_restarts_and_faults_lose_nothing(
    tmp_path: Path, artifacts_dir: Path
) -> None:
    started = time.monotonic()
    server = EmbeddedRedis(tmp_path / "redis", extra_args=["--appendfsync", "always"])
    assert server.appendonly, "the restart must not lose a write: AOF on"
    server.start()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": server.url,
        "BUDGETER_LEASE_SECONDS": "2",
        "BUDGETER_RESERVATION_GRACE_SECONDS": "1",
        "BUDGETER_MAINTENANCE_SECONDS": "0.5",
        "BUDGETER_MAX_ATTEMPTS": "20",
        "BUDGETER_UPSTREAM_TIMEOUT_SECONDS": "1",
        "BUDGETER_UPSTREAM_MAX_ATTEMPTS": "5",
        "BUDGETER_DRAIN_SECONDS": "5",
        "BUDGETER_LOG_LEVEL": "ERROR",
    }
    procs = Procs(logs, env)
    redis = make_redis(server.url)
    store = BatchStore(redis)
    batches: dict[str, str] = {}  # batch id -> batch name
    names: dict[str, tuple[str, int]] = {}  # batch name -> (tenant, requests)
    kills = 0
    stop_chaos = asyncio.Event()
    chaos_task: asyncio.Task[None] | None = None
    try:
        mock = f"http://127.0.0.1:{await procs.spawn('mock', 'mock-upstream')}"
        env["BUDGETER_UPSTREAM_URL"] = mock  # procs.env: the api's and the workers'
        api_port = await procs.spawn("api", "api")
        for slot in range(WORKERS):
            await procs.spawn_worker(slot)
        async with aiohttp.ClientSession() as http:
            await _until_http_ok(http, f"{mock}/healthz", procs)
            await _until_http_ok(http, f"http://127.0.0.1:{api_port}/readyz", procs)
            fault_config = {
                "latency_ms": 5,
                "fault_rate": 0.2,
                "fault_kinds": FAULT_KINDS,
                "retry_after_s": 0.2,
                "slow_ms": 1500,  # > BUDGETER_UPSTREAM_TIMEOUT_SECONDS: a timeout
                "seed": 7,
            }
            async with http.post(f"{mock}/mock/config", json=fault_config) as resp:
                assert resp.status == 200, await resp.text()
            tenants = TenantStore(redis)
            for tenant, policy in POLICIES.items():
                await tenants.put(tenant, policy)

            async def submit(phase: list[tuple[str, str, int, int]]) -> None:
                for tenant, name, count, ttl_ms in phase:
                    requests = requests_for(name, count, max_tokens=256)
                    kwargs = {"ttl_ms": ttl_ms} if ttl_ms else {}
                    batch_id = await store.create(tenant, requests, **kwargs)
                    batches[batch_id] = name
                    names[name] = (tenant, count)

            async def chaos() -> None:
                nonlocal kills
                slot = 0
                while not stop_chaos.is_set() and kills < MAX_KILLS:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop_chaos.wait(), KILL_EVERY_S)
                    if stop_chaos.is_set():
                        return
                    await procs.kill_and_replace(http, slot)
                    kills += 1
                    slot = (slot + 1) % WORKERS

            async def progress() -> int:
                while True:  # Redis may be away: the client retries, then we do
                    try:
                        return await _terminal_count(store, batches)
                    except RedisError:
                        await asyncio.sleep(0.2)

            async def wait_progress(target: int, *, timeout_s: float) -> None:
                async with asyncio.timeout(timeout_s):
                    while await progress() < target:
                        assert chaos_task is not None
                        assert not chaos_task.done() or chaos_task.exception() is None
                        await asyncio.sleep(0.25)
                    print(f"{target} ended at {time.monotonic() - started:.0f} s, {kills} kills")

            await submit(PHASE1)
            chaos_task = asyncio.create_task(chaos())
            by_name = {name: bid for bid, name in batches.items()}

            # delta's rate window holds its batch back: cancel it once it is under way
            async with asyncio.timeout(120):
                while (await store.status(by_name["d-cancel"])).succeeded < 5:  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
                    await asyncio.sleep(0.05)
            await store.cancel(by_name["d-cancel"], tenant="delta")

            await wait_progress(1500, timeout_s=150)
            restart_at = time.monotonic() - started
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)  # same port, same AOF
            await submit(PHASE2)
            assert len(batches) == len(PHASE1) + len(PHASE2)

            await wait_progress(TOTAL, timeout_s=240)
            stop_chaos.set()
            await chaos_task
            ended_at = time.monotonic() - started

            # let maintenance reap what the killed workers left behind
            async with asyncio.timeout(60):
                while True:
                    left = 0
                    for tenant in POLICIES:
                        keys = TenantKeys.of("budgeter", tenant)
                        left += await redis.hlen(keys.resv) + await redis.zcard(keys.resv_deadline)
                    if not left:
                        break
                    await asyncio.sleep(0.2)

            # 1. every job in exactly one terminal state
            per_tenant: dict[str, Counter[str]] = {t: Counter() for t in POLICIES}
            total = 0
            for batch_id, name in batches.items():
                tenant, count = names[name]
                status = await store.status(batch_id)
                assert status.ended and status.processing == 0, (name, status)
                assert status.total == count, (name, status)
                total += status.total
                for outcome in TERMINAL_STATES:
                    per_tenant[tenant][outcome] += getattr(status, outcome)
            assert total == TOTAL == 5_000
            for tenant in POLICIES:
                keys = TenantKeys.of("budgeter", tenant)
                states = Counter((await redis.hgetall(keys.jstate)).values())
                assert set(states) <= set(TERMINAL_STATES), (tenant, states)
                assert states == +per_tenant[tenant], (tenant, states, per_tenant[tenant])
                assert await redis.llen(keys.queue) == 0
                assert await redis.zcard(keys.leases) == 0

            # 2. exactly one result per request, no duplicate
            refused = by_parent = 0
            for batch_id, name in batches.items():
                tenant, count = names[name]
                lines = [line async for line in store.results(batch_id)]
                ids = [line["custom_id"] for line in lines]
                assert len(ids) == len(set(ids)) == count, name
                assert set(ids) == {f"{name}-{i}" for i in range(count)}, name
                kinds = Counter(line["result"]["type"] for line in lines)
                status = await store.status(batch_id)
                assert kinds == +Counter({o: getattr(status, o) for o in TERMINAL_STATES}), (
                    name,
                    kinds,
                )
                refused += sum(
                    1
                    for line in lines
                    if line["result"]["type"] == "errored"
                    and line["result"]["error"]["error"]["type"] == BUDGET_ERROR_TYPE
                )
                by_parent += sum(
                    1
                    for line in lines
                    if line["result"]["type"] == "errored"
                    and "parent tenant 'org'" in line["result"]["error"]["error"]["message"]
                )
            assert refused > 0, "tight's demand exceeds its budget: some must be refused"
            assert by_parent > 0, "the children's demand exceeds org's budget: it must refuse"
            assert per_tenant["delta"]["canceled"] > 0
            assert per_tenant["gamma"]["expired"] > 0

            # 3. no budget exceeded; 4. every reservation settled or reaped
            now_ms = int(time.time() * 1000)
            recorded = 0
            totals: dict[str, int] = {}
            for tenant in POLICIES:
                keys = TenantKeys.of("budgeter", tenant)
                assert await redis.hlen(keys.resv) == 0, tenant
                assert await redis.zcard(keys.resv_deadline) == 0, tenant
                assert await redis.hlen(keys.resv_sent) == 0, tenant
                report = await tenant_usage(redis, tenant, now_ms=now_ms)
                assert report is not None
                assert report.inflight == 0
                for row in report.budgets:
                    assert row.used <= row.limit, (tenant, row)
                    assert row.reserved == 0, (tenant, row)
                [total_row] = [r for r in report.budgets if r.period == "total"]
                usage_rows = [r for r in report.usage if r.period == "total"]
                kinds = ("input", "output", "cache_creation", "cache_read")
                assert total_row.used == sum(r.amount(k) or 0 for r in usage_rows for k in kinds)
                totals[tenant] = total_row.used
                if tenant != ORG:  # its usage is its children's, counted with theirs
                    recorded += total_row.used
            # the ledger (issue 18), written in the settle's own Lua call, equals the usage
            # counters per tenant, model and kind to the token, though workers died mid-run
            # and their reservations were reaped
            ledger_entries = 0
            for tenant in POLICIES:
                if tenant == ORG:  # an ancestor keeps counters, the ledger is its children's
                    continue
                sums, seen = await ledger_sums(redis, tenant)
                assert +sums == +(await counter_sums(redis, tenant)), tenant
                ledger_entries += sum(seen.values())
            assert ledger_entries > 0
            stats = await _get_json(http, f"{mock}/mock/stats")
            served = stats["input_tokens"] + stats["output_tokens"]
            # what the upstream really served is never more than what was charged
            assert served <= recorded, (served, recorded)
            # the organisation held its budget; its counter is its children's charges (a
            # worker killed between the scopes of one settle leaves a reservation that the
            # scopes' reapers charge in full, so the two may differ by such reservations)
            org_used, children_used = totals[ORG], sum(totals[c] for c in CHILDREN)
            assert 0 < org_used <= ORG_BUDGET, org_used

            # 5. submitted == sum of terminal states in the API's metrics, per tenant
            async with http.get(f"http://127.0.0.1:{api_port}/metrics") as resp:
                text = await resp.text()
                assert resp.status == 200, f"{text}\n{procs.tail('api')}"
            submitted = terminal = 0.0
            for tenant in POLICIES:
                sub = _metric_sum(text, "budgeter_jobs_submitted_durable_total", tenant=tenant)
                ends = {
                    o: _metric_sum(
                        text, "budgeter_jobs_terminal_durable_total", tenant=tenant, outcome=o
                    )
                    for o in TERMINAL_STATES
                }
                assert sub == sum(ends.values()) == sum(per_tenant[tenant].values()), tenant
                assert ends == {o: per_tenant[tenant][o] for o in TERMINAL_STATES}, tenant
                submitted += sub
                terminal += sum(ends.values())
            assert submitted == terminal == TOTAL

            # every process still up (but the killed ones), then SIGTERM stops them cleanly
            for name, proc in procs.alive.items():
                assert proc.returncode is None, f"{name} died:\n{procs.tail(name)}"
            assert all(proc.returncode == -signal.SIGKILL for proc in procs.killed)
            for name in list(procs.alive):
                if name.startswith("worker"):
                    await procs.until_up(http, name)  # its signal handlers are installed
                    procs.reaped += await procs.worker_reaped(http, name)
            for proc in procs.alive.values():
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs.alive.items():
                code = await asyncio.wait_for(proc.wait(), 60)
                assert code == 0, f"{name} exited {code} on SIGTERM:\n{procs.tail(name)}"

        outcomes = sum(per_tenant.values(), Counter())
        faults = ", ".join(f"{k}: {v}" for k, v in stats["faults"].items())
        line = (
            f"- chaos run: {TOTAL:,} jobs, {len(POLICIES)} tenants, {len(batches)} batches, "
            f"{WORKERS} workers x {CONCURRENCY}: all terminal after {ended_at:.0f} s "
            f"(whole test {time.monotonic() - started:.0f} s); {kills} workers SIGKILLed and "
            f"replaced; Redis restarted at {restart_at:.0f} s; upstream faults {faults} "
            f"(of {stats['requests']['messages']:,} messages calls); at least "
            f"{procs.reaped:.0f} reservations reaped; outcomes "
            + ", ".join(f"{o} {outcomes[o]:,}" for o in TERMINAL_STATES)
            + f" ({refused} refused by budget, {by_parent} of them by the parent org); tokens "
            f"served {served:,} <= charged {recorded:,}; org's {ORG_BUDGET:,} budget: "
            f"{org_used:,} used, its children's counters {children_used:,}; ledger: "
            f"{ledger_entries:,} entries, equal to the counters per tenant, model and kind.\n"
        )
        print(line)
        (artifacts_dir / "chaos.md").write_text(f"# Chaos test (`tests/test_chaos.py`)\n\n{line}")
    finally:
        stop_chaos.set()
        if chaos_task is not None and not chaos_task.done():
            chaos_task.cancel()
            with contextlib.suppress(BaseException):
                await chaos_task
        for proc in procs.alive.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs.alive.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 30)
        await redis.aclose()
        server.stop()
