"""Row 1 — admission: decisions/s of ``Admission.reserve`` (and ``settle``) from one
process against one Redis, next to the ceiling of that same process and Redis: pipelined
EVALSHA of a trivial script (``return 1``).

Rounds alternate (ceiling, reserve, settle, ceiling, ...) so both see the same machine.
Every reserve is an ADMIT under a generous policy that still has every kind of limit
(two budgets, three rate buckets, max_concurrency), so admission/reserve.lua does its full work.

    .venv/bin/python bench/bench_admission.py [--quick] [--concurrency 64]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import CpuMeter, Options, Row, profiled, redis_pid, redis_server, run_standalone

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.tenants.store import TenantStore

GENEROUS = TenantPolicy.model_validate(
    {
        "budgets": {"day": 10**15, "month": 10**15},
        "rate": {"rpm": 10**9, "itpm": 10**12, "otpm": 10**12},
        "max_concurrency": 10**9,
    }
)
PIPELINE = 500  # EVALSHA per pipeline round trip for the ceiling


async def ceiling(redis: Any, sha: str, seconds: float, lanes: int = 2) -> tuple[int, float]:
    """Pipelined EVALSHA of ``return 1``: ``lanes`` pipelines in flight at once."""
    stop_at = time.perf_counter() + seconds
    done = 0

    async def lane() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(PIPELINE):
                    pipe.evalsha(sha, 0)
                replies = await pipe.execute()
            done += len(replies)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(lanes)))
    return done, time.perf_counter() - started


async def unpipelined(redis: Any, sha: str, concurrency: int, seconds: float) -> tuple[int, float]:
    """The same trivial EVALSHA, one round trip per call from ``concurrency`` coroutines:
    what redis-py costs per call before budgeter does anything (a diagnostic)."""
    stop_at = time.perf_counter() + seconds
    done = 0

    async def lane() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await redis.evalsha(sha, 0)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return done, time.perf_counter() - started


async def reserve_round(
    admission: Admission, tenant: str, round_no: int, concurrency: int, seconds: float
) -> tuple[list[str], float]:
    stop_at = time.perf_counter() + seconds
    rids: list[str] = []

    async def loop(lane: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            rid = f"r{round_no}-{lane}-{n}"
            decision = await admission.reserve(tenant, rid, 120, 64, model="claude-sonnet-4-6")
            if decision.kind != "ADMIT":
                raise RuntimeError(f"expected ADMIT, got {decision}")
            rids.append(rid)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return rids, time.perf_counter() - started


async def settle_round(
    admission: Admission, tenant: str, rids: list[str], concurrency: int
) -> float:
    usage = Usage(input_tokens=120, output_tokens=40)
    todo = iter(rids)

    async def loop() -> None:
        for rid in todo:
            result = await admission.settle(tenant, rid, usage)
            if result.settled != 1:
                raise RuntimeError(f"settle of {rid} did nothing")

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run(opts: Options) -> list[Row]:
    concurrency = int(opts.extra.get("concurrency", 64))
    rounds, seconds = (2, 1.5) if opts.quick else (4, 2.5)
    async with redis_server("admission") as (server, redis):
        await TenantStore(redis).put("bench", GENEROUS)
        admission = Admission(redis)
        sha = await redis.script_load("return 1")
        # warm-up: scripts loaded, connection pool grown to `concurrency`
        warm, _ = await reserve_round(admission, "bench", -1, concurrency, 0.3)
        await settle_round(admission, "bench", warm, concurrency)
        await ceiling(redis, sha, 0.3)
        ceil_n = ceil_s = res_n = res_s = set_n = set_s = unp_n = unp_s = 0.0
        meters: dict[str, tuple[CpuMeter, int]] = {}
        for r in range(rounds):
            n, s = await ceiling(redis, sha, seconds)
            ceil_n, ceil_s = ceil_n + n, ceil_s + s
            n, s = await unpipelined(redis, sha, concurrency, seconds / 2)
            unp_n, unp_s = unp_n + n, unp_s + s
            with (
                CpuMeter({"redis": redis_pid(server)}) as meter,
                profiled(opts, "admission-reserve"),
            ):
                rids, s = await reserve_round(admission, "bench", r, concurrency, seconds)
            meters.setdefault("reserve", (meter, len(rids)))
            res_n, res_s = res_n + len(rids), res_s + s
            with (
                CpuMeter({"redis": redis_pid(server)}) as meter,
                profiled(opts, "admission-settle"),
            ):
                s = await settle_round(admission, "bench", rids, concurrency)
            meters.setdefault("settle", (meter, len(rids)))
            set_n, set_s = set_n + len(rids), set_s + s
    ceil_rate, unp_rate = ceil_n / ceil_s, unp_n / unp_s
    diag = (
        f"diagnostic: unpipelined EVALSHA 'return 1' from {concurrency} coroutines "
        f"{unp_rate:,.0f}/s = {unp_rate / ceil_rate:.2f}x ceiling"
    )
    reserve_rate, settle_rate = res_n / res_s, set_n / set_s
    cpu = {k: m.per_job_ms(n) for k, (m, n) in meters.items()}
    return [
        Row(
            "admission",
            f"reserve (ADMIT) decisions/s, {concurrency} coroutines",
            reserve_rate,
            "/s",
            ceil_rate,
            "pipelined EVALSHA 'return 1' /s",
            reserve_rate / ceil_rate,
            "≥ 0.5x ceiling",
            reserve_rate / ceil_rate >= 0.5,
            note=f"{diag}; reserve = {reserve_rate / unp_rate:.2f}x that. "
            f"CPU ms/decision: {cpu['reserve']}",
        ),
        Row(
            "admission",
            f"settle decisions/s, {concurrency} coroutines",
            settle_rate,
            "/s",
            ceil_rate,
            "pipelined EVALSHA 'return 1' /s",
            settle_rate / ceil_rate,
            "≥ 0.5x ceiling",
            settle_rate / ceil_rate >= 0.5,
            note=f"settle = {settle_rate / unp_rate:.2f}x unpipelined. "
            f"CPU ms/decision: {cpu['settle']}",
        ),
    ]


if __name__ == "__main__":
    run_standalone(run, concurrency=int)
