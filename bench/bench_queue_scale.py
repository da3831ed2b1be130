"""Row 5 — queue scale.

1. Enqueue N small jobs (1,000,000; 100,000 with --quick) through the real producer path,
   ``JobQueue.submit`` (what ``BatchStore.create`` and the Batches API call once the
   requests are validated), in batches of 10,000: jobs/s next to a raw pipelined RPUSH of
   the same job bodies (the floor: one list element per job, nothing else).
2. Redis memory per queued job with the payload excluded: (INFO used_memory delta -
   payload bytes) / N, next to the same figure for the raw RPUSH floor. The payload is
   the job's ``params`` JSON as the client sent it.
3. Dequeue cost: ``JobQueue.pick`` (sched/pick.lua + queue/dequeue.lua) with 10,000 backlogged
   tenants vs with 1 backlogged tenant, in alternating blocks on the same Redis.

Halves alternate (submit, raw, submit, raw) so both see the same machine; every phase
writes its own keys, so the memory deltas add up.

    .venv/bin/python bench/bench_queue_scale.py [--quick] [--jobs N] [--tenants 10000]
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from common import CpuMeter, Options, Row, profiled, redis_pid, redis_server, run_standalone

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import new_batch_id
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.tenants.store import TenantStore

BATCH = 10_000
RAW_CHUNK = 1000  # values per RPUSH
RAW_PIPE = 10  # RPUSH per pipeline round trip


def params(i: int) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"job {i:07d}"}],
    }


def payload_bytes(i: int) -> int:
    return len(json.dumps(params(i), separators=(",", ":")).encode())


async def used_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def submit_phase(queue: JobQueue, first: int, count: int) -> tuple[float, int, int]:
    """(seconds, memory delta, payload bytes) for jobs first..first+count."""
    redis = queue.redis
    before = await used_memory(redis)
    payload = 0
    elapsed = 0.0
    for start in range(first, first + count, BATCH):
        jobs = [NewJob(f"r{i:07d}", params(i)) for i in range(start, start + BATCH)]
        payload += sum(payload_bytes(i) for i in range(start, start + BATCH))
        t = time.perf_counter()
        await queue.submit("bulk", new_batch_id(), jobs)
        elapsed += time.perf_counter() - t
    return elapsed, await used_memory(redis) - before, payload


async def raw_phase(redis: Any, first: int, count: int, key: str) -> tuple[float, int, int]:
    before = await used_memory(redis)
    payload = 0
    elapsed = 0.0
    step = RAW_CHUNK * RAW_PIPE
    for start in range(first, first + count, step):
        bodies = [
            json.dumps({"custom_id": f"r{i:07d}", "params": params(i)}, separators=(",", ":"))
            for i in range(start, start + step)
        ]
        payload += sum(payload_bytes(i) for i in range(start, start + step))
        t = time.perf_counter()
        async with redis.pipeline(transaction=False) as pipe:
            for k in range(0, step, RAW_CHUNK):
                pipe.rpush(key, *bodies[k : k + RAW_CHUNK])
            await pipe.execute()
        elapsed += time.perf_counter() - t
    return elapsed, await used_memory(redis) - before, payload


async def gather_chunked(coros: list[Any], width: int = 45) -> None:
    """At most ``width`` at once: redis-py refuses a 101st connection, and a submit
    holds two (its WATCH pipeline and TIME)."""
    for start in range(0, len(coros), width):
        await asyncio.gather(*coros[start : start + width])


async def setup_tenants(redis: Any, prefix: str, tenants: int, jobs_each: int) -> JobQueue:
    store = TenantStore(redis, prefix=prefix)
    queue = JobQueue(redis, prefix=prefix)
    names = [f"t{k:05d}" for k in range(tenants)]
    await gather_chunked([store.put(name, TenantPolicy()) for name in names])
    await gather_chunked(
        [
            queue.submit(name, "b", [NewJob(f"c{j}", params(j)) for j in range(jobs_each)])
            for name in names
        ]
    )
    return queue


async def pick_block(queue: JobQueue, picks: int) -> float:
    t = time.perf_counter()
    for _ in range(picks):
        pick = await queue.pick(lease_ms=600_000)
        if pick.job is None:
            raise RuntimeError("pick found no job")
    return time.perf_counter() - t


async def run(opts: Options) -> list[Row]:
    n = int(opts.extra.get("jobs", 100_000 if opts.quick else 1_000_000))
    n -= n % (2 * BATCH)
    tenants = int(opts.extra.get("tenants", 2_000 if opts.quick else 10_000))
    blocks, block = (6, 250) if opts.quick else (10, 400)
    async with redis_server("queue") as (server, redis):
        await TenantStore(redis).put("bulk", TenantPolicy())
        queue = JobQueue(redis)
        sub_s = sub_mem = sub_pay = raw_s = raw_mem = raw_pay = 0.0
        half = n // 2
        sub_cpu = CpuMeter({"redis": redis_pid(server)})
        raw_cpu = CpuMeter({"redis": redis_pid(server)})
        for part in range(2):
            with sub_cpu, profiled(opts, f"queue_scale-submit-{part}"):
                s, m, p = await submit_phase(queue, part * half, half)
            sub_s, sub_mem, sub_pay = sub_s + s, sub_mem + m, sub_pay + p
            with raw_cpu:
                s, m, p = await raw_phase(redis, part * half, half, f"raw:{part}")
            raw_s, raw_mem, raw_pay = raw_s + s, raw_mem + m, raw_pay + p
        depth = await redis.llen(queue.keys("bulk").queue)
        if depth != n:
            raise RuntimeError(f"queued {depth} of {n}")
        await redis.flushall()

        # dequeue: 10,000 backlogged tenants (2 jobs each: a pick never empties one) vs 1
        t_setup = time.perf_counter()
        many = await setup_tenants(redis, "many", tenants, 2)
        one = await setup_tenants(redis, "one", 1, blocks * block + 50)
        setup_s = time.perf_counter() - t_setup
        await pick_block(many, 20)
        await pick_block(one, 20)
        many_s = one_s = 0.0
        for _ in range(blocks):
            with profiled(opts, "queue_scale-pick-many"):
                many_s += await pick_block(many, block)
            one_s += await pick_block(one, block)
        per_many = many_s / (blocks * block) * 1000
        per_one = one_s / (blocks * block) * 1000

    sub_rate, raw_rate = n / sub_s, n / raw_s
    per_job = (sub_mem - sub_pay) / n
    per_raw = (raw_mem - raw_pay) / n
    scaled = "" if n >= 1_000_000 else f" (N = {n:,}: --quick or --jobs; the issue asks 1,000,000)"
    return [
        Row(
            "queue_scale",
            f"enqueue {n:,} jobs via JobQueue.submit, batches of {BATCH:,}",
            sub_rate,
            "jobs/s",
            raw_rate,
            "raw pipelined RPUSH of the same bodies",
            sub_rate / raw_rate,
            "≥ 50,000 jobs/s",
            sub_rate >= 50_000,
            note=(
                f"{scaled.strip()} CPU µs/job — submit: "
                + ", ".join(f"{k} {1e6 * v / n:.1f}" for k, v in sub_cpu.used.items())
                + "; raw: "
                + ", ".join(f"{k} {1e6 * v / n:.1f}" for k, v in raw_cpu.used.items())
            ).strip(),
        ),
        Row(
            "queue_scale",
            "Redis memory per queued job, payload excluded",
            per_job,
            "B",
            per_raw,
            "raw RPUSH floor, payload excluded",
            per_job / per_raw if per_raw > 0 else None,
            "≤ 300 B",
            per_job <= 300,
            note=f"used_memory delta {sub_mem / 2**20:,.0f} MB for {n:,} jobs, payload "
            f"{sub_pay / n:.0f} B/job (params JSON); the floor's delta "
            f"{raw_mem / 2**20:,.0f} MB",
        ),
        Row(
            "queue_scale",
            f"time per JobQueue.pick, {tenants:,} backlogged tenants vs 1",
            per_many,
            "ms",
            per_one,
            "1 backlogged tenant",
            per_many / per_one,
            "≤ 1.2x",
            per_many / per_one <= 1.2,
            note=f"{blocks} alternating blocks of {block} sequential picks each; "
            f"setting up the tenants (TenantStore.put + JobQueue.submit each) took "
            f"{setup_s:.0f} s" + ("" if tenants >= 10_000 else "; --quick: the issue asks 10,000"),
        ),
    ]


if __name__ == "__main__":
    run_standalone(run, jobs=int, tenants=int)
