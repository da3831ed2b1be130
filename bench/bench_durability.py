"""Row — durability: what ``BUDGETER_REDIS_WAIT_REPLICAS=1`` costs next to 0, side by side.

Starts, on loopback, a master with one replica (no persistence). Admission: rounds
alternate a client with WAIT 0 and one with WAIT 1 on that same master (reserve, then
settle, of ``concurrency`` coroutines), so both see the same machine and the same
replication traffic; the only difference is the WAIT each durable round ends with.
Proxy: two ``budgeter api`` processes on that master (WAIT 0, WAIT 1) and one
``budgeter mock-upstream``; POST /v1/messages to each, interleaved request by request in a
shuffled order (open loop at ``rate``/s each), count_tokens cache warm.

    .venv/bin/python bench/bench_durability.py [--quick] [--concurrency 64] [--rate 50]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from bench_admission import GENEROUS, reserve_round, settle_round
from common import (
    Options,
    Row,
    base_env,
    budgeter_proc,
    pct,
    procs,
    run_standalone,
    start_mock,
    wait_http,
)

from budgeter.admission.admission import Admission
from budgeter.store.client import make_redis
from budgeter.store.durability import configure
from budgeter.store.embedded import EmbeddedRedis, free_port
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore

WAITS = (0, 1)


@asynccontextmanager
async def replicated() -> AsyncIterator[EmbeddedRedis]:
    """A master with one replica in sync; yields the master."""
    with tempfile.TemporaryDirectory(prefix="bench-durability-") as data:
        master = EmbeddedRedis(f"{data}/master", appendonly=False)
        await asyncio.to_thread(master.start)
        replica = EmbeddedRedis(
            f"{data}/replica",
            appendonly=False,
            extra_args=["--replicaof", "127.0.0.1", str(master.port)],
        )
        await asyncio.to_thread(replica.start)
        client = make_redis(master.url)
        try:
            for _ in range(600):  # bounded: 30 s
                info = await client.info("replication")
                if info.get("connected_slaves") == 1 and await client.wait(1, 1000) == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the replica did not come in sync within 30 s")
            yield master
        finally:
            await client.aclose()
            await asyncio.to_thread(replica.stop)
            await asyncio.to_thread(master.stop)


def _client(url: str, replicas: int) -> RedisClient:
    client = make_redis(url)
    configure(client, replicas, 1000)
    return client


async def admission_rates(
    url: str, concurrency: int, rounds: int, seconds: float
) -> tuple[dict[int, tuple[float, float]], list[tuple[float, float]]]:
    """WAIT -> (reserve decisions/s, settle decisions/s) over every round, and per round
    the ratios WAIT 1 / WAIT 0 of both (each pair run back to back, order alternating)."""
    clients = {n: _client(url, n) for n in WAITS}
    try:
        await TenantStore(clients[0]).put("bench", GENEROUS)
        admissions = {n: Admission(c) for n, c in clients.items()}
        for n, admission in admissions.items():  # warm-up: scripts, pools
            warm, _ = await reserve_round(admission, "bench", -1 - n, concurrency, 0.3)
            await settle_round(admission, "bench", warm, concurrency)
        done = {n: [0, 0.0, 0.0] for n in WAITS}  # decisions, reserve s, settle s
        paired: list[tuple[float, float]] = []
        for r in range(rounds):
            rates: dict[int, tuple[float, float]] = {}
            for n in WAITS if r % 2 == 0 else WAITS[::-1]:
                rids, s = await reserve_round(
                    admissions[n], "bench", r * 10 + n, concurrency, seconds
                )
                settle_s = await settle_round(admissions[n], "bench", rids, concurrency)
                done[n][0] += len(rids)
                done[n][1] += s
                done[n][2] += settle_s
                rates[n] = (len(rids) / s, len(rids) / settle_s)
            paired.append((rates[1][0] / rates[0][0], rates[1][1] / rates[0][1]))
        return {n: (d[0] / d[1], d[0] / d[2]) for n, d in done.items()}, paired
    finally:
        for client in clients.values():
            await client.aclose()


async def waits_so_far(redis: RedisClient) -> int:
    """WAIT commands the master has run (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def proxy_p50(url: str, rate: float, seconds: float) -> tuple[dict[int, list[float]], int]:
    """WAIT -> latencies (ms) of POST /v1/messages through an api with that setting, and
    how many WAITs the master ran meanwhile."""
    redis = make_redis(url)
    with procs() as started:
        mock, mock_url = await start_mock(20.0, base_env(url))
        started.append(mock)
        apis: dict[int, str] = {}
        for n in WAITS:
            port = free_port()
            env = base_env(url, mock_url, BUDGETER_REDIS_WAIT_REPLICAS=str(n))
            started.append(budgeter_proc(f"api-wait{n}", ["api", "--port", str(port)], env))
            apis[n] = f"http://127.0.0.1:{port}"
        for api in apis.values():
            await wait_http(f"{api}/healthz")
        async with aiohttp.ClientSession() as http:
            admin = {"authorization": "Bearer bench"}
            policy = {"budgets": {"day": 10**12}, "rate": {"rpm": 10**7}}
            async with http.put(f"{apis[0]}/admin/tenants/bench", json=policy, headers=admin) as r:
                assert r.status in (200, 201), await r.text()
            async with http.post(f"{apis[0]}/admin/tenants/bench/keys", headers=admin) as r:
                key = (await r.json())["key"]
            latencies: dict[int, list[float]] = {n: [] for n in WAITS}

            async def one(n: int, i: int) -> None:
                body = {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"benchmark request {i % 50}"}],
                }
                headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
                t0 = time.perf_counter()
                async with http.post(f"{apis[n]}/v1/messages", json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, (n, r.status, await r.text())
                latencies[n].append((time.perf_counter() - t0) * 1000)

            for _ in range(2):  # warm-up: connections, the count cache of the 50 payloads
                await asyncio.gather(*(one(n, i) for i in range(50) for n in WAITS))
            for values in latencies.values():
                values.clear()
            order = random.Random(19)
            schedule = [n for _ in range(int(rate * seconds)) for n in order.sample(WAITS, 2)]
            tasks = []
            waits_before = await waits_so_far(redis)
            start = time.perf_counter()
            for i, n in enumerate(schedule):
                delay = start + i / (len(WAITS) * rate) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n, i)))
            await asyncio.gather(*tasks)
            waits = await waits_so_far(redis) - waits_before
    await redis.aclose()
    return latencies, waits


