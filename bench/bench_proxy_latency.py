"""Row 4 — proxy overhead: latency ``budgeter api``'s POST /v1/messages adds over calling
the upstream directly, next to its floors measured in the same run (issue 20).

Starts, on loopback: an embedded redis-server, ``budgeter mock-upstream`` (fixed latency),
``budgeter api`` and bench/bare_proxy.py (a bare aiohttp pass-through proxy: no Redis, no
auth, the same event loop, settings and ClientSession as budgeter), as separate
processes. Then, open-loop at a fixed rate, interleaved request by request in a shuffled
order per round (same client, same payloads, same moment), sends POST /v1/messages to the
mock directly, through the bare proxy and through budgeter, and a Redis PING from this
same client process to the Redis budgeter uses. The floors:

- p50: budgeter's added p50 ≤ the bare proxy's added p50 + one Redis round trip (PING p50);
- p99: budgeter's added p99 ≤ the bare proxy's added p99 + 2 ms.

The count_tokens cache is warm (50 distinct payloads, warmed first). The notes give the
Redis commands per proxied call (MONITOR) and the CPU per request of budgeter and of the
bare proxy; under ``--profile DIR`` the api runs under pyinstrument (bench/api_profiled.py)
and its top self-time costs go into the note.

    .venv/bin/python bench/bench_proxy_latency.py [--rate 50] [--seconds 20] [--latency-ms 20]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    PY,
    ROOT,
    CpuMeter,
    Options,
    Proc,
    RedisMonitor,
    Row,
    base_env,
    budgeter_proc,
    pct,
    procs,
    redis_pid,
    redis_server,
    run_standalone,
    start_mock,
    wait_http,
)

from budgeter.store.embedded import free_port
from budgeter.store.scripts import lua_source

PROXIES = ("direct", "bare", "budgeter")
TARGETS = (*PROXIES, "ping")
P99_SLACK_MS = 2.0


@dataclass
class Measured:
    latencies: dict[str, list[float]]  # ms, per target
    calls: tuple[float, float, str]  # RedisMonitor.per_job of budgeter's calls
    # CPU ms per request (api, bare; *_sys: the kernel's part; *_wait: runnable, waiting
    # for a CPU) or per budgeter call (redis)
    cpu_ms: dict[str, float]
    server_us: dict[str, float]  # Redis's own µs per call of each command (commandstats)
    profile: str  # top self-time lines of the api's profile ("" without --profile)


def command_us(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Redis's own time per call (µs, INFO commandstats) of each command run in between."""
    out: dict[str, float] = {}
    for key, now in after.items():
        was = before.get(key, {"calls": 0, "usec": 0})
        calls = int(now["calls"]) - int(was["calls"])
        if calls > 0:
            out[key.removeprefix("cmdstat_")] = (int(now["usec"]) - int(was["usec"])) / calls
    return out


def script_names() -> dict[str, str]:
    """The SHA1 of every budgeter Lua script (as loaded: helpers prepended) -> its name."""
    root = ROOT / "budgeter" / "lua"
    names = {}
    for path in root.rglob("*.lua"):
        name = str(path.relative_to(root))
        if not name.startswith("lib/"):
            names[hashlib.sha1(lua_source(name).encode()).hexdigest()] = name
    return names


def script_us(slowlog: list[dict[str, Any]]) -> dict[str, float]:
    """Redis's own µs per EVALSHA of each script, from a SLOWLOG that logged every command
    (keys ``script:<name>``)."""
    names = script_names()
    spent: dict[str, list[int]] = {}
    for entry in slowlog:
        words = entry["command"].split()
        if len(words) > 1 and words[0].upper() == b"EVALSHA":
            name = names.get(words[1].decode(), words[1].decode()[:8])
            spent.setdefault(f"script:{name}", []).append(int(entry["duration"]))
    return {name: sum(us) / len(us) for name, us in spent.items()}


def runqueue_wait_s(proc: Proc) -> float:
    """Seconds the process's main thread (its event loop) has waited, runnable, for a CPU
    (/proc/PID/schedstat, second field; 0 where the kernel keeps no schedstat)."""
    try:
        fields = Path(f"/proc/{proc.pid}/schedstat").read_text().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def system_s(proc: Proc) -> float:
    """The kernel's share of a process's CPU seconds so far."""
    return float(proc.ps.cpu_times().system)


def start_api(env: dict[str, str], opts: Options) -> tuple[Proc, str, Path | None]:
    """``budgeter api``; when profiling, inside bench/api_profiled.py (pyinstrument started
    by SIGUSR1, stopped by SIGUSR2: the third value is where it writes)."""
    port = free_port()
    argv = ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    script = str(ROOT / "bench" / "api_profiled.py")
    if opts.profile_dir is None:
        if env.get("BENCH_API_PATCH"):  # a diagnostic: see bench/api_profiled.py
            return Proc("api", [PY, script, *argv], env), url, None
        return budgeter_proc("api", ["api", *argv], env), url, None
    out = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "api.json"
    return Proc("api", [PY, script, *argv], {**env, "BENCH_PROFILE": str(out)}), url, out


