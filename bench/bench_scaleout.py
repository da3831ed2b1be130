"""Scale-out: jobs/s with 1, 2 and 4 worker processes, against one Redis and against a
three-master Redis Cluster, with the mock upstream — side by side in one run.

Everything runs on loopback: embedded redis-servers (the cluster made with redis-cli),
`budgeter mock-upstream` and `budgeter worker` processes. Each run submits one batch per
tenant (4 tenants, no limits), times it from submission until every job ended, then
stops the workers.

    .venv/bin/python bench/bench_scaleout.py [--jobs 2000] [--latency-ms 20] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

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


async def one_run(url: str, mock_url: str, workers: int, jobs: int, prefix: str) -> float:
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
    try:
        await asyncio.sleep(2.0)  # let the workers import and connect
        tenants = TenantStore(redis, prefix=prefix)
        store = BatchStore(redis, prefix=prefix)
        for tenant in TENANTS:
            await tenants.put(tenant, TenantPolicy())
        per_tenant = jobs // len(TENANTS)
        bodies = {tenant: batch(tenant, per_tenant) for tenant in TENANTS}
        started = time.perf_counter()
        ids = [await store.create(tenant, bodies[tenant]) for tenant in TENANTS]
        while True:
            statuses = [await store.status(b) for b in ids]
            if all(s.ended for s in statuses):
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        assert sum(s.succeeded for s in statuses) == per_tenant * len(TENANTS)
        return per_tenant * len(TENANTS) / elapsed
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()
        await redis.aclose()


async def main(jobs: int, latency_ms: float, counts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as root:
        single = EmbeddedRedis(Path(root) / "single", appendonly=False)
        single.start()
        cluster = EmbeddedRedisCluster(Path(root) / "cluster")
        cluster_url = cluster.start()
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
        results: dict[tuple[str, int], float] = {}
        try:
            for workers in counts:
                for name, url in (("one Redis", single.url), ("3-master cluster", cluster_url)):
                    rate = await one_run(
                        url,
                        f"http://127.0.0.1:{mock_port}",
                        workers,
                        jobs,
                        f"bench{workers}{name[0]}",
                    )
                    results[(name, workers)] = rate
                    print(f"{name:18} {workers} worker(s): {rate:8.1f} jobs/s", flush=True)
        finally:
            mock.send_signal(signal.SIGTERM)
            await mock.wait()
            single.stop()
            cluster.stop()
    print()
    print(
        f"{jobs} jobs over {len(TENANTS)} tenants, mock latency {latency_ms:g} ms, "
        f"32 coroutines per worker, {os.cpu_count()} cores"
    )
    print(f"{'workers':>8} {'one Redis':>12} {'cluster':>12} {'cluster/one':>12}")
    for workers in counts:
        one, clu = results[("one Redis", workers)], results[("3-master cluster", workers)]
        print(f"{workers:>8} {one:>12.1f} {clu:>12.1f} {clu / one:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.latency_ms, [int(x) for x in args.workers.split(",")]))
