"""Latency budgeter's synchronous proxy adds over calling the upstream directly.

Starts, on loopback: an embedded redis-server, `budgeter mock-upstream` (fixed latency)
and `budgeter api`, as separate processes. Then sends POST /v1/messages at a fixed rate,
alternating request by request between the mock directly and budgeter (same client, same
payloads), and prints p50/p99 of both and the difference.

    .venv/bin/python bench/bench_proxy_latency.py [--rate 40] [--seconds 15] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time

import aiohttp

from budgeter.embedded_redis import EmbeddedRedis, free_port


async def wait_http(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(rate: float, seconds: float, latency_ms: float) -> None:
    with tempfile.TemporaryDirectory() as data:
        redis = EmbeddedRedis(data, appendonly=False)
        redis.start()
        mock_port, api_port = free_port(), free_port()
        env = {
            **os.environ,
            "BUDGETER_REDIS_URL": redis.url,
            "BUDGETER_UPSTREAM_URL": f"http://127.0.0.1:{mock_port}",
            "BUDGETER_UPSTREAM_API_KEY": "bench-upstream",
            "BUDGETER_ADMIN_TOKEN": "bench",
            "BUDGETER_LOG_LEVEL": "WARNING",
        }
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "budgeter",
                "mock-upstream",
                "--port",
                str(mock_port),
                "--latency-ms",
                str(latency_ms),
                env=env,
            ),
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "budgeter", "api", "--port", str(api_port), env=env
            ),
        ]
        try:
            async with aiohttp.ClientSession() as http:
                mock, api = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{api_port}"
                await wait_http(http, f"{mock}/healthz")
                await wait_http(http, f"{api}/healthz")
                admin = {"authorization": "Bearer bench"}
                policy = {"budgets": {"day": 10**9}, "rate": {"rpm": 100_000}}
                await http.put(f"{api}/admin/tenants/bench", json=policy, headers=admin)
                async with http.post(f"{api}/admin/tenants/bench/keys", headers=admin) as r:
                    key = (await r.json())["key"]
                targets = {
                    "direct": (mock, {"x-api-key": "bench-upstream"}),
                    "budgeter": (api, {"x-api-key": key}),
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

                # warm-up (connections, count_tokens cache for the 50 distinct payloads)
                await asyncio.gather(*(one(n, i) for i in range(50) for n in targets))
                for values in latencies.values():
                    values.clear()
                total = int(rate * seconds)
                tasks = []
                start = time.perf_counter()
                for i in range(total):
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    name = "direct" if i % 2 == 0 else "budgeter"
                    tasks.append(asyncio.create_task(one(name, i)))
                await asyncio.gather(*tasks)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()
            redis.stop()

    d, b = latencies["direct"], latencies["budgeter"]
    print(
        f"rate {rate:g} req/s for {seconds:g} s, mock latency {latency_ms:g} ms, "
        f"{len(d)} + {len(b)} requests"
    )
    print(f"{'':12}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("direct", d), ("budgeter", b)):
        print(
            f"{name:12}{pct(values, 0.5):>10.1f}{pct(values, 0.99):>10.1f}"
            f"{statistics.mean(values):>10.1f}"
        )
    print(
        f"{'added':12}{pct(b, 0.5) - pct(d, 0.5):>10.1f}{pct(b, 0.99) - pct(d, 0.99):>10.1f}"
        f"{statistics.mean(b) - statistics.mean(d):>10.1f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds, args.latency_ms))
