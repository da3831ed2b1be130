"""The per-request ledger written by admission/settle.lua (issue 18, item 1) in the same
call as the tenant scope's counters: one exact entry per settled reservation (usage, full,
release, and the reaper's charge-full and release), none from the other scopes, per-key
usage fields, MINID trimming; and the home module's formats round-trip."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage, settle_keys
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.ledger.entry import (
    FIELDS,
    KEY_USAGE_KINDS,
    KeyUsageField,
    LedgerEntry,
    Meta,
    batch_source,
    format_entry,
    format_key_usage_field,
    format_meta,
    meta_of_reservation,
    parse_batch_source,
    parse_entry,
    parse_key_usage_field,
    parse_meta,
)
from budgeter.ledger.read import LedgerFilter, iter_entries, read_page
from budgeter.tenants.store import TenantStore

MODEL = "claude-x"
PRICE = ModelPrice(input=3, output=15, cache_write=3.75, cache_read=0.3)
META: dict[str, object] = {
    "s": "batch:b1/c-1",
    "g": {"team": "search", "user": 'u,="1'},
    "k": "key1",
}


async def make(redis: Redis, **kw: float) -> Admission:
    await TenantStore(redis).put("acme", TenantPolicy(budgets={"day": 100_000_000}))
    return Admission(redis, prices=PriceTable({MODEL: PRICE}, bundled=False), **kw)  # type: ignore[arg-type]


async def entries(adm: Admission) -> list[LedgerEntry]:
    return [e async for e in iter_entries(adm.redis, adm.keys("acme"), LedgerFilter(), page=2)]


async def reserve(adm: Admission, rid: str, meta: dict[str, object] | None = None) -> None:
    decision = await adm.reserve("acme", rid, 100, 50, model=MODEL, meta=meta)
    assert decision.kind == "ADMIT"


def test_formats_round_trip() -> None:
    meta = Meta(s="req_1", g={"team": "a"}, k="k1", a=["org", "dept"])
    assert parse_meta(format_meta(meta)) == meta
    assert format_meta(Meta()) == "" and parse_meta("") == Meta()
    # as reserve.lua embeds it in the reservation's record
    record = '{"i":1,"o":2,"t":3,"m":"m","b":{},"r":{},"x":' + format_meta(meta) + "}"
    assert meta_of_reservation(record) == meta
    assert meta_of_reservation(record.encode()) == meta
    for bad in ('{"i":1}', "not json", '{"x":[1]}', '{"x":{"a":"org"}}', "[]"):
        assert meta_of_reservation(bad) == Meta()
    entry = LedgerEntry(
        id="5-0", time_ms=5, tenant="t", key="k", ancestors=["o"], model="m", input=1,
        output=2, cache_creation=3, cache_read=4, usd=0.25, reserved=9, outcome="released",
        source="batch:b/c", tags={"a": "b"},
    )  # fmt: skip
    fields = format_entry(entry)
    assert tuple(fields) == FIELDS
    assert parse_entry("t", "5-0", fields) == entry
    bare = LedgerEntry(id="7-1", time_ms=7, tenant="t", model="m", outcome="settled")
    assert (
        parse_entry("t", b"7-1", {k.encode(): v.encode() for k, v in format_entry(bare).items()})
        == bare
    )
    for kind in KEY_USAGE_KINDS:
        f = KeyUsageField(key="k1", period="day", period_id="2026-12-02", model="a:b", kind=kind)
        assert parse_key_usage_field(format_key_usage_field(f)) == f
    for other in ("day:2026-12-02:m:input", "k:a:b:c", "k:a:day:x:m:bogus", "k:a:day:x::input"):
        assert parse_key_usage_field(other) is None
    assert parse_batch_source(batch_source("b1", "c/1")) == ("b1", "c/1")
    assert parse_batch_source("req_1") is None and parse_batch_source("batch:x") is None


async def test_settle_appends_one_exact_entry(redis: Redis) -> None:
    adm = await make(redis)
    await reserve(adm, "r1", {**META, "a": ["org", "dept"]})
    assert (await adm.settle("acme", "r1", Usage(10, 20, 3, 4))).settled == 1
    assert (await adm.settle("acme", "r1", Usage(10, 20, 3, 4))).settled == 0  # once
    (e,) = await entries(adm)
    usd = round((10 * 3 + 20 * 15 + 3 * 3.75 + 4 * 0.3) / 1e6, 6)
    assert e.model_dump(exclude={"id", "time_ms"}) == {
        "tenant": "acme", "key": "key1", "ancestors": ["org", "dept"], "model": MODEL,
        "input": 10, "output": 20, "cache_creation": 3, "cache_read": 4, "usd": usd,
        "reserved": 150, "outcome": "settled", "source": "batch:b1/c-1",
        "tags": {"team": "search", "user": "u,=\"1"},
    }  # fmt: skip
    raw: Any = await redis.xrange(adm.keys("acme").ledger)
    assert tuple(raw[0][1]) == FIELDS
    t = await redis.time()
    assert abs(e.time_ms - (int(t[0]) * 1000 + int(t[1]) // 1000)) < 600_000


async def test_full_release_and_no_meta(redis: Redis) -> None:
    adm = await make(redis)
    await reserve(adm, "r1")
    await reserve(adm, "r2", {"s": "req_2"})
    await adm.charge_full("acme", "r1")
    await adm.release("acme", "r2")
    e1, e2 = await entries(adm)
    assert (e1.outcome, e1.input, e1.output, e1.cache_creation, e1.cache_read) == (
        "charged_full",
        100,
        50,
        0,
        0,
    )
    assert e1.usd == round(
        (100 * 3.75 + 50 * 15) / 1e6, 6
    )  # the dearest: reserved and e1.reserved == 150
    assert (e1.key, e1.ancestors, e1.source, e1.tags) == (None, [], "", {})
    assert (e2.outcome, e2.tokens, e2.usd, e2.source, e2.reserved) == (
        "released",
        0,
        0,
        "req_2",
        150,
    )


async def test_reap_writes_entries(redis: Redis) -> None:
    adm = await make(redis)
    for rid in ("sent", "unsent"):
        d = await adm.reserve("acme", rid, 100, 50, model=MODEL, hold_ms=1, meta={"s": rid})
        assert d.kind == "ADMIT"
    assert await adm.mark_sent("acme", "sent")
    await asyncio.sleep(0.01)
    result = await adm.reap("acme")
    assert (result.charged_full, result.released) == (1, 1)
    got = {e.source: (e.outcome, e.tokens) for e in await entries(adm)}
    assert got == {"sent": ("charged_full", 150), "unsent": ("released", 0)}


async def test_only_the_tenant_scope_writes_and_per_key_usage(redis: Redis) -> None:
    adm = await make(redis)
    await reserve(adm, "r1", META)
    await reserve(adm, "r2", {"k": "key2"})
    keys = adm.keys("acme")
    assert len(settle_keys(keys)) == 8 and len(settle_keys(keys, ledger=True)) == 10
    await adm.settle("acme", "r1", Usage(10, 20, 3, 4))
    await adm.charge_full("acme", "r2")
    usage = await redis.hgetall(keys.usage)
    per_key: dict[tuple[str, str, str], float] = {}
    for field, value in usage.items():
        f = parse_key_usage_field(field)
        if f is not None:
            assert f.model == MODEL
            per_key[(f.key, f.period, f.kind)] = float(value)
    usd1 = round((10 * 3 + 20 * 15 + 3 * 3.75 + 4 * 0.3) / 1e6, 6)
    usd2 = round((100 * 3.75 + 50 * 15) / 1e6, 6)  # the dearest: reserved
    want: dict[tuple[str, str, str], float] = {}
    for per in ("day", "month", "total"):
        want |= {
            ("key1", per, "input"): 10, ("key1", per, "output"): 20,
            ("key1", per, "cache_creation"): 3, ("key1", per, "cache_read"): 4,
            ("key1", per, "requests"): 1, ("key1", per, "usd"): usd1,
            ("key2", per, "input"): 100, ("key2", per, "output"): 50,
            ("key2", per, "requests"): 1, ("key2", per, "usd"): usd2,
        }  # fmt: skip
    assert per_key == want
    # nothing used, unpriced: the key's requests only (no zero fields)
    d = await adm.reserve("acme", "r4", 100, 50, model="unpriced", meta={"k": "key4"})
    assert d.kind == "ADMIT"
    await adm.settle("acme", "r4", Usage(0, 0, 0, 0))
    key4 = sorted(str(f) for f in await redis.hkeys(keys.usage) if str(f).startswith("k:key4:"))
    assert [f.rsplit(":", 1)[1] for f in key4] == ["requests"] * 3
    # a released reservation adds no per-key usage
    await reserve(adm, "r3", {"k": "key3"})
    await adm.release("acme", "r3")
    assert not [f for f in await redis.hkeys(keys.usage) if str(f).startswith("k:key3:")]


async def test_minid_trims_past_the_retention(redis: Redis) -> None:
    adm = await make(redis, ledger_retention_days=1e-12)  # 1 ms
    await reserve(adm, "r1")
    await adm.settle("acme", "r1", Usage(1, 1))
    await asyncio.sleep(0.01)
    await reserve(adm, "r2")
    await adm.settle("acme", "r2", Usage(2, 2))
    assert [e.input for e in await entries(adm)] == [2]
    await reserve(adm, "r3")
    await asyncio.sleep(0.01)
    await adm.reap("acme", now_ms=10**15)
    assert [e.outcome for e in await entries(adm)] == ["released"]
    kept = await make(redis)  # 35 days: nothing trimmed
    await reserve(kept, "r4")
    await kept.settle("acme", "r4", Usage(4, 4))
    assert [e.input for e in await entries(kept)] == [0, 4]


async def test_pages_and_filters(redis: Redis) -> None:
    adm = await make(redis)
    for n in range(7):
        rid = f"r{n}"
        await reserve(adm, rid, {"g": {"team": "a" if n % 2 else "b"}})
        await adm.settle("acme", rid, Usage(n + 1, 0))
    keys = adm.keys("acme")
    page = await read_page(redis, keys, LedgerFilter(), limit=3)
    assert [e.input for e in page.entries] == [1, 2, 3] and page.next_cursor == page.entries[-1].id
    page = await read_page(redis, keys, LedgerFilter(), cursor=page.next_cursor, limit=3)
    assert [e.input for e in page.entries] == [4, 5, 6]
    team_a = LedgerFilter(tag=("team", "a"))
    got = [e.input async for e in iter_entries(redis, keys, team_a, page=2)]
    assert got == [2, 4, 6]
    page = await read_page(redis, keys, team_a, limit=10, scan=3)  # scanned 3: go on from there
    assert [e.input for e in page.entries] == [2] and page.next_cursor is not None
    assert not (await read_page(redis, keys, LedgerFilter(model="other"))).entries
    first = (await read_page(redis, keys, LedgerFilter(), limit=1)).entries[0]
    window = LedgerFilter(since_ms=first.time_ms, until_ms=first.time_ms + 1)
    assert all(e.time_ms == first.time_ms for e in (await read_page(redis, keys, window)).entries)
    assert not (await read_page(redis, keys, LedgerFilter(until_ms=first.time_ms))).entries
