"""Redis memory of one tenant's per-minute rollups (issue 18, item 5) after 48 h of
settles, one per minute, through the real settle path (admission/settle.lua, KEYS[10]).

    .venv/bin/python bench/rollup_memory.py

Prints MEMORY USAGE of the tenant's ``minutes`` hash (SAMPLES 0: every field) for a
typical mix (input, output, cache_read, usd: 4 fields a minute) and the worst case (all
five kinds every minute), and the fields kept (48 h = 2,880 minutes); then settle calls
per second with and without KEYS[10] (the ledger's KEYS[9] in both), alternating rounds in
the same run."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgeter.admission.admission import Admission, Usage, settle_keys
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis
from budgeter.store.scripts import register
from budgeter.tenants.rollups import MINUTES_KEPT
from budgeter.tenants.store import TenantStore

START = 1_764_201_600_000
PRICE = ModelPrice(input=3, output=15, cache_write=3.75, cache_read=0.3)


async def fill(url: str, tenant: str, usage: Usage, minutes: int) -> tuple[int, int]:
    redis = make_redis(url)
    try:
        await TenantStore(redis).put(tenant, TenantPolicy())
        adm = Admission(redis, prices=PriceTable({"m": PRICE}, bundled=False))
        for k in range(minutes):
            at = START + k * 60_000
            await adm.reserve(tenant, f"r{k}", 5000, 1000, model="m", now_ms=at)
            await adm.settle(tenant, f"r{k}", usage, now_ms=at)
        key = adm.keys(tenant).minutes
        return int(await redis.memory_usage(key, samples=0) or 0), int(await redis.hlen(key))
    finally:
        await redis.aclose()


async def settle_rate(
    url: str, rounds: int = 8, per_round: int = 500
) -> tuple[float, float, float, float]:
    """Settle calls per second, one reservation a call: (without KEYS[10], with it)."""
    redis = make_redis(url)
    try:
        await TenantStore(redis).put("rate", TenantPolicy())
        adm = Admission(redis, prices=PriceTable({"m": PRICE}, bundled=False))
        settle = register(redis, "admission/settle.lua")
        keys = settle_keys(adm.keys("rate"), ledger=True)
        spent = {9: 0.0, 10: 0.0}
        done = {9: 0, 10: 0}
        server_us = {9: 0.0, 10: 0.0}  # Redis' own time in the script calls (commandstats)
        n = 0
        for r in range(rounds):
            width = 9 if r % 2 == 0 else 10
            ids = []
            for _ in range(per_round):
                n += 1
                await adm.reserve("rate", f"q{n}", 100, 100, model="m", now_ms=START)
                ids.append(f"q{n}")
            await redis.config_resetstat()
            t0 = time.perf_counter()
            for k, rid in enumerate(ids):  # a new minute every 20 settles
                item = f'[["usage","{rid}",90,80,0,0]]'
                at = START + (n + k) // 20 * 60_000
                await settle(keys=keys[:width], args=[at, adm.ledger_retention_ms, item])
            spent[width] += time.perf_counter() - t0
            stats = await redis.info("commandstats")
            server_us[width] += float(stats["cmdstat_evalsha"]["usec"])
            done[width] += per_round
        return (
            done[9] / spent[9],
            done[10] / spent[10],
            server_us[9] / done[9],
            server_us[10] / done[10],
        )
    finally:
        await redis.aclose()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), appendonly=False)
        server.start()
        try:
            minutes = MINUTES_KEPT + 120  # past 48 h: the oldest are trimmed
            typical = await fill(server.url, "typical", Usage(1234, 567, 0, 4321), minutes)
            worst = await fill(server.url, "worst", Usage(123456, 65432, 4321, 98765), minutes)
            without, with_rollups, us_without, us_with = await settle_rate(server.url)
        finally:
            server.stop()
    for name, (size, fields) in (("typical (4 kinds)", typical), ("worst (5 kinds)", worst)):
        print(
            f"{name}: {size:,} B for {fields:,} fields after {minutes:,} minutes "
            f"({size / MINUTES_KEPT:.0f} B a minute, {size / max(1, fields - 1):.0f} B a field)"
        )

    print(
        f"settle calls/s: {without:,.0f} without KEYS[10], {with_rollups:,.0f} with it "
        f"({(with_rollups / without - 1) * 100:+.1f} %, client side, noisy on a shared machine)"
    )
    print(
        f"Redis time per settle call: {us_without:.1f} us without KEYS[10], {us_with:.1f} us "
        f"with it ({(us_with / us_without - 1) * 100:+.1f} %)"
    )


if __name__ == "__main__":
    asyncio.run(main())
