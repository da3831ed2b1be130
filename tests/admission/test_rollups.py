"""Per-minute rollups written by admission/settle.lua (issue 18, item 5) into the tenant's
``minutes`` hash (KEYS[10], the tenant's own scope only): exact fields per minute and kind,
48 h kept (older minutes deleted as the clock moves, a sweep after a long pause, the hash
expiring 48 h after its last write), and the reader's dense rows."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.tenants.rollups import (
    KINDS,
    MINUTES_KEPT,
    format_field,
    minute_of,
    minutes_from_fields,
    parse_field,
    read_minutes,
)
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z, a minute boundary
M = minute_of(NOW)
MIN = 60_000
MODEL = "claude-x"
PRICE = ModelPrice(input=3, output=15, cache_write=3.75, cache_read=0.3)


async def make(redis: Redis, *, priced: bool = False) -> Admission:
    await TenantStore(redis).put("acme", TenantPolicy(budgets={"day": 100_000_000}))
    table = {MODEL: PRICE} if priced else {}
    return Admission(redis, prices=PriceTable(table, bundled=False))


async def spend(adm: Admission, rid: str, usage: Usage, *, at: int) -> None:
    assert (await adm.reserve("acme", rid, 100, 100, model=MODEL, now_ms=at)).kind == "ADMIT"
    assert (await adm.settle("acme", rid, usage, now_ms=at)).settled == 1


async def fields(adm: Admission) -> dict[str, str]:
    got = await adm.redis.hgetall(adm.keys("acme").minutes)
    return {str(k): str(v) for k, v in got.items()}


def test_field_format_round_trips() -> None:
    for kind in KINDS:
        assert parse_field(format_field(29_403_360, kind)) == (29_403_360, kind)
    for other in ("trimmed", "12:bogus", "x:input", ":input", "12"):
        assert parse_field(other) is None


async def test_one_settle_writes_each_kind_charged_in_its_minute(redis: Redis) -> None:
    adm = await make(redis, priced=True)
    await spend(adm, "r1", Usage(10, 20, 3, 4), at=NOW + 59_999)
    got = await fields(adm)
    usd = (10 * 3 + 20 * 15 + 3 * 3.75 + 4 * 0.3) / 1e6
    assert got == {
        f"{M}:input": "10",
        f"{M}:output": "20",
        f"{M}:cache_creation": "3",
        f"{M}:cache_read": "4",
        f"{M}:usd": f"{usd:.6f}".rstrip("0"),
        "trimmed": str(M - MINUTES_KEPT + 1),
    }
    ttl = await redis.pttl(adm.keys("acme").minutes)
    assert MINUTES_KEPT * MIN - 5_000 < ttl <= MINUTES_KEPT * MIN


async def test_kinds_not_charged_have_no_field_and_minutes_add_up(redis: Redis) -> None:
    adm = await make(redis)
    await spend(adm, "r1", Usage(10, 20), at=NOW)
    await spend(adm, "r2", Usage(1, 2), at=NOW + 1_000)
    await spend(adm, "r3", Usage(0, 5), at=NOW + MIN)
    got = await fields(adm)
    assert got == {
        f"{M}:input": "11",
        f"{M}:output": "22",
        f"{M + 1}:output": "5",
        "trimmed": str(M + 1 - MINUTES_KEPT + 1),
    }


async def test_settles_batched_in_one_call_sum(redis: Redis) -> None:
    adm = await make(redis)
    for i in range(5):
        decision = await adm.reserve("acme", f"r{i}", 1, 10, model=MODEL, now_ms=NOW)
        assert decision.kind == "ADMIT"
    await asyncio.gather(*(adm.settle("acme", f"r{i}", Usage(i, 1), now_ms=NOW) for i in range(5)))
    got = await fields(adm)
    assert got[f"{M}:input"] == "10" and got[f"{M}:output"] == "5"


async def test_a_release_writes_nothing_and_a_reap_charge_counts(redis: Redis) -> None:
    adm = await make(redis)
    assert (await adm.reserve("acme", "r1", 7, 9, model=MODEL, now_ms=NOW)).kind == "ADMIT"
    await adm.release("acme", "r1", now_ms=NOW)
    assert await redis.exists(adm.keys("acme").minutes) == 0
    assert (await adm.reserve("acme", "r2", 7, 9, model=MODEL, now_ms=NOW)).kind == "ADMIT"
    assert await adm.mark_sent("acme", "r2")
    later = NOW + 10 * MIN
    assert (await adm.reap("acme", now_ms=later)).charged_full == 1
    got = await fields(adm)
    assert got == {
        f"{M + 10}:input": "7",
        f"{M + 10}:output": "9",
        "trimmed": str(M + 10 - MINUTES_KEPT + 1),
    }


async def test_minutes_older_than_48_hours_are_deleted_as_time_moves(redis: Redis) -> None:
    adm = await make(redis)
    await spend(adm, "r1", Usage(1, 0), at=NOW)
    await spend(adm, "r2", Usage(2, 0), at=NOW + MIN)
    await spend(adm, "r3", Usage(3, 0), at=NOW + (MINUTES_KEPT - 1) * MIN)  # M still kept
    assert f"{M}:input" in await fields(adm)
    await spend(adm, "r4", Usage(4, 0), at=NOW + MINUTES_KEPT * MIN)  # M is 48 h old
    got = await fields(adm)
    assert got == {
        f"{M + 1}:input": "2",
        f"{M + MINUTES_KEPT - 1}:input": "3",
        f"{M + MINUTES_KEPT}:input": "4",
        "trimmed": str(M + 1),
    }
    await spend(adm, "r5", Usage(5, 0), at=NOW + 10 * MIN)  # a clock behind: trims nothing
    got = await fields(adm)
    assert got["trimmed"] == str(M + 1) and got[f"{M + 10}:input"] == "5"
    assert f"{M + 1}:input" in got


async def test_after_a_long_pause_a_sweep_deletes_what_is_too_old(redis: Redis) -> None:
    adm = await make(redis)
    await spend(adm, "r1", Usage(1, 0), at=NOW)
    await spend(adm, "r2", Usage(2, 0), at=NOW + 101 * MIN)
    await spend(adm, "r3", Usage(3, 0), at=NOW + (MINUTES_KEPT + 100) * MIN)
    got = await fields(adm)
    assert got == {
        f"{M + 101}:input": "2",  # exactly the oldest minute kept
        f"{M + MINUTES_KEPT + 100}:input": "3",
        "trimmed": str(M + 101),
    }


async def test_only_the_tenants_own_scope_writes_rollups(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("acme", TenantPolicy(budgets={"day": 1000}))
    adm = Admission(redis, prices=PriceTable({}, bundled=False))
    await spend(adm, "r1", Usage(5, 5), at=NOW)
    keys = [k async for k in redis.scan_iter(match="*minutes*")]
    assert keys == [adm.keys("acme").minutes]


async def test_read_minutes_gives_dense_rows_from_since(redis: Redis) -> None:
    adm = await make(redis, priced=True)
    await spend(adm, "r1", Usage(10, 20), at=NOW + 2 * MIN)
    now = NOW + 4 * MIN + 5
    rows = await read_minutes(redis, adm.keys("acme"), since_ms=NOW, now_ms=now)
    assert [r.minute for r in rows] == [M, M + 1, M + 2, M + 3, M + 4]
    assert [r.tokens for r in rows] == [0, 0, 30, 0, 0]
    assert rows[2].usd == round((10 * 3 + 20 * 15) / 1e6, 6)
    assert rows[2].start_ms == NOW + 2 * MIN
    far = await read_minutes(redis, adm.keys("acme"), since_ms=0, now_ms=now)
    assert len(far) == MINUTES_KEPT


def test_minutes_from_fields_ignores_others_and_out_of_range() -> None:
    rows = minutes_from_fields(
        {"trimmed": "1", f"{M}:input": "3", f"{M + 9}:input": "4", f"{M}:usd": "0.5"}, M, M
    )
    assert len(rows) == 1 and rows[0].input == 3 and rows[0].usd == 0.5


async def test_up_to_an_hour_on_only_those_minutes_are_deleted_past_it_a_sweep(
    redis: Redis,
) -> None:
    """The clock moving by up to 60 minutes deletes just those minutes' fields (no walk
    over the hash); more, and one sweep deletes every field older than 48 h. A planted
    ancient field shows which ran."""
    adm = await make(redis)
    key = adm.keys("acme").minutes
    await spend(adm, "r1", Usage(1, 0), at=NOW)
    await redis.hset(key, format_field(5, "input"), "9")
    await spend(adm, "r2", Usage(1, 0), at=NOW + 60 * MIN)  # trimmed moves by exactly 60
    assert await redis.hget(key, format_field(5, "input")) == "9"
    await spend(adm, "r3", Usage(1, 0), at=NOW + 121 * MIN)  # by 61: a sweep
    assert await redis.hget(key, format_field(5, "input")) is None
    assert len(await fields(adm)) == 4  # the three minutes and 'trimmed'


async def test_a_cache_only_or_zero_settle_and_the_expiry_moved_once_a_minute(
    redis: Redis,
) -> None:
    adm = await make(redis)
    key = adm.keys("acme").minutes
    await spend(adm, "r1", Usage(0, 0, 0, 6), at=NOW)  # cache reads alone
    assert await fields(adm) == {f"{M}:cache_read": "6", "trimmed": str(M - MINUTES_KEPT + 1)}
    await spend(adm, "r2", Usage(0, 0, 5, 0), at=NOW)
    assert (await fields(adm))[f"{M}:cache_creation"] == "5"
    await redis.pexpire(key, 1_000_000)
    await spend(adm, "r3", Usage(0, 0), at=NOW + 30_000)  # same minute: expiry left alone
    assert 0 < await redis.pttl(key) <= 1_000_000
    await spend(adm, "r4", Usage(0, 0), at=NOW + MIN)  # a settle of nothing, next minute
    assert await redis.pttl(key) > 1_000_000
    assert (await fields(adm))["trimmed"] == str(M + 1 - MINUTES_KEPT + 1)