def stop_profile(api: Proc, out: Path, opts: Options, requests: int) -> str:
    """Stop the api's profiler, keep its files in the profile directory and answer its top
    costs in µs per proxied request: self time, then budgeter's functions inclusive."""
    api.popen.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not out.exists():  # written at once (a rename) by the api's SIGUSR2 handler
        if time.monotonic() > deadline:
            return "(the api wrote no profile)"
        time.sleep(0.05)
    assert opts.profile_dir is not None
    opts.profile_dir.mkdir(parents=True, exist_ok=True)
    tree = out.with_suffix(".tree.txt")
    shutil.copy(out, opts.profile_dir / "proxy_latency-api.pyinstrument.json")
    shutil.copy(tree, opts.profile_dir / "proxy_latency-api.pyinstrument.txt")
    print(f"  profile of api: {opts.profile_dir / 'proxy_latency-api.pyinstrument.txt'}")
    data = json.loads(out.read_text())
    per = 1e6 / max(1, requests)
    busy = (data["seconds"] - data["idle"]) * per
    own = ", ".join(f"{n} {t * per:.0f}" for n, t in data["self"][:8])
    mine = [  # budgeter's request path (the process's own stem, always on the stack, left out)
        (n, t) for n, t in data["inclusive"] if "budgeter/" in n and t < 0.5 * data["seconds"]
    ][:8]
    inclusive = ", ".join(f"{n} {t * per:.0f}" for n, t in mine)
    return (
        f"{busy:.0f} µs on the api's main thread per request (pyinstrument, wall clock while "
        f"a function is on the stack: CPU, syscalls and preemption). Self µs/request: {own}. "
        f"budgeter inclusive µs/request: {inclusive}"
    )


