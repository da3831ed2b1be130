"""Scale-out: jobs/s with 1, 2 and 4 worker processes, against one Redis and against a
three-master Redis Cluster with one replica per master, with the mock upstream — side by
side in one run.

Everything runs on loopback: embedded redis-servers (the cluster made with redis-cli),
`budgeter mock-upstream` and `budgeter worker` processes. Each run submits one batch per
tenant (4 tenants, no limits), times it from submission until every job ended, then
stops the workers. Besides jobs/s it counts, from the servers' own counters (`INFO
stats` of every master, before and after the timed part), the round trips per job
(`total_reads_processed`: one read event per pipeline or lone command a client sends; the
bench's own polling, about 20 a second, included) and the commands per job
(`total_commands_processed`, each script call one command).

    .venv/bin/python bench/bench_scaleout.py [--jobs 2000] [--latency-ms 20] [--workers 1,2,4]
        [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, EmbeddedRedisCluster, free_port
from budgeter.tenants.store import TenantStore

TENANTS = ("t1", "t2", "t3", "t4")


def batch(tenant: str, n: int) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{tenant}-{i}",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"job {i} of {tenant}"}],
                },
            }
        )
        for i in range(n)
    ]


@dataclass
class Run:
    rate: float  # jobs/s
    reads: float  # server read events (round trips) per job, all masters
    commands: float  # commands run per job (those inside Lua included), all masters
    redis_cpu_ms: float  # CPU per job of every redis-server (replicas included)
    worker_cpu_ms: float  # CPU per job of the worker processes


@dataclass
class Counters:
    reads: int
    commands: int
    redis_cpu_s: float
    worker_cpu_s: float

    def per_job(self, later: Counters, jobs: int, seconds: float) -> Run:
        return Run(
            jobs / seconds,
            (later.reads - self.reads) / jobs,
            (later.commands - self.commands) / jobs,
            (later.redis_cpu_s - self.redis_cpu_s) * 1000 / jobs,
            (later.worker_cpu_s - self.worker_cpu_s) * 1000 / jobs,
        )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def counters(servers: Servers, worker_pids: list[int]) -> Counters:
    """The servers' own counters (``INFO stats`` of the masters, ``INFO cpu`` of every
    server) and the workers' CPU time, now."""
    reads = commands = 0
    cpu = 0.0
    for port in servers.all:
        client = Redis(port=port)
        try:
            info = await client.info()
        finally:
            await client.aclose()
        cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        if port in servers.masters:
            reads += int(info["total_reads_processed"])
            commands += int(info["total_commands_processed"])
    return Counters(reads, commands, cpu, sum(process_cpu_s(pid) for pid in worker_pids))


@dataclass
class Servers:
    masters: list[int]  # ports
    all: list[int]


async def one_run(
    url: str, servers: Servers, mock_url: str, workers: int, jobs: int, prefix: str
) -> Run:
    redis = make_redis(url)
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": url,
        "BUDGETER_UPSTREAM_URL": mock_url,
        "BUDGETER_KEY_PREFIX": prefix,
        "BUDGETER_LOG_LEVEL": "ERROR",
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            "worker",
            "--concurrency",
            "32",
            "--metrics-port",
            "0",
            env=env,
        )
        for _ in range(workers)
    ]
    pids = [proc.pid for proc in procs]
    try:
        await asyncio.sleep(2.0)  # let the workers import and connect
        tenants = TenantStore(redis, prefix=prefix)
        store = BatchStore(redis, prefix=prefix)
        for tenant in TENANTS:
            await tenants.put(tenant, TenantPolicy())
        per_tenant = jobs // len(TENANTS)
        bodies = {tenant: batch(tenant, per_tenant) for tenant in TENANTS}
        before = await counters(servers, pids)
        started = time.perf_counter()
        ids = [await store.create(tenant, bodies[tenant]) for tenant in TENANTS]
        for batch_id in ids:  # one status call per poll (Redis is polled: no event to await)
            while True:
                if (await store.status(batch_id)).ended:
                    break
                await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        after = await counters(servers, pids)
        statuses = [await store.status(b) for b in ids]
        done = per_tenant * len(TENANTS)
        assert sum(s.succeeded for s in statuses) == done
        return before.per_job(after, done, elapsed)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()
        await redis.aclose()


async def main(jobs: int, latency_ms: float, counts: list[int], replicas: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        single = EmbeddedRedis(Path(root) / "single", appendonly=False)
        single.start()
        cluster = EmbeddedRedisCluster(Path(root) / "cluster", replicas=replicas)
        cluster_url = cluster.start()
        assert single.port is not None
        ports = [server.port for server in cluster.servers if server.port is not None]
        servers = {
            "one Redis": Servers([single.port], [single.port]),
            "3-master cluster": Servers(cluster.master_ports(), ports),
        }
        mock_port = free_port()
        mock = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            "mock-upstream",
            "--port",
            str(mock_port),
            "--latency-ms",
            str(latency_ms),
        )
        await asyncio.sleep(1.5)
        results: dict[tuple[str, int], Run] = {}
        try:
            for workers in counts:
                for name, url in (("one Redis", single.url), ("3-master cluster", cluster_url)):
                    run = await one_run(
                        url,
                        servers[name],
                        f"http://127.0.0.1:{mock_port}",
                        workers,
                        jobs,
                        f"bench{workers}{name[0]}",
                    )
                    results[(name, workers)] = run
                    print(
                        f"{name:18} {workers} worker(s): {run.rate:8.1f} jobs/s; per job "
                        f"{run.reads:5.2f} round trips, {run.commands:5.2f} commands, CPU "
                        f"{run.redis_cpu_ms:.2f} ms Redis, {run.worker_cpu_ms:.2f} ms workers",
                        flush=True,
                    )
        finally:
            mock.send_signal(signal.SIGTERM)
            await mock.wait()
            single.stop()
            cluster.stop()
    print()
    print(
        f"{jobs} jobs over {len(TENANTS)} tenants, mock latency {latency_ms:g} ms, "
        f"32 coroutines per worker, {os.cpu_count()} cores, cluster: 3 masters x "
        f"{replicas} replica(s)"
    )
    print("per job: round trips = read events of the masters; CPU ms of Redis and workers")
    print(
        f"{'workers':>8} {'jobs/s one':>10} {'cluster':>8} {'ratio':>6}"
        f" {'trips one':>10} {'cluster':>8} {'Redis CPU one':>14} {'cluster':>8}"
        f" {'worker CPU one':>15} {'cluster':>8}"
    )
    for workers in counts:
        one, clu = results[("one Redis", workers)], results[("3-master cluster", workers)]
        print(
            f"{workers:>8} {one.rate:>10.1f} {clu.rate:>8.1f} {clu.rate / one.rate:>6.2f}"
            f" {one.reads:>10.2f} {clu.reads:>8.2f} {one.redis_cpu_ms:>14.2f}"
            f" {clu.redis_cpu_ms:>8.2f} {one.worker_cpu_ms:>15.2f} {clu.worker_cpu_ms:>8.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per cluster master")
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    asyncio.run(main(args.jobs, args.latency_ms, counts, args.replicas))
