"""Row 3 — concurrency: one ``budgeter worker --concurrency 2000`` against a mock upstream
that answers after 1 s. Jobs/s over a fixed window (reference: the ideal 2,000 jobs/s)
and the worker's peak RSS (psutil; reference: its RSS when it started).

Side by side in the same run:
- a plain aiohttp client holding the same 2,000 requests in flight against the same mock
  (count_tokens then /messages, unlimited connector): can the mock and machine sustain it?
- diagnostics: the same worker with its aiohttp connection pool unlimited, then with its
  redis-py pool unlimited too (bench/worker_unlimited.py patches the defaults at start:
  aiohttp caps a ClientSession at 100 connections, redis-py a pool at 100 and raises
  MaxConnectionsError past that). Each run uses its own key prefix.

    .venv/bin/python bench/bench_concurrency.py [--quick]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from common import (
    CpuMeter,
    Options,
    Proc,
    Row,
    base_env,
    procs,
    profile_path,
    redis_server,
    run_standalone,
    start_mock,
    start_worker,
)

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.tenants.store import TenantStore

IN_FLIGHT = 2000
LATENCY_MS = 1000
POLICY = TenantPolicy.model_validate({"budgets": {"day": 10**15}, "rate": {"rpm": 10**9}})
BATCH = 5000
WAVE = 100  # connections opened per 0.1 s by the direct client


def params(i: int) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"concurrency job {i}"}],
    }


async def submit(redis: Any, prefix: str, jobs: int) -> list[str]:
    await TenantStore(redis, prefix=prefix).put("bench", POLICY)
    store = BatchStore(redis, prefix=prefix)
    ids = []
    for start in range(0, jobs, BATCH):
        requests = [
            BatchRequest.model_validate({"custom_id": f"j{i}", "params": params(i)})
            for i in range(start, min(jobs, start + BATCH))
        ]
        ids.append(await store.create("bench", requests))
    return ids


async def succeeded(store: BatchStore, ids: list[str]) -> int:
    return sum([(await store.status(b)).succeeded for b in ids])


async def worker_run(
    server_url: str,
    redis: Any,
    mock_url: str,
    prefix: str,
    ramp_s: float,
    window_s: float,
    unlimited: str | None,
    opts: Options,
) -> dict[str, Any]:
    jobs = int(IN_FLIGHT * (ramp_s + window_s) * 1.3)
    ids = await submit(redis, prefix, jobs)
    store = BatchStore(redis, prefix=prefix)
    env = base_env(server_url, mock_url, BUDGETER_KEY_PREFIX=prefix)
    script = None
    if unlimited:
        env["BENCH_UNLIMITED"] = unlimited
        script = "worker_unlimited.py"
    with procs() as started:
        worker, _ = await start_worker(env, IN_FLIGHT, script=script)
        started.append(worker)
        baseline = worker.rss()
        peak = baseline
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, worker.rss())
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        await asyncio.sleep(ramp_s)
        tag = "-unlimited-" + unlimited.replace(",", "-") if unlimited else ""
        out = profile_path(opts, f"concurrency-worker{tag}")
        if out is not None:
            worker.start_profile(out)
        n0, t0, cpu0 = await succeeded(store, ids), time.perf_counter(), worker.cpu_s()
        await asyncio.sleep(window_s)
        n1, t1, cpu1 = await succeeded(store, ids), time.perf_counter(), worker.cpu_s()
        worker.stop_profile()
        stop.set()
        await sampler
        peak = max(peak, worker.rss())
        worker.stop(kill=True)
        log = worker.log_text()
    rate = (n1 - n0) / (t1 - t0)
    return {
        "rate": rate,
        "peak_mb": peak / 2**20,
        "base_mb": baseline / 2**20,
        "cpu_ms": 1000 * (cpu1 - cpu0) / max(n1 - n0, 1),
        "cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "pool_errors": log.count("Too many connections"),
        "tracebacks": log.count("Traceback"),
    }


async def direct_run(mock: Proc, mock_url: str, ramp_s: float, window_s: float) -> dict:
    """2,000 coroutines, each count_tokens then /messages in a loop; jobs/s in the window
    (which starts ``ramp_s`` after the last coroutine started)."""
    headers = {"x-api-key": "bench-upstream", "anthropic-version": "2023-06-01"}
    done = 0
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def lane(k: int) -> None:
            nonlocal done
            i = k
            while not stop.is_set():
                body = params(i)
                count = {"model": body["model"], "messages": body["messages"]}
                async with http.post(
                    f"{mock_url}/v1/messages/count_tokens", json=count, headers=headers
                ) as r:
                    await r.read()
                async with http.post(f"{mock_url}/v1/messages", json=body, headers=headers) as r:
                    await r.read()
                done += 1
                i += IN_FLIGHT

        # connect in waves: the mock listens with aiohttp's default backlog (128), and a
        # burst of 2,000 connects overflows it into SYN retransmits (1 s, 3 s, 7 s ...)
        tasks = []
        for k in range(IN_FLIGHT):
            tasks.append(asyncio.create_task(lane(k)))
            if k % WAVE == WAVE - 1:
                await asyncio.sleep(0.1)
        await asyncio.sleep(ramp_s)
        meter = CpuMeter({"mock": mock})
        with meter:
            n0, t0 = done, time.perf_counter()
            await asyncio.sleep(window_s)
            n1, t1 = done, time.perf_counter()
        stop.set()
        await asyncio.gather(*tasks)
    share = ", ".join(f"{k} {100 * v / (t1 - t0):.0f}%" for k, v in meter.used.items())
    return {"rate": (n1 - n0) / (t1 - t0), "cpu": share}


async def run(opts: Options) -> list[Row]:
    ramp_s, window_s = (3.0, 5.0) if opts.quick else (4.0, 10.0)
    async with redis_server("concurrency") as (server, redis):
        with procs() as started:
            mock: Proc
            mock, mock_url = await start_mock(LATENCY_MS, base_env(server.url))
            started.append(mock)
            direct = await direct_run(mock, mock_url, ramp_s, window_s)
            runs = {}
            for key, unlimited in (("shipped", None), ("http", "http"), ("both", "http,redis")):
                runs[key] = await worker_run(
                    server.url, redis, mock_url, f"c-{key}", ramp_s, window_s, unlimited, opts
                )
    ideal = IN_FLIGHT / (LATENCY_MS / 1000)
    shipped = runs["shipped"]

    def detail(r: dict[str, Any]) -> str:
        return (
            f"≈{r['rate'] * LATENCY_MS / 1000:,.0f} in flight (Little), worker CPU "
            f"{r['cpu_ms']:.2f} ms/job at {100 * r['cpu_share']:.0f}% of a core, "
            f"Redis pool 'Too many connections' errors: {r['pool_errors']}, "
            f"tracebacks: {r['tracebacks']}, peak RSS {r['peak_mb']:.0f} MB"
        )

    def diagnostic(key: str, label: str) -> Row:
        r = runs[key]
        return Row(
            "concurrency",
            f"diagnostic: same worker, {label} (bench-only patch)",
            r["rate"],
            "jobs/s",
            ideal,
            "ideal 2,000 in flight / 1 s",
            r["rate"] / ideal,
            "≥ 1,800 jobs/s",
            r["rate"] >= 1800,
            note=detail(r),
        )

    return [
        Row(
            "concurrency",
            "jobs/s, 1 worker x 2,000 coroutines, mock latency 1 s",
            shipped["rate"],
            "jobs/s",
            ideal,
            "ideal 2,000 in flight / 1 s",
            shipped["rate"] / ideal,
            "≥ 1,800 jobs/s",
            shipped["rate"] >= 1800,
            note=f"{detail(shipped)}. The worker's pools allow BUDGETER_UPSTREAM_MAX_CONNECTIONS "
            "(1000) upstream calls and BUDGETER_REDIS_MAX_CONNECTIONS (512, blocking) Redis "
            "connections: the limit is the worker's CPU per job",
        ),
        Row(
            "concurrency",
            "peak RSS of that worker process",
            shipped["peak_mb"],
            "MB",
            shipped["base_mb"],
            "its RSS at start",
            shipped["peak_mb"] / shipped["base_mb"],
            "≤ 300 MB",
            shipped["peak_mb"] <= 300,
        ),
        diagnostic("http", "HTTP pool unlimited"),
        diagnostic("both", "HTTP and Redis pools unlimited"),
        Row(
            "concurrency",
            "mock capacity check: aiohttp client → mock direct, 2,000 in flight",
            direct["rate"],
            "jobs/s",
            ideal,
            "ideal 2,000 in flight / 1 s",
            direct["rate"] / ideal,
            "(context)",
            None,
            note="count_tokens + /messages per job, unlimited connector, connections opened "
            f"in waves: what this mock and machine sustain at 2,000 in flight. CPU: "
            f"{direct['cpu']} of a core (bench = the client)",
        ),
    ]


if __name__ == "__main__":
    run_standalone(run)