async def run(opts: Options) -> list[Row]:
    concurrency = int(opts.extra.get("concurrency", 64))
    rate = float(opts.extra.get("rate", 50.0))
    rounds, seconds = (4, 0.75) if opts.quick else (12, 1.0)
    proxy_s = 6.0 if opts.quick else 15.0
    async with replicated() as master:
        rates, paired = await admission_rates(master.url, concurrency, rounds, seconds)
        lat, waits = await proxy_p50(master.url, rate, proxy_s)
    setup = (
        "master + 1 replica on loopback (no persistence); WAIT 0 and WAIT 1 clients "
        f"alternate rounds on the same servers, {concurrency} coroutines"
    )
    rows = []
    for index, what in enumerate(("reserve (ADMIT)", "settle")):
        plain, durable = rates[0][index], rates[1][index]
        ratios = sorted(pair[index] for pair in paired)
        spread = (
            f"; WAIT 1 / WAIT 0 per pair of back-to-back rounds ({len(ratios)} x {seconds:g} s): "
            f"median {statistics.median(ratios):.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f}x"
        )
        rows.append(
            Row(
                "durability",
                f"{what} decisions/s with WAIT_REPLICAS=1",
                durable,
                "/s",
                plain,
                "WAIT_REPLICAS=0, same master and replica",
                durable / plain,
                "info: the cost of WAIT",
                None,
                note=setup + spread,
            )
        )
    p50 = {n: pct(lat[n], 0.5) for n in WAITS}
    p99 = {n: pct(lat[n], 0.99) for n in WAITS}
    rows.append(
        Row(
            "durability",
            "proxy p50 (ms) with WAIT_REPLICAS=1",
            p50[1],
            "ms",
            p50[0],
            "WAIT_REPLICAS=0, same master, replica and mock",
            p50[1] / p50[0],
            "info: the cost of WAIT",
            None,
            note=f"mock latency 20 ms, {rate:g}/s to each api interleaved, {proxy_s:g} s, "
            f"{len(lat[0])} + {len(lat[1])} requests; p99 {p99[0]:.2f} ms (WAIT 0) vs "
            f"{p99[1]:.2f} ms (WAIT 1); the master ran {waits / max(1, len(lat[1])):.1f} "
            "WAIT per request of the WAIT 1 api (reserve, settle: one per round each)",
        )
    )
    return rows


if __name__ == "__main__":
    run_standalone(run, concurrency=int, rate=float)
