"""Row 4 — proxy overhead: latency ``budgeter api``'s POST /v1/messages adds over calling
the upstream directly.

Starts, on loopback: an embedded redis-server, ``budgeter mock-upstream`` (fixed latency)
and ``budgeter api``, as separate processes. Then sends POST /v1/messages open-loop at a
fixed rate to each target, interleaved request by request (the mock directly, budgeter,
the mock, ...: same client, same payloads, same moment), and reports p50/p99 of both and
the difference. The count_tokens cache is warm (50 distinct payloads, warmed first).

    .venv/bin/python bench/bench_proxy_latency.py [--rate 50] [--seconds 20] [--latency-ms 20]
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
from common import (
    Options,
    RedisMonitor,
    Row,
    base_env,
    budgeter_proc,
    free_port,
    pct,
    procs,
    profile_path,
    redis_server,
    run_standalone,
    start_mock,
    wait_http,
)


async def measure(
    rate: float, seconds: float, latency_ms: float, opts: Options
) -> tuple[dict[str, list[float]], tuple[float, float, str]]:
    """``rate`` requests/s to each target (2 x rate in all), for ``seconds``."""
    async with redis_server("proxy") as (server, _redis):
        with procs() as started:
            mock, mock_url = await start_mock(latency_ms, base_env(server.url))
            started.append(mock)
            api_port = free_port()
            api = budgeter_proc(
                "api", ["api", "--port", str(api_port)], base_env(server.url, mock_url)
            )
            started.append(api)
            api_url = f"http://127.0.0.1:{api_port}"
            await wait_http(f"{api_url}/healthz")
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
                    "budgeter": (api_url, {"x-api-key": key}),
                }
                latencies: dict[str, list[float]] = {name: [] for name in targets}

                async def one(name: str, i: int) -> None:
                    base, headers = targets[name]
                    body = {
                        "model": "claude-sonnet-4-6",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": f"benchmark request {i % 50}"}],
                    }
                    headers = {**headers, "anthropic-version": "2023-06-01"}
                    started = time.perf_counter()
                    async with http.post(f"{base}/v1/messages", json=body, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, (name, r.status, await r.text())
                    latencies[name].append((time.perf_counter() - started) * 1000)

                # warm-up: connections, the count_tokens cache of the 50 payloads, imports
                for _ in range(2):
                    await asyncio.gather(*(one(n, i) for i in range(50) for n in targets))
                async with RedisMonitor(int(server.port or 0)) as monitor:
                    for i in range(50):
                        await one("budgeter", i)
                calls = monitor.per_job(50, set())
                for values in latencies.values():
                    values.clear()
                out = profile_path(opts, "proxy_latency-api")
                if out is not None:
                    api.start_profile(out)
                total = int(2 * rate * seconds)
                tasks = []
                start = time.perf_counter()
                for i in range(total):
                    delay = start + i / (2 * rate) - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    name = "direct" if i % 2 == 0 else "budgeter"
                    tasks.append(asyncio.create_task(one(name, i)))
                await asyncio.gather(*tasks)
                api.stop_profile()
    return latencies, calls


async def run(opts: Options) -> list[Row]:
    rate = float(opts.extra.get("rate", 50.0))
    seconds = float(opts.extra.get("seconds", 8.0 if opts.quick else 20.0))
    latency_ms = float(opts.extra.get("latency_ms", 20.0))
    lat, (calls, lua_calls, top) = await measure(rate, seconds, latency_ms, opts)
    d, b = lat["direct"], lat["budgeter"]
    setup = (
        f"{rate:g} req/s to each target interleaved, {seconds:g} s, mock latency "
        f"{latency_ms:g} ms, {len(d)} + {len(b)} requests"
    )
    rows = []
    for q, target, limit in ((0.5, "≤ +1 ms", 1.0), (0.99, "≤ +5 ms", 5.0)):
        added = pct(b, q) - pct(d, q)
        rows.append(
            Row(
                "proxy_latency",
                f"p{int(q * 100)} latency added by POST /v1/messages via budgeter api",
                added,
                "ms",
                pct(d, q),
                f"p{int(q * 100)} calling the mock directly",
                pct(b, q) / pct(d, q),
                target,
                added <= limit,
                note=(
                    f"{setup}; budgeter p50 {pct(b, 0.5):.1f} ms, p99 {pct(b, 0.99):.1f} ms, "
                    f"mean +{statistics.mean(b) - statistics.mean(d):.1f} ms. Redis commands "
                    f"per proxied call: {calls:.1f} ({top}), {lua_calls:.1f} more inside Lua"
                    if q == 0.5
                    else ""
                ),
            )
        )
    return rows


if __name__ == "__main__":
    run_standalone(run, rate=float, seconds=float, latency_ms=float)
