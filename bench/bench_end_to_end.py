"""Row 2 — end to end: jobs/s through queue → count_tokens → admit → /messages → settle
with a real ``budgeter worker`` process, next to the direct client (bench/direct_client.py:
count_tokens then /messages of the same mock, nothing else) at the same concurrency.

Both run in their own process on the same event loop (uvloop, which the worker's default
``BUDGETER_EVENT_LOOP=auto`` picks), with the same JSON codec, against the same mock, which
answers at once. Both stay up for the whole row and alternate round by round (direct,
worker, direct, worker, ...), so both see the same machine. The worker's count_tokens
cache misses (every prompt is new), as the direct client does one count_tokens per job.
CPU seconds per job of every process come from /proc (psutil) over the rounds.

    .venv/bin/python bench/bench_end_to_end.py [--quick] [--concurrency 64]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import (
    CpuMeter,
    DirectClient,
    Options,
    RedisMonitor,
    Row,
    base_env,
    client_addrs,
    cpu_wait_s,
    procs,
    profile_digest,
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


async def worker_round(store: BatchStore, tag: str, jobs: int) -> tuple[float, int]:
    requests = [
        BatchRequest.model_validate({"custom_id": f"j{i}", "params": params(tag, i)})
        for i in range(jobs)
    ]
    batch_id = await store.create("bench", requests)
    started = time.time()  # the jobs are visible to the worker from here
    while True:
        status = await store.status(batch_id)
        if status.ended:
            break
        await asyncio.sleep(0.02)  # the batch's end time is its own: no need to poll faster
    ended = status.ended_ms / 1000 if status.ended_ms else time.time()
    elapsed = ended - started
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
    profiled = opts.profile_dir is not None
    async with redis_server("e2e") as (server, redis):
        await TenantStore(redis).put("bench", POLICY)
        store = BatchStore(redis)
        with procs() as started:
            env = base_env(server.url)
            mock, mock_url = await start_mock(0, env)
            started.append(mock)
            worker_env = base_env(server.url, mock_url)
            worker, _ = await start_worker(worker_env, concurrency, profiled=profiled)
            started.append(worker)
            direct = DirectClient("direct", mock_url, env)
            started.append(direct)
            # warm-up both paths (connections, imports, scripts)
            await direct.call("round", tag="warm", jobs=200, concurrency=concurrency)
            await worker_round(store, "warm", 200)
            d_s = d_n = w_s = w_n = d_wait = w_wait = 0.0
            redis_proc = redis_pid(server)
            d_meter = CpuMeter({"direct client": direct, "mock": mock, "redis": redis_proc})
            w_meter = CpuMeter({"worker": worker, "mock": mock, "redis": redis_proc})
            out = profile_path(opts, "end_to_end-worker")
            if out is not None:
                worker.start_profile(out)
            for r in range(rounds):
                wait = cpu_wait_s(direct)
                with d_meter:
                    got = await direct.call(
                        "round", tag=f"d{r}", jobs=jobs, concurrency=concurrency
                    )
                d_s, d_n = d_s + got["elapsed"], d_n + got["done"]
                d_wait += cpu_wait_s(direct) - wait
                wait = cpu_wait_s(worker)
                with w_meter:
                    s, n = await worker_round(store, f"w{r}", jobs)
                w_s, w_n = w_s + s, w_n + n
                w_wait += cpu_wait_s(worker) - wait
            worker.stop_profile()
            digest = profile_digest(worker)
            calls, lua_calls, top = await count_round(server.url, int(server.port or 0), 200)
            errors = worker.log_count("Traceback")
    direct_rate, worker_rate = d_n / d_s, w_n / w_s
    worker_ms = 1000 * w_meter.used["worker"] / w_n
    direct_ms = 1000 * d_meter.used["direct client"] / d_n
    profiled_note = " (worker under pyinstrument: --profile slows it)" if profiled else ""
    return [
        Row(
            "end_to_end",
            f"jobs/s, 1 worker process x {concurrency}, mock answers at once",
            worker_rate,
            "jobs/s",
            direct_rate,
            f"direct client → mock, {concurrency} coroutines, same loop",
            worker_rate / direct_rate,
            "≥ 0.8x direct",
            worker_rate / direct_rate >= 0.8,
            note=(
                f"{rounds} alternating rounds of {jobs} jobs{profiled_note}. CPU ms/job "
                f"(/proc) — worker path: {w_meter.per_job_ms(int(w_n))}; direct path: "
                f"{d_meter.per_job_ms(int(d_n))} (bench = this process, which only submits "
                f"and polls). Redis commands sent per job by the worker: {calls:.1f} ({top}); "
                f"{lua_calls:.1f} more run inside Lua"
                + (f"; {errors} tracebacks in the worker log" if errors else "")
                + (f". {digest}" if digest else "")
            ),
        ),
        Row(
            "end_to_end",
            "worker CPU per job vs direct client CPU per job",
            worker_ms,
            "ms",
            direct_ms,
            "direct client process, same rounds",
            worker_ms / direct_ms,
            "≤ 2x direct",
            worker_ms / direct_ms <= 2,
            note="CPU seconds (user + system, /proc) of the worker process and of the direct "
            "client process over their rounds, divided by the jobs each finished. Runnable but "
            f"waiting for a CPU (/proc/PID/schedstat): worker {1000 * w_wait / w_n:.2f} ms/job "
            f"({100 * w_wait / w_s:.0f}% of its rounds), direct client "
            f"{1000 * d_wait / d_n:.2f} ms/job ({100 * d_wait / d_s:.0f}% of its rounds)",
        ),
    ]


if __name__ == "__main__":
    run_standalone(run, concurrency=int)
