"""Row 3 — concurrency: one ``budgeter worker --concurrency 2000`` against a mock upstream
that answers after 1 s. Jobs/s over a fixed window (reference: the ideal 2,000 jobs/s)
and the worker's peak RSS (psutil; reference: its RSS when it started).

The mock is several ``budgeter mock-upstream --reuse-port`` processes on one port
(SO_REUSEPORT: the kernel spreads the connections), so that it is not the limit. Side by
side in the same run:
- a capacity check: the direct client (bench/direct_client.py, the worker's event loop
  and JSON codec, nothing else) holding the same 2,000 requests in flight against the
  same mocks (count_tokens then /messages, unlimited connector), split over a few
  processes: it must show the ideal 2,000 jobs/s, or the row measures the machine;
- a diagnostic: the same worker with the default BUDGETER_UPSTREAM_MAX_CONNECTIONS
  (1,000 calls in flight: half the lanes wait for a connection). Each run uses its own
  key prefix. (bench/worker_unlimited.py can also lift the pools' limits by a patch.)

    .venv/bin/python bench/bench_concurrency.py [--quick] [--mocks 2] [--clients 2]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import (
    CpuMeter,
    DirectClient,
    Options,
    Proc,
    Row,
    base_env,
    cpu_wait_s,
    procs,
    profile_digest,
    profile_path,
    redis_pid,
    redis_server,
    run_standalone,
    start_mocks,
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
# one upstream connection per lane: the default (1,000) holds half of 2,000 lanes back
SIZED = {"BUDGETER_UPSTREAM_MAX_CONNECTIONS": str(IN_FLIGHT)}
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


async def not_succeeded(store: BatchStore, ids: list[str]) -> int:
    """Jobs that ended otherwise (errored, expired, canceled): 0 unless something broke."""
    statuses = [await store.status(b) for b in ids]
    return sum(s.errored + s.expired + s.canceled for s in statuses)


async def worker_run(
    server_url: str,
    redis: Any,
    mock_url: str,
    prefix: str,
    ramp_s: float,
    window_s: float,
    unlimited: str | None,
    opts: Options,
    others: dict[str, Proc | None],
    settings: dict[str, str],
) -> dict[str, Any]:
    jobs = int(IN_FLIGHT * (ramp_s + window_s) * 1.3)
    ids = await submit(redis, prefix, jobs)
    store = BatchStore(redis, prefix=prefix)
    env = base_env(server_url, mock_url, BUDGETER_KEY_PREFIX=prefix, **settings)
    script = None
    if unlimited:
        env["BENCH_UNLIMITED"] = unlimited
        script = "worker_unlimited.py"
    with procs() as started:
        profiled = opts.profile_dir is not None
        worker, _ = await start_worker(env, IN_FLIGHT, script=script, profiled=profiled)
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
        out = profile_path(opts, f"concurrency-worker-{prefix}")
        if out is not None:
            worker.start_profile(out)
        meter = CpuMeter(others)
        with meter:
            n0, t0, cpu0 = await succeeded(store, ids), time.perf_counter(), worker.cpu_s()
            wait0 = cpu_wait_s(worker)
            await asyncio.sleep(window_s)
            n1, t1, cpu1 = await succeeded(store, ids), time.perf_counter(), worker.cpu_s()
            wait1 = cpu_wait_s(worker)
        worker.stop_profile()
        digest = profile_digest(worker)
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
        "wait_share": (wait1 - wait0) / (t1 - t0),
        "pool_errors": log.count("Too many connections"),
        "tracebacks": log.count("Traceback"),
        "not_succeeded": await not_succeeded(store, ids),
        "profile": digest,
        "others": ", ".join(f"{k} {100 * v / (t1 - t0):.0f}%" for k, v in meter.used.items()),
    }


async def direct_run(
    mocks: list[Proc],
    mock_url: str,
    clients: int,
    ramp_s: float,
    window_s: float,
    env: dict[str, str],
) -> dict[str, Any]:
    """IN_FLIGHT coroutines over ``clients`` direct-client processes, each count_tokens then
    /messages in a loop; jobs/s in the window (which starts ``ramp_s`` after the last
    coroutine started)."""
    with procs() as started:
        direct = [DirectClient(f"direct{i}", mock_url, env) for i in range(clients)]
        started.extend(direct)
        lanes = IN_FLIGHT // clients
        await asyncio.gather(
            *(
                d.call(
                    "start",
                    lanes=lanes,
                    first=i * lanes,
                    stride=IN_FLIGHT,
                    wave=max(1, WAVE // clients),
                    max_tokens=32,
                )
                for i, d in enumerate(direct)
            )
        )
        await asyncio.sleep(ramp_s)
        meter = CpuMeter({**{m.name: m for m in mocks}, **{d.name: d for d in direct}})
        everyone = [*mocks, *direct]
        with meter:
            marks0 = await asyncio.gather(*(d.call("mark") for d in direct))
            waits0 = [cpu_wait_s(p) for p in everyone]
            await asyncio.sleep(window_s)
            marks1 = await asyncio.gather(*(d.call("mark") for d in direct))
            waits1 = [cpu_wait_s(p) for p in everyone]
        await asyncio.gather(*(d.call("stop") for d in direct))
    pairs = list(zip(marks0, marks1, strict=True))
    rate = sum((b["done"] - a["done"]) / (b["t"] - a["t"]) for a, b in pairs)
    elapsed = sum(b["t"] - a["t"] for a, b in pairs) / clients
    share = ", ".join(f"{k} {100 * v / elapsed:.0f}%" for k, v in meter.used.items())
    waited = ", ".join(
        f"{p.name} {100 * (b - a) / elapsed:.0f}%"
        for p, a, b in zip(everyone, waits0, waits1, strict=True)
    )
    jobs = max(1.0, rate * elapsed)
    client_ms = 1000 * sum(meter.used[d.name] for d in direct) / jobs
    mock_ms = 1000 * sum(meter.used[m.name] for m in mocks) / jobs
    return {
        "rate": rate,
        "cpu": share,
        "waited": waited,
        "client_ms": client_ms,
        "mock_ms": mock_ms,
    }


async def run(opts: Options) -> list[Row]:
    ramp_s, window_s = (3.0, 5.0) if opts.quick else (4.0, 10.0)
    n_mocks = int(opts.extra.get("mocks", 2))
    n_clients = int(opts.extra.get("clients", 2))
    async with redis_server("concurrency") as (server, redis):
        with procs() as started:
            env = base_env(server.url)
            mocks, mock_url = await start_mocks(n_mocks, LATENCY_MS, env)
            started.extend(mocks)
            direct = await direct_run(mocks, mock_url, n_clients, ramp_s, window_s, env)
            runs = {}
            for key, unlimited, settings in (
                ("sized", None, SIZED),
                ("default", None, {}),
            ):
                runs[key] = await worker_run(
                    server.url,
                    redis,
                    mock_url,
                    f"c-{key}",
                    ramp_s,
                    window_s,
                    unlimited,
                    opts,
                    {**{m.name: m for m in mocks}, "redis": redis_pid(server)},
                    settings,
                )
    ideal = IN_FLIGHT / (LATENCY_MS / 1000)
    shipped = runs["sized"]

    def detail(r: dict[str, Any]) -> str:
        return (
            f"≈{r['rate'] * LATENCY_MS / 1000:,.0f} in flight (Little), worker CPU "
            f"{r['cpu_ms']:.2f} ms/job at {100 * r['cpu_share']:.0f}% of a core (and "
            f"runnable, waiting for a CPU, {100 * r['wait_share']:.0f}% of the window), "
            f"Redis pool 'Too many connections' errors: {r['pool_errors']}, "
            f"tracebacks: {r['tracebacks']}, jobs ended otherwise than succeeded: "
            f"{r['not_succeeded']}, peak RSS {r['peak_mb']:.0f} MB; the others in "
            f"the window: {r['others']} of a core" + (f". {r['profile']}" if r["profile"] else "")
        )

    def diagnostic(key: str, label: str) -> Row:
        r = runs[key]
        return Row(
            "concurrency",
            f"diagnostic: same worker, {label}",
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
            "jobs/s, 1 worker x 2,000 coroutines, mock latency 1 s, "
            "BUDGETER_UPSTREAM_MAX_CONNECTIONS=2000",
            shipped["rate"],
            "jobs/s",
            ideal,
            "ideal 2,000 in flight / 1 s",
            shipped["rate"] / ideal,
            "≥ 1,800 jobs/s",
            shipped["rate"] >= 1800,
            note=f"{detail(shipped)}. The worker's HTTP pool is set to its 2,000 lanes (with "
            "the default 1,000 connections, half the lanes wait for one: the diagnostic "
            "below); BUDGETER_REDIS_MAX_CONNECTIONS stays at its default (512, blocking)",
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
        diagnostic("default", "default BUDGETER_UPSTREAM_MAX_CONNECTIONS (1000)"),
        Row(
            "concurrency",
            f"capacity check: direct client → {n_mocks} mock processes, 2,000 in flight",
            direct["rate"],
            "jobs/s",
            ideal,
            "ideal 2,000 in flight / 1 s",
            direct["rate"] / ideal,
            "≥ 0.95x ideal",
            direct["rate"] >= 0.95 * ideal,
            note=f"the floor of the rows above: count_tokens + /messages per job from "
            f"{n_clients} direct-client processes (uvloop, unlimited connector, connections "
            f"opened in waves) against {n_mocks} mock processes sharing one port "
            f"(SO_REUSEPORT). A job takes the 1 s latency plus its count_tokens call, so "
            f"Little's law puts the ideal just under 2,000/s. CPU in the window: "
            f"{direct['cpu']} of a core; per job: clients {direct['client_ms']:.2f} ms, "
            f"mocks {direct['mock_ms']:.2f} ms; runnable, waiting for a CPU: "
            f"{direct['waited']} of the window",
        ),
    ]


if __name__ == "__main__":
    run_standalone(run, mocks=int, clients=int)