async def measure(rate: float, seconds: float, latency_ms: float, opts: Options) -> Measured:
    """``rate`` requests/s to each target (4 x rate in all, PING included), ``seconds``."""
    async with redis_server("proxy") as (server, redis):
        with procs() as started:
            mock, mock_url = await start_mock(latency_ms, base_env(server.url))
            started.append(mock)
            env = base_env(server.url, mock_url)
            api, api_url, profile_out = start_api(env, opts)
            started.append(api)
            bare_port = free_port()
            bare = Proc(
                "bare", [PY, str(ROOT / "bench" / "bare_proxy.py"), "--port", str(bare_port)], env
            )
            started.append(bare)
            bare_url = f"http://127.0.0.1:{bare_port}"
            await wait_http(f"{api_url}/healthz")
            await wait_http(f"{bare_url}/healthz")
            async with aiohttp.ClientSession() as http:
                admin = {"authorization": "Bearer bench"}
                policy = {"budgets": {"day": 10**12}, "rate": {"rpm": 10**7}}
                async with http.put(
                    f"{api_url}/admin/tenants/bench", json=policy, headers=admin
                ) as r:
                    assert r.status in (200, 201), await r.text()
                async with http.post(f"{api_url}/admin/tenants/bench/keys", headers=admin) as r:
                    key = (await r.json())["key"]
                targets = {
                    "direct": (mock_url, {"x-api-key": "bench-upstream"}),
                    "bare": (bare_url, {"x-api-key": "bench-upstream"}),
                    "budgeter": (api_url, {"x-api-key": key}),
                }
                latencies: dict[str, list[float]] = {name: [] for name in TARGETS}

                async def one(name: str, i: int) -> None:
                    if name == "ping":
                        t0 = time.perf_counter()
                        assert await redis.ping()
                        latencies[name].append((time.perf_counter() - t0) * 1000)
                        return
                    base, headers = targets[name]
                    body = {
                        "model": "claude-sonnet-4-6",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": f"benchmark request {i % 50}"}],
                    }
                    headers = {**headers, "anthropic-version": "2023-06-01"}
                    t0 = time.perf_counter()
                    async with http.post(f"{base}/v1/messages", json=body, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, (name, r.status, await r.text())
                    latencies[name].append((time.perf_counter() - t0) * 1000)

                # warm-up: connections, the count_tokens cache of the 50 payloads, imports
                for _ in range(2):
                    await asyncio.gather(*(one(n, i) for i in range(50) for n in TARGETS))
                async with RedisMonitor(int(server.port or 0)) as monitor:
                    for i in range(50):
                        await one("budgeter", i)
                calls = monitor.per_job(50, set())
                for values in latencies.values():
                    values.clear()
                if profile_out is not None:
                    api.popen.send_signal(signal.SIGUSR1)
                order = random.Random(20)
                rounds = int(rate * seconds)
                schedule = [n for _ in range(rounds) for n in order.sample(TARGETS, len(TARGETS))]
                tasks = []
                meter = CpuMeter(
                    {"api": api, "bare": bare, "redis": redis_pid(server)}, include_self=False
                )
                sys_before = {"api": system_s(api), "bare": system_s(bare)}
                wait_before = {"api": runqueue_wait_s(api), "bare": runqueue_wait_s(bare)}
                stats_before = await redis.info("commandstats")
                await redis.config_set("slowlog-max-len", 100_000)
                await redis.config_set("slowlog-log-slower-than", 0)
                await redis.slowlog_reset()
                with meter:
                    start = time.perf_counter()
                    for i, name in enumerate(schedule):
                        delay = start + i / (len(TARGETS) * rate) - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        tasks.append(asyncio.create_task(one(name, i)))
                    await asyncio.gather(*tasks)
                server_us = command_us(stats_before, await redis.info("commandstats"))
                server_us.update(script_us(await redis.slowlog_get(100_000)))
                await redis.config_set("slowlog-log-slower-than", 10_000)
                waited = {
                    n: runqueue_wait_s(p) - wait_before[n]
                    for n, p in (("api", api), ("bare", bare))
                }
                sys_used = {
                    n: system_s(p) - sys_before[n] for n, p in (("api", api), ("bare", bare))
                }
                profile = ""
                if profile_out is not None:
                    profile = await asyncio.to_thread(
                        stop_profile, api, profile_out, opts, len(latencies["budgeter"])
                    )
    per = {"api": "budgeter", "bare": "bare", "redis": "budgeter"}
    cpu_ms = {
        name: 1000 * used / max(1, len(latencies[per[name]])) for name, used in meter.used.items()
    }
    for name, used in sys_used.items():
        cpu_ms[f"{name}_sys"] = 1000 * used / max(1, len(latencies[per[name]]))
        cpu_ms[f"{name}_wait"] = 1000 * waited[name] / max(1, len(latencies[per[name]]))
    return Measured(latencies, calls, cpu_ms, server_us, profile)


async def run(opts: Options) -> list[Row]:
    rate = float(opts.extra.get("rate", 50.0))
    seconds = float(opts.extra.get("seconds", 8.0 if opts.quick else 20.0))
    latency_ms = float(opts.extra.get("latency_ms", 20.0))
    got = await measure(rate, seconds, latency_ms, opts)
    lat = got.latencies
    d, x, b, ping = lat["direct"], lat["bare"], lat["budgeter"], lat["ping"]
    calls, lua_calls, top = got.calls
    cpu = got.cpu_ms
    served = ", ".join(
        f"{c} {us:.1f}"
        for c, us in got.server_us.items()
        if c in ("evalsha", "hgetall", "ping") or c.startswith("script:")
    )
    setup = (
        f"{rate:g}/s to each of direct, bare proxy, budgeter and PING, interleaved in a "
        f"shuffled order, {seconds:g} s, mock latency {latency_ms:g} ms, "
        f"{len(d)} + {len(x)} + {len(b)} requests + {len(ping)} PINGs"
    )
    absolute = "; ".join(
        f"{name} p50 {pct(lat[name], 0.5):.2f} / p99 {pct(lat[name], 0.99):.2f} ms"
        for name in TARGETS
    )
    note = (
        f"{setup}. {absolute}; mean added: budgeter "
        f"+{statistics.mean(b) - statistics.mean(d):.2f} ms, bare "
        f"+{statistics.mean(x) - statistics.mean(d):.2f} ms. CPU ms/request: budgeter api "
        f"{cpu.get('api', 0):.2f} (kernel {cpu.get('api_sys', 0):.2f}), bare proxy "
        f"{cpu.get('bare', 0):.2f} (kernel {cpu.get('bare_sys', 0):.2f}); ms/request its "
        f"event loop waited, runnable, for a CPU: api {cpu.get('api_wait', 0):.2f}, bare "
        f"{cpu.get('bare_wait', 0):.2f} (Redis "
        f"{cpu.get('redis', 0):.3f} per budgeter call, PINGs included). Redis commands per "
        f"proxied call: {calls:.1f} ({top}), {lua_calls:.1f} more inside Lua. Redis's own "
        f"µs per call (commandstats): {served}"
    )
    if got.profile:
        note += f". Profile: {got.profile}"
    rows = []
    for q in (0.5, 0.99):
        name = f"p{int(q * 100)}"
        added = pct(b, q) - pct(d, q)
        bare_added = pct(x, q) - pct(d, q)
        if q == 0.5:
            extra, floor = pct(ping, 0.5), bare_added + pct(ping, 0.5)
            label = (
                f"floor: bare proxy's added p50 {bare_added:+.2f} ms + Redis PING p50 "
                f"{extra:.2f} ms"
            )
            target = "≤ bare + 1 Redis RTT"
        else:
            floor = bare_added + P99_SLACK_MS
            label = f"floor: bare proxy's added p99 {bare_added:+.2f} ms + {P99_SLACK_MS:g} ms"
            target = f"≤ bare + {P99_SLACK_MS:g} ms"
        rows.append(
            Row(
                "proxy_latency",
                f"{name} latency added by POST /v1/messages via budgeter api",
                added,
                "ms",
                floor,
                label,
                added / floor if floor > 0 else None,
                target,
                added <= floor,
                note=note if q == 0.5 else "",
            )
        )
    return rows


if __name__ == "__main__":
    run_standalone(run, rate=float, seconds=float, latency_ms=float)
