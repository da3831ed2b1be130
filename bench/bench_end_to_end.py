"""Row 2 — end to end: jobs/s through queue → count_tokens → admit → /messages → settle
with a real ``budgeter worker`` process, next to a plain aiohttp client that calls
count_tokens and /messages of the same mock directly, at the same concurrency.

The mock answers at once. The worker stays up for the whole row and the two pipelines
alternate round by round (direct, worker, direct, worker, ...), so both see the same
machine. The worker's count_tokens cache misses (every prompt is new), as the direct
client does one count_tokens per job.

    .venv/bin/python bench/bench_end_to_end.py [--quick] [--concurrency 64]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from common import (
    CpuMeter,
    Options,
    RedisMonitor,
    Row,
    base_env,
    client_addrs,
    procs,
    profile_path,
    redis_pid,
    redis_server,
    run_standalone,
    start_mock,
    start_worker,
)

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.tenants.store import TenantStore

POLICY = TenantPolicy.model_validate(
    {"budgets": {"day": 10**15}, "rate": {"rpm": 10**9, "itpm": 10**12, "otpm": 10**12}}
)


def params(tag: str, i: int) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"end-to-end job {tag}-{i}: say hello"}],
    }


async def direct_round(mock_url: str, tag: str, jobs: int, concurrency: int) -> tuple[float, int]:
    """count_tokens then /messages per job, ``concurrency`` coroutines, one session."""
    headers = {"x-api-key": "bench-upstream", "anthropic-version": "2023-06-01"}
    todo = iter(range(jobs))
    done = 0
    async with aiohttp.ClientSession() as http:

        async def lane() -> None:
            nonlocal done
            for i in todo:
                body = params(tag, i)
                count = {k: v for k, v in body.items() if k != "max_tokens"}
                async with http.post(
                    f"{mock_url}/v1/messages/count_tokens", json=count, headers=headers
                ) as r:
                    assert "input_tokens" in await r.json()
                async with http.post(f"{mock_url}/v1/messages", json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    await r.json()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return time.perf_counter() - started, done


async def worker_round(store: BatchStore, tag: str, jobs: int) -> tuple[float, int]:
    requests = [
        BatchRequest.model_validate({"custom_id": f"j{i}", "params": params(tag, i)})
        for i in range(jobs)
    ]
    batch_id = await store.create("bench", requests)
    started = time.perf_counter()  # the jobs are visible to the worker from here
    while True:
        status = await store.status(batch_id)
        if status.ended:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    if status.succeeded != jobs:
        raise RuntimeError(f"worker round {tag}: {status}")
    return elapsed, status.succeeded


async def count_round(url: str, port: int, jobs: int) -> tuple[float, float, str]:
    """Redis commands per job sent by the worker (MONITOR; the bench's own excluded)."""
    own = make_redis(url)
    try:
        await own.client_setname("bench-own")
        async with RedisMonitor(port) as monitor:
            await worker_round(BatchStore(own), "count", jobs)
            exclude = await client_addrs(own, "bench-own")
        return monitor.per_job(jobs, exclude)
    finally:
        await own.aclose()


async def run(opts: Options) -> list[Row]:
    concurrency = int(opts.extra.get("concurrency", 64))
    rounds, jobs = (2, 500) if opts.quick else (3, 1000)
    async with redis_server("e2e") as (server, redis):
        await TenantStore(redis).put("bench", POLICY)
        store = BatchStore(redis)
        with procs() as started:
            env = base_env(server.url)
            mock, mock_url = await start_mock(0, env)
            started.append(mock)
            worker, _ = await start_worker(base_env(server.url, mock_url), concurrency)
            started.append(worker)
            # warm-up both paths (connections, imports, scripts)
            await direct_round(mock_url, "warm", 200, concurrency)
            await worker_round(store, "warm", 200)
            d_s = d_n = w_s = w_n = 0.0
            meters = {}
            redis_proc = redis_pid(server)
            out = profile_path(opts, "end_to_end-worker")
            if out is not None:
                worker.start_profile(out)
            for r in range(rounds):
                with CpuMeter({"mock": mock, "redis": redis_proc}) as meter:
                    s, n = await direct_round(mock_url, f"d{r}", jobs, concurrency)
                meters.setdefault("direct", (meter, n))
                d_s, d_n = d_s + s, d_n + n
                with CpuMeter({"worker": worker, "mock": mock, "redis": redis_proc}) as meter:
                    s, n = await worker_round(store, f"w{r}", jobs)
                meters.setdefault("worker", (meter, n))
                w_s, w_n = w_s + s, w_n + n
            worker.stop_profile()
            calls, lua_calls, top = await count_round(server.url, int(server.port or 0), 200)
            errors = worker.log_count("Traceback")
    direct_rate, worker_rate = d_n / d_s, w_n / w_s
    cpu = {k: m.per_job_ms(n) for k, (m, n) in meters.items()}
    return [
        Row(
            "end_to_end",
            f"jobs/s, 1 worker process x {concurrency}, mock answers at once",
            worker_rate,
            "jobs/s",
            direct_rate,
            f"aiohttp client → mock direct, {concurrency} coroutines",
            worker_rate / direct_rate,
            "≥ 0.8x direct",
            worker_rate / direct_rate >= 0.8,
            note=(
                f"{rounds} alternating rounds of {jobs} jobs. CPU ms/job — worker path: "
                f"{cpu['worker']}; direct path: {cpu['direct']} (bench = the direct client). "
                f"Redis commands sent per job by the worker: {calls:.1f} ({top}); "
                f"{lua_calls:.1f} more run inside Lua"
                + (f"; {errors} tracebacks in the worker log" if errors else "")
            ),
        )
    ]


if __name__ == "__main__":
    run_standalone(run, concurrency=int)
