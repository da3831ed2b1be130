"""The per-request ledger (issue 18, item 1): Redis memory per entry and the cost of writing
it in the settle.

    .venv/bin/python bench/bench_ledger.py [--quick]

Memory: N reservations settled through ``Admission`` (the real path: reserve.lua stores the
meta, settle.lua appends the entry), then ``MEMORY USAGE <ledger> SAMPLES 0`` / N, for a
typical entry (source ``batch:<id>/<custom_id>``, two tags, a key id) and a bare one (no
meta). Throughput: settle decisions per second through settle.lua with and without the
ledger's KEYS[9] (the same reservations' shape, 50 per call, alternating rounds in the same
run, so the ratio is what the ledger costs on this machine now)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Options, Row, redis_server, run_standalone

from budgeter.admission.admission import Admission, Usage, settle_keys
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.ledger.entry import batch_source
from budgeter.store.scripts import register
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore

PRICE = ModelPrice(input=3, output=15, cache_write=3.75, cache_read=0.3)
MODEL = "claude-sonnet-4-6"
COMMAND = ".venv/bin/python bench/bench_ledger.py"
TARGET_BYTES = 200


async def _admission(redis: RedisClient, tenant: str) -> Admission:
    await TenantStore(redis).put(tenant, TenantPolicy())
    return Admission(redis, prices=PriceTable({MODEL: PRICE}, bundled=False))


def _meta(rid: str) -> dict[str, object]:
    return {
        "s": batch_source("msgbatch_01HZX3N5Q8", f"req-{rid[12:18]}"),
        "g": {"team": "search", "feature": "rerank"},
        "k": "key_3f9a1c0d5e7b2a46",
    }


async def bytes_per_entry(redis: RedisClient, tenant: str, n: int, *, meta: bool) -> float:
    adm = await _admission(redis, tenant)
    chunk = 200
    for start in range(0, n, chunk):
        rids = [f"msgbatch_01ab{k:06d}#1" for k in range(start, min(start + chunk, n))]
        await asyncio.gather(
            *(
                adm.reserve(tenant, rid, 1500, 400, model=MODEL, meta=_meta(rid) if meta else None)
                for rid in rids
            )
        )
        await asyncio.gather(*(adm.settle(tenant, rid, Usage(1234, 321, 0, 800)) for rid in rids))
    key = adm.keys(tenant).ledger
    assert int(await redis.xlen(key)) == n
    return int(await redis.memory_usage(key, samples=0) or 0) / n


async def settle_rates(redis: RedisClient, rounds: int, per_round: int) -> tuple[float, float]:
    """Settle decisions per second: (with the ledger, without), 50 reservations a call."""
    adm = await _admission(redis, "rate")
    settle = register(redis, "admission/settle.lua")
    names = settle_keys(adm.keys("rate"), ledger=True)
    spent = {True: 0.0, False: 0.0}
    done = {True: 0, False: 0}
    n = 0
    meta = {"s": "req_0123456789abcdef01234567", "g": {"team": "search"}}
    for r in range(rounds):
        ledger = r % 2 == 0
        ids = [f"q{n + k}" for k in range(per_round)]
        n += per_round
        await asyncio.gather(
            *(adm.reserve("rate", rid, 100, 100, model=MODEL, meta=meta) for rid in ids)
        )
        keys = names[:9] if ledger else names[:8]
        t0 = time.perf_counter()
        for i in range(0, len(ids), 50):
            items = ",".join(f'["usage","{rid}",90,80,0,0]' for rid in ids[i : i + 50])
            args: list[str | int] = ["", f"[{items}]"]
            if ledger:
                args.insert(1, adm.ledger_retention_ms)
            await settle(keys=list(keys), args=args)
        spent[ledger] += time.perf_counter() - t0
        done[ledger] += per_round
    return done[True] / spent[True], done[False] / spent[False]


async def run(opts: Options) -> list[Row]:
    n = 2000 if opts.quick else 10_000
    rounds, per_round = (4, 2000) if opts.quick else (8, 5000)
    async with redis_server("ledger") as (_server, redis):
        typical = await bytes_per_entry(redis, "typical", n, meta=True)
        bare = await bytes_per_entry(redis, "bare", n, meta=False)
        with_ledger, without = await settle_rates(redis, rounds, per_round)
    note = f"{n} entries, MEMORY USAGE SAMPLES 0 / n"
    return [
        Row("ledger", "ledger bytes per entry (source, 2 tags, key)", typical, "B", bare,
            "bare entry (no meta)", typical / bare, f"<= {TARGET_BYTES} B",
            typical <= TARGET_BYTES, note, COMMAND),
        Row("ledger", "settle decisions/s with the ledger", with_ledger, "/s", without,
            "without the ledger (same run)", with_ledger / without, "informational", None,
            "50 reservations a call, alternating rounds", COMMAND),
    ]  # fmt: skip


if __name__ == "__main__":
    run_standalone(run)
