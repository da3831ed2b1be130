"""Issue 19 item 5: failover under load with real processes. ``budgeter mock-upstream``,
``budgeter api`` and two ``budgeter worker`` processes run a batch of jobs over four
tenants (one with a budget smaller than its demand) on a highly available Redis made of
real redis-servers on loopback; mid-run the master holding a tenant's slot (or, in another
run, ``{sched}``) is SIGKILLed and a replica is promoted. Nobody restarts a process.

- Sentinel: a master, two replicas, three Sentinels (the master holds every key, so one
  kill covers both the tenant and ``{sched}``); with ``BUDGETER_REDIS_WAIT_REPLICAS`` 1 and 0,
  and with WAIT 1 once more with Sentinels slower to call the master down than the lease
  (a failover that outlasts the leases: jobs served twice, each serve charged).
- Cluster: 3 masters with one replica each and WAIT 0, the master of a tenant's slot, and
  in another run ``{sched}``'s; and 3 masters with two replicas each and WAIT 1 (one
  replica must stay after the kill for a WAIT of one), the master of a tenant's slot.

With WAIT 1 the test asserts: every acknowledged job ends in exactly one terminal state
with one result, every token served charged, no budget served over its limit, every
process still up; requests served twice are measured (charged twice, never zero: see the
note at the assertions). With WAIT 0 the same checks are measured and reported (jobs lost,
served twice, usage tokens not charged, overshoot tokens). The figures and the time from
the kill to the first job stored as served after it go to ``test-artifacts/failover.md``.
Nothing waits on speed: conditions are polled under generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from redis.exceptions import RedisError

from budgeter.domain.jobs import TERMINAL_STATES
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStatus, BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedisCluster
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from tests.helpers import listen_args, read_port, requests_for
from tests.store.sentinel_cluster import SentinelSet

JOBS_PER_TENANT = 500  # 4 tenants: 2,000 jobs a run
TENANTS = ("alpha", "beta", "gamma", "tight")
BIG = 10**9
TIGHT_BUDGET = 16_000  # ~100 tokens a job: demand ~3x the budget, refusals
CONCURRENCY = 16
LEASE_S = 15  # outlasts a promotion (Sentinel ~3 s, cluster ~3 s)
ARTIFACT = "failover.md"
_rows: dict[str, str] = {}
_notes: dict[str, str] = {}  # label -> what the promotion chose (Topology.evidence)


@dataclass
class Topology:
    name: str
    url: str
    kill: Callable[[], None]  # SIGKILL the chosen master
    replicated: Callable[[], None]  # every write so far is on the replicas
    stop: Callable[[], None]
    extra: dict[str, str] = field(default_factory=dict)
    # after the run: what the promotion chose (Sentinel: each replica's replication offset
    # read just after the kill, and the one promoted), for the artifact's notes
    evidence: Callable[[], str] = lambda: ""


def _wait_all_replicas(port: int, replicas: int) -> None:
    with sync_redis.Redis(port=port, socket_timeout=30) as direct:
        direct.wait(replicas, 20_000)


async def _sentinel(root: Path, down_after_ms: int = 1000) -> Topology:
    servers = SentinelSet(root / "sentinel", replicas=2, down_after_ms=down_after_ms)
    await asyncio.to_thread(servers.start)

    offsets: dict[int, int] = {}  # replica port -> its replication offset at the kill

    def kill() -> None:
        servers.kill_master()
        for replica in servers.replicas:  # final: nothing more reaches them
            assert replica.port is not None
            with sync_redis.Redis(port=replica.port, socket_timeout=5) as client:
                offsets[replica.port] = int(client.info("replication")["slave_repl_offset"])

    def replicated() -> None:
        _wait_all_replicas(servers.master_port(), 2)

    def evidence() -> str:
        promoted = servers.master_port()
        others = [o for port, o in offsets.items() if port != promoted]
        behind = max(others, default=0) - offsets.get(promoted, 0)
        return (
            f"promoted the replica at offset {offsets.get(promoted)} "
            f"(the other at {', '.join(map(str, others))}: "
            f"{'behind by ' + str(behind) + ' bytes' if behind > 0 else 'not behind'})"
        )

    return Topology("sentinel", servers.url, kill, replicated, servers.stop, evidence=evidence)


async def _cluster(root: Path, victim_key: str, replicas: int = 1) -> Topology:
    servers = EmbeddedRedisCluster(root / "cluster", replicas=replicas, node_timeout_ms=2000)
    await asyncio.to_thread(servers.start)
    master = servers.master_of(victim_key)
    assert master.port is not None
    port = master.port

    def replicated() -> None:
        _wait_all_replicas(port, replicas)

    return Topology("cluster", servers.url, lambda: servers.kill(master), replicated, servers.stop)


class Procs:
    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.alive: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(self, name: str, *args: str) -> int:
        port_file = self.logs / f"{name}.port"
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

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.alive.items():
            assert proc.returncode is None, f"{name} exited:\n{self.tail(name)}"

    async def stop(self) -> None:
        for proc in self.alive.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.alive.values():
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_ok(http: aiohttp.ClientSession, url: str, procs: Procs) -> None:
    async with asyncio.timeout(90):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            procs.check_alive()
            await asyncio.sleep(0.1)


async def _statuses(store: BatchStore, ids: dict[str, str]) -> dict[str, BatchStatus]:
    while True:  # the master may be away: the client retries, then we do
        try:
            return {t: await store.status(b) for t, b in ids.items()}
        except RedisError:
            await asyncio.sleep(0.1)


async def _succeeded(store: BatchStore, ids: dict[str, str], tenants: tuple[str, ...]) -> int:
    statuses = await _statuses(store, {t: ids[t] for t in tenants})
    return sum(s.succeeded for s in statuses.values())


@contextlib.asynccontextmanager
async def _topology(make: Any) -> AsyncIterator[Topology]:
    topology: Topology = await make
    try:
        yield topology
    finally:
        await asyncio.to_thread(topology.stop)


async def _run(
    tmp_path: Path, artifacts_dir: Path, *, label: str, make: Any, wait: int, watch: tuple[str, ...]
) -> None:
    """One run: ``watch`` names the tenants whose first job served after the kill is
    timed (the victim's, or every tenant when ``{sched}``'s master dies)."""
    started = time.monotonic()
    logs = tmp_path / "logs"
    logs.mkdir()
    async with _topology(make) as topo:
        env = {
            **os.environ,
            "BUDGETER_REDIS_URL": topo.url,
            "BUDGETER_REDIS_WAIT_REPLICAS": str(wait),
            "BUDGETER_LEASE_SECONDS": str(LEASE_S),
            "BUDGETER_RESERVATION_GRACE_SECONDS": "2",
            "BUDGETER_MAINTENANCE_SECONDS": "0.5",
            "BUDGETER_LOG_LEVEL": "ERROR",
        }
        procs = Procs(logs, env)
        redis: Any = make_redis(topo.url)
        try:
            mock = f"http://127.0.0.1:{await procs.spawn('mock', 'mock-upstream')}"
            env["BUDGETER_UPSTREAM_URL"] = mock
            api = await procs.spawn("api", "api")
            for slot in range(2):
                await procs.spawn(f"worker{slot}", "worker", "--concurrency", str(CONCURRENCY))
            async with aiohttp.ClientSession() as http:
                await _until_ok(http, f"{mock}/healthz", procs)
                await _until_ok(http, f"http://127.0.0.1:{api}/readyz", procs)
                async with http.post(f"{mock}/mock/config", json={"latency_ms": 20}) as resp:
                    assert resp.status == 200
                store = BatchStore(redis)
                tenants = TenantStore(redis)
                for tenant in TENANTS:
                    limit = TIGHT_BUDGET if tenant == "tight" else BIG
                    await tenants.put(tenant, TenantPolicy(budgets={"total": limit}))
                ids = {
                    t: await store.create(t, requests_for(t, JOBS_PER_TENANT, max_tokens=256))
                    for t in TENANTS
                }
                await asyncio.to_thread(topo.replicated)  # acknowledged: on the replicas
                total = JOBS_PER_TENANT * len(TENANTS)
                async with asyncio.timeout(120):
                    while sum(s.succeeded for s in (await _statuses(store, ids)).values()) < (
                        total // 5
                    ):
                        procs.check_alive()
                        await asyncio.sleep(0.05)
                before = await _succeeded(store, ids, watch)
                killed_at = time.monotonic()
                await asyncio.to_thread(topo.kill)
                async with asyncio.timeout(120):
                    while await _succeeded(store, ids, watch) <= before:  # noqa: ASYNC110 - a bounded poll of state other processes change
                        await asyncio.sleep(0.05)
                first_served_s = time.monotonic() - killed_at
                ended_in_time = True
                try:
                    async with asyncio.timeout(240):
                        while not all(s.ended for s in (await _statuses(store, ids)).values()):
                            procs.check_alive()
                            await asyncio.sleep(0.2)
                except TimeoutError:
                    if wait:
                        raise
                    ended_in_time = False
                async with asyncio.timeout(60):  # what the reaper still holds
                    while True:
                        left = 0
                        for tenant in TENANTS:
                            keys = TenantKeys.of("budgeter", tenant)
                            left += await redis.hlen(keys.resv)
                        if not left:
                            break
                        await asyncio.sleep(0.2)
                async with http.get(f"{mock}/mock/stats") as resp:
                    stats = await resp.json()
                procs.check_alive()  # nobody restarted, nobody died

                statuses = await _statuses(store, ids)
                not_terminal = sum(s.processing for s in statuses.values())
                missing = duplicate_results = succeeded = 0
                overshoot = recorded = 0
                result_tokens: Counter[str] = Counter()
                for tenant, batch_id in ids.items():
                    status = statuses[tenant]
                    missing += max(0, JOBS_PER_TENANT - status.total)
                    lines = [line async for line in store.results(batch_id)]
                    cids = [line["custom_id"] for line in lines]
                    duplicate_results += len(cids) - len(set(cids))
                    missing += JOBS_PER_TENANT - len(set(cids)) if status.ended else 0
                    kinds = Counter(line["result"]["type"] for line in lines)
                    succeeded += status.succeeded
                    for line in lines:
                        if line["result"]["type"] == "succeeded":
                            usage = line["result"]["message"]["usage"]
                            result_tokens[tenant] += usage["input_tokens"] + usage["output_tokens"]
                    keys = TenantKeys.of("budgeter", tenant)
                    states = Counter((await redis.hgetall(keys.jstate)).values())
                    report = await tenant_usage(redis, tenant, now_ms=int(time.time() * 1000))
                    assert report is not None
                    [row] = [r for r in report.budgets if r.period == "total"]
                    recorded += int(row.used)
                    limit = int(row.limit)
                    overshoot += max(0, int(row.used) - limit, result_tokens[tenant] - limit)
                    if wait:
                        assert status.ended and status.total == JOBS_PER_TENANT, status
                        assert len(cids) == len(set(cids)) == JOBS_PER_TENANT, tenant
                        assert kinds == +Counter(
                            {o: getattr(status, o) for o in TERMINAL_STATES}
                        ), (tenant, kinds)
                        assert set(states) <= set(TERMINAL_STATES), states
                        assert sum(states.values()) == JOBS_PER_TENANT, states
                        assert row.used <= row.limit, row
                        assert result_tokens[tenant] <= row.limit, tenant
                assert statuses["tight"].errored > 0, "tight's demand exceeds its budget"
                served_tokens = stats["input_tokens"] + stats["output_tokens"]
                served_twice = stats["messages_served"] - succeeded
                uncharged = max(0, served_tokens - recorded)
                if wait:
                    assert uncharged == 0, (served_tokens, recorded)
                    assert overshoot == 0
                    assert not_terminal == missing == duplicate_results == 0
                    # Served twice is measured, not asserted: a failover that outlasts
                    # what is left of a job's lease gives the job to another worker, which
                    # serves it again (charged twice, uncharged 0 above), as a partition
                    # longer than the lease does; the slow-failover run below shows it.
                    # One run in about twenty (Sentinel, 2026-12-07, a loaded machine)
                    # served 2 twice (README, "Failover under load").
                promotion = await asyncio.to_thread(topo.evidence)
                if promotion:
                    _notes[label] = (
                        f"{label}: served twice {served_twice}, first served "
                        f"{first_served_s:.1f} s after the kill (lease {LEASE_S} s); {promotion}"
                    )
                    print(_notes[label])  # (pytest -s: a loop of runs can collect them)
        finally:
            await procs.stop()
            await redis.aclose()
    outcome = "asserted zero (served twice: measured)" if wait else "measured"
    _rows[label] = (
        f"| {label} | {wait} | {total:,} | {first_served_s:.1f} | "
        f"{missing + not_terminal} | {duplicate_results} | {served_twice} | {uncharged:,} | "
        f"{overshoot:,} | {'yes' if ended_in_time else 'no'} | {outcome} | "
        f"{time.monotonic() - started:.0f} |"
    )
    _write(artifacts_dir)


def _write(artifacts_dir: Path) -> None:
    head = [
        "# Failover under load (tests/system/test_failover_load.py)",
        "",
        f"{len(TENANTS)} tenants x {JOBS_PER_TENANT} jobs; api + 2 workers x {CONCURRENCY} "
        f"+ budgeter mock-upstream (20 ms), lease {LEASE_S} s; one tenant's budget "
        f"({TIGHT_BUDGET:,} tokens) is a third of its demand. SIGKILL of one master once a "
        "fifth of the jobs succeeded; no process restarted. Time to first served: from the "
        "kill to the first job of the watched tenants stored as succeeded. Lost: jobs "
        "without a terminal state or a result; served twice: upstream calls minus succeeded "
        "jobs; uncharged: tokens the upstream served minus tokens charged; overshoot: tokens "
        "over a limit (charged or in delivered results).",
        "",
        "| run | WAIT | jobs | first served after kill (s) | jobs lost | duplicate results "
        "| served twice | uncharged tokens | overshoot tokens | all ended | checks | run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = ["", "What each promotion chose:", ""] if _notes else []
    notes += [f"- {_notes[k]}" for k in sorted(_notes)]
    text = "\n".join([*head, *(_rows[k] for k in sorted(_rows)), *notes]) + "\n"
    (artifacts_dir / ARTIFACT).write_text(text)


_TENANT_KEY = TenantKeys.of("budgeter", "alpha").queue
_SCHED_KEY = SchedKeys("budgeter").ready


@pytest.mark.timeout(600)
@pytest.mark.parametrize("wait", [1, 0])
async def test_sentinel_master_killed_under_load(
    tmp_path: Path, artifacts_dir: Path, wait: int
) -> None:
    await _run(
        tmp_path,
        artifacts_dir,
        label=f"sentinel, master (tenants and {{sched}}), WAIT {wait}",
        make=_sentinel(tmp_path),
        wait=wait,
        watch=TENANTS,
    )


@pytest.mark.timeout(600)
async def test_a_sentinel_failover_longer_than_the_lease_loses_nothing_and_charges_both_serves(
    tmp_path: Path, artifacts_dir: Path
) -> None:
    """The Sentinels call the master down only after 2 s more than the lease: the leases
    of the jobs in flight at the kill run out before the promotion, so the promoted master
    gives those jobs to other workers and some are served twice (measured on 2026-12-07:
    15 and 8 of 2,000, first served 18.8 s after the kill). Every check of WAIT 1 still
    holds: each job ends once, with one result, every serve charged, no budget over."""
    await _run(
        tmp_path,
        artifacts_dir,
        label="sentinel, failover longer than the lease, WAIT 1",
        make=_sentinel(tmp_path, down_after_ms=LEASE_S * 1000 + 2000),
        wait=1,
        watch=TENANTS,
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("victim", "wait"), [("tenant", 1), ("tenant", 0), ("sched", 0)])
async def test_cluster_master_killed_under_load(
    tmp_path: Path, artifacts_dir: Path, victim: str, wait: int
) -> None:
    key = _TENANT_KEY if victim == "tenant" else _SCHED_KEY
    replicas = 2 if wait else 1  # a WAIT of one needs a replica left after the kill
    await _run(
        tmp_path,
        artifacts_dir,
        label=(
            f"cluster ({replicas} replicas a master), master of "
            f"{'alpha' if victim == 'tenant' else '{sched}'}, WAIT {wait}"
        ),
        make=_cluster(tmp_path, key, replicas),
        wait=wait,
        watch=("alpha",) if victim == "tenant" else TENANTS,
    )
