"""Prices: the price argument's one format (domain/price_arg.py, lib/prices.lua), the table
from genai-prices' bundled data (offline) with BUDGETER_PRICES over it, long-context tiers
reserved and settled at the tier, and an unpriced model refused under a usd budget."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator

import aiohttp
import genai_prices
import pytest
from genai_prices.data_snapshot import DataSnapshot, set_custom_snapshot
from hypothesis import given
from hypothesis import strategies as st
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.price_arg import PriceArg, Rates, Tier, format_price_arg, parse_price_arg
from budgeter.domain.pricing import (
    GENAI_PRICES_VERSION,
    ModelPrice,
    PriceTable,
    PriceTier,
    bundled_price,
    price_of,
)
from budgeter.settings import Settings
from budgeter.store.scripts import lua_source
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from tests.admission import reference_model as ref
from tests.api.test_proxy import ask
from tests.api.test_proxy_charges import ANSWER_OUTPUT, COUNTED, scripted_proxy

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
DAY = dt.date(2025, 11, 27)
LATER = dt.date(2026, 12, 1)  # after claude-sonnet-4-6's long-context tier was dropped

# ---------------------------------------------------------------- the price argument

prices = st.floats(0, 1000, allow_nan=False, allow_subnormal=False) | st.sampled_from(
    [0.0, 0.3, 3.75, 22.5, 1e-07, 0.1 + 0.2]
)
rates = st.builds(Rates, prices, prices, prices, prices)
price_args = st.builds(
    lambda base, tiers: PriceArg(base, tuple(Tier(a, r) for a, r in sorted(tiers.items()))),
    rates,
    st.dictionaries(st.integers(1, 10**7), rates, max_size=4),
)


@given(price_args)
def test_parse_inverts_format(arg: PriceArg) -> None:
    text = format_price_arg(arg)
    assert parse_price_arg(text) == arg
    assert format_price_arg(parse_price_arg(text)) == text


def test_the_format_reads_as_lib_prices_lua_documents_it() -> None:
    arg = parse_price_arg("3 15 3.75 0.3 200000 6 22.5 7.5 0.6")
    assert arg.base == Rates(3, 15, 3.75, 0.3)
    assert arg.tiers == (Tier(200_000, Rates(6, 22.5, 7.5, 0.6)),)
    assert arg.rates_at(200_000) == arg.base and arg.rates_at(200_001) == arg.tiers[0].rates
    assert ModelPrice(input=3, output=15).lua_arg() == "3 15 3.75 0.3"  # the old format


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3 15 3.75",
        "3 15 3.75 0.3 200000",
        "3 15 3.75 0.3 0 1 1 1 1",  # a threshold of 0
        "3 -1 0 0",
        "nan 1 1 1",
        "1_0 1 1 1",
        "3 15 3.75 0.3 9 1 1 1 1 5 1 1 1 1",  # descending
        "3 15 3.75 0.3 1.5 1 1 1 1",
        "3  15 1 1",
    ],
)
def test_a_bad_price_argument_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a price argument"):
        parse_price_arg(text)


PROBE = """
local p = prices_parse(ARGV[1])
local n = {}
for i = 2, 6 do n[i] = tonumber(ARGV[i]) end
local r = prices_at(p, n[3] + n[5] + n[6])
return {string.format('%.17g', prices_reserve(p, n[2], n[4])),
        string.format('%.17g', prices_usage(p, n[3], n[4], n[5], n[6])),
        string.format('%.17g', r[1]), string.format('%.17g', r[4])}
"""


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[SyncRedis]:
    client = SyncRedis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@given(
    arg=price_args,
    counted=st.integers(0, 10**7),
    used=st.tuples(*[st.integers(0, 10**7)] * 4),
)
def test_lib_prices_lua_prices_as_the_python_side_reads_the_format(
    sync_redis: SyncRedis, arg: PriceArg, counted: int, used: tuple[int, int, int, int]
) -> None:
    a_in, a_out, a_cc, a_cr = used
    got = sync_redis.eval(
        lua_source("lib/prices.lua") + PROBE,
        0,
        format_price_arg(arg),
        counted,
        a_in,
        a_out,
        a_cc,
        a_cr,
    )
    rates_now = arg.rates_at(a_in + a_cc + a_cr)
    assert [float(x) for x in got] == [
        ref.reserve_usd(arg, counted, a_out),
        ref.usd_of(used, arg),
        rates_now.input,
        rates_now.cache_read,
    ]


# ---------------------------------------------------------------- the table


def genai_usd(
    model: str, day: dt.date, a_in: int, a_out: int, a_cc: int = 0, a_cr: int = 0
) -> float:
    """What genai-prices itself charges (its input_tokens include the cache's)."""
    usage = genai_prices.Usage(
        input_tokens=a_in + a_cc + a_cr,
        output_tokens=a_out,
        cache_write_tokens=a_cc,
        cache_read_tokens=a_cr,
    )
    when = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
    calc = genai_prices.calc_price(
        usage, model, provider_id="anthropic", genai_request_timestamp=when
    )
    return float(calc.total_price)


def table_usd(
    model: str, day: dt.date, a_in: int, a_out: int, a_cc: int = 0, a_cr: int = 0
) -> float:
    """What settle.lua charges at the table's price (the price argument as Lua reads it)."""
    price = PriceTable().price(model, day)
    assert price is not None, model
    return ref.usd_of((a_in, a_out, a_cc, a_cr), parse_price_arg(price.lua_arg()))


USAGES = [
    (1000, 100),
    (1000, 100, 200, 300),
    (300_000, 1000),  # long context
    (200_000, 10),  # exactly at the threshold: still the base
    (10_000, 100, 100_000, 100_000),  # over 200k with the cache's tokens
]
MODELS = [
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-20250514",
    "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-20250219",
    "claude-opus-4-6",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-1-20250805",
]


def test_the_table_prices_as_genai_prices_says() -> None:
    for model in MODELS:
        for day in (DAY, LATER):
            for usage in USAGES:
                assert table_usd(model, day, *usage) == pytest.approx(
                    genai_usd(model, day, *usage), rel=1e-12
                ), (model, day, usage)


def test_hand_checked_prices() -> None:
    # claude-sonnet-4-5: $3 in / $15 out, over 200k input tokens $6 / $22.5 on every token
    assert table_usd("claude-sonnet-4-5-20250929", LATER, 300_000, 1000) == pytest.approx(1.8225)
    assert table_usd("claude-sonnet-4-5", LATER, 100_000, 1000) == pytest.approx(0.315)
    # the cache's tokens count toward the tier: 50k + 100k written + 100k read > 200k
    assert table_usd("claude-sonnet-4-5", LATER, 50_000, 100, 100_000, 100_000) == pytest.approx(
        50_000 * 6e-6 + 100 * 22.5e-6 + 100_000 * 7.5e-6 + 100_000 * 0.6e-6
    )
    # the README's model: tiered until 2026-03-13, one price for its whole context since
    assert table_usd("claude-sonnet-4-6", DAY, 300_000, 1000) == pytest.approx(1.8225)
    assert table_usd("claude-sonnet-4-6", LATER, 300_000, 1000) == pytest.approx(0.915)
    # dated ids
    assert table_usd("claude-sonnet-4-20250514", LATER, 1_000_000, 1_000_000) == pytest.approx(18)
    assert table_usd("claude-3-5-haiku-20241022", LATER, 1_000_000, 0, 1_000_000, 1_000_000) == (
        pytest.approx(0.8 + 1.0 + 0.08)
    )
    assert table_usd("claude-3-7-sonnet-20250219", LATER, 0, 1_000_000) == pytest.approx(15)
    assert PriceTable().price("claude-sonnet-4-5", LATER) == ModelPrice(
        input=3,
        output=15,
        cache_write=3.75,
        cache_read=0.3,
        tiers=[PriceTier(above=200_000, input=6, output=22.5, cache_write=7.5, cache_read=0.6)],
    )


def test_unknown_models_have_no_price() -> None:
    for model in ("zzz", "gpt-4o", "m0", "claude-nonexistent-9"):
        assert PriceTable().price(model, LATER) is None, model


def test_budgeter_prices_override_and_add_by_name_prefix_then_star(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "BUDGETER_PRICES",
        '{"claude-sonnet-4-6": {"input": 1, "output": 2},'
        ' "claude-opus": {"input": 4, "output": 8},'
        ' "my-model": {"input": 1, "output": 1,'
        '              "tiers": [{"above": 1000, "input": 2, "output": 3}]},'
        ' "*": {"input": 9, "output": 9}}',
    )
    table = PriceTable(Settings().prices)
    assert table.price("claude-sonnet-4-6").lua_arg() == "1 2 1.25 0.1"  # type: ignore[union-attr]
    assert table.price("claude-opus-4-5-20251101").input == 4  # type: ignore[union-attr]
    assert table.price("claude-sonnet-4-5").tiers  # type: ignore[union-attr]  # genai-prices'
    assert table.price("my-model-x").lua_arg() == "1 1 1.25 0.1 1000 2 3 2.5 0.2"  # type: ignore[union-attr]
    assert table.price("zzz").input == 9  # type: ignore[union-attr]
    assert "claude-sonnet-4-5" in table.models() and "my-model" in table.models()
    monkeypatch.delenv("BUDGETER_PRICES")
    assert Settings().prices == {}  # nothing of its own: genai-prices' table alone


def test_a_plain_table_matches_exactly_then_by_prefix_then_star() -> None:
    table = {
        "claude-sonnet-4-5": ModelPrice(input=3, output=15),
        "claude": ModelPrice(input=9, output=9),
        "*": ModelPrice(input=1, output=1),
    }
    assert price_of(table, "claude-sonnet-4-5-20250929").input == 3  # type: ignore[union-attr]
    assert price_of(table, "claude-x").input == 9  # type: ignore[union-attr]
    assert price_of(table, "gpt").input == 1  # type: ignore[union-attr]
    assert price_of({}, "gpt") is None


def test_bad_tiers_are_refused() -> None:
    with pytest.raises(ValueError, match="same 'above'"):
        ModelPrice(input=1, output=1, tiers=[PriceTier(above=5, input=1, output=1)] * 2)
    with pytest.raises(ValueError):
        ModelPrice.model_validate(
            {"input": 1, "output": 1, "tiers": [{"above": 0, "input": 1, "output": 1}]}
        )
    # given in any order, kept ascending
    price = ModelPrice(
        input=1,
        output=1,
        tiers=[PriceTier(above=9, input=3, output=3), PriceTier(above=5, input=2, output=2)],
    )
    assert [t.above for t in price.tiers] == [5, 9]


def test_the_table_is_read_offline_and_never_from_an_auto_updated_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("genai-prices tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    # what UpdatePrices would install: budgeter reads its own copy of the bundled data
    set_custom_snapshot(DataSnapshot(providers=[], from_auto_update=True))
    try:
        bundled_price.cache_clear()
        assert PriceTable().price("claude-sonnet-4-6", LATER) is not None
    finally:
        set_custom_snapshot(None)
    assert genai_prices.__version__ == GENAI_PRICES_VERSION
    assert GENAI_PRICES_VERSION.startswith("0.2.")


# ---------------------------------------------------------------- admission


async def usd_row(redis: Redis, tenant: str) -> tuple[float, float]:
    report = await tenant_usage(redis, tenant, now_ms=NOW)
    assert report is not None
    [row] = [r for r in report.budgets if r.unit == "usd"]
    return float(row.used), float(row.reserved)


def approx(used: float, reserved: float) -> object:
    """(used, reserved) dollars as the counters keep them: to the micro-dollar."""
    return pytest.approx((used, reserved), abs=1e-6)


async def test_a_long_context_request_is_reserved_and_settled_at_its_tier(redis: Redis) -> None:
    await TenantStore(redis).put("tier", TenantPolicy(usd_budgets={"day": 100.0}))
    admission = Admission(redis)  # genai-prices' table
    model = "claude-sonnet-4-5-20250929"
    # 300k counted: the tier, all input priced as cache writes: 300k * $7.5 + 1000 * $22.5
    assert (
        await admission.reserve("tier", "long", 300_000, 1000, model=model, now_ms=NOW)
    ).kind == "ADMIT"
    assert await usd_row(redis, "tier") == approx(0, 2.2725)
    await admission.settle("tier", "long", Usage(300_000, 800), now_ms=NOW)
    used = 300_000 * 6e-6 + 800 * 22.5e-6  # 1.818
    assert await usd_row(redis, "tier") == approx(used, 0)
    assert used == pytest.approx(genai_usd(model, DAY, 300_000, 800))

    # the tier is decided by all the input, cache included: 10k + 200.5k read > 200k
    await admission.reserve("tier", "cached", 210_500, 100, model=model, now_ms=NOW)
    await admission.settle("tier", "cached", Usage(10_000, 100, 0, 200_500), now_ms=NOW)
    cached = 10_000 * 6e-6 + 100 * 22.5e-6 + 200_500 * 0.6e-6
    assert await usd_row(redis, "tier") == approx(used + cached, 0)

    # counted over the threshold, really under it: reserved at the tier, settled at the base
    await admission.reserve("tier", "less", 200_010, 100, model=model, now_ms=NOW)
    reserved = 200_010 * 7.5e-6 + 100 * 22.5e-6
    assert await usd_row(redis, "tier") == approx(used + cached, reserved)
    await admission.settle("tier", "less", Usage(199_990, 100), now_ms=NOW)
    base = 199_990 * 3e-6 + 100 * 15e-6
    assert await usd_row(redis, "tier") == approx(used + cached + base, 0)

    # a short request of the same model: the base prices
    await admission.reserve("tier", "short", 1000, 100, model=model, now_ms=NOW)
    assert (await usd_row(redis, "tier"))[1] == pytest.approx(1000 * 3.75e-6 + 100 * 15e-6)


async def test_the_readmes_model_and_dated_ids_are_admitted_under_a_usd_budget(
    redis: Redis,
) -> None:
    await TenantStore(redis).put("dated", TenantPolicy(usd_budgets={"day": 10.0}))
    admission = Admission(redis)
    for n, model in enumerate(["claude-sonnet-4-6", *MODELS[3:6]]):
        decision = await admission.reserve("dated", f"r{n}", 1000, 100, model=model, now_ms=NOW)
        assert decision.kind == "ADMIT", (model, decision.reason)
        await admission.settle("dated", f"r{n}", Usage(1000, 100), now_ms=NOW)
    want = sum(genai_usd(m, DAY, 1000, 100) for m in ["claude-sonnet-4-6", *MODELS[3:6]])
    assert (await usd_row(redis, "dated"))[0] == pytest.approx(want, abs=1e-6)


async def test_an_unpriced_model_is_refused_naming_it_and_budgeter_prices(redis: Redis) -> None:
    await TenantStore(redis).put("nop", TenantPolicy(usd_budgets={"day": 1.0}))
    decision = await Admission(redis).reserve("nop", "x", 10, 10, model="gpt-zzz", now_ms=NOW)
    assert (decision.kind, decision.reason) == ("REJECT", "unpriced_model")
    message = decision.describe("gpt-zzz")
    assert "'gpt-zzz'" in message and "BUDGETER_PRICES" in message
    assert f"genai-prices {GENAI_PRICES_VERSION}" in message


async def test_the_proxy_charges_dollars_and_refuses_an_unpriced_model_with_a_400(
    redis: Redis, redis_url: str
) -> None:
    async with scripted_proxy(redis, redis_url) as proxy, aiohttp.ClientSession() as http:
        key = await proxy.tenant("dollars", {"usd_budgets": {"day": 5.0}})
        headers = {"x-api-key": key}
        async with http.post(f"{proxy.url}/v1/messages", json=ask(), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        report = await tenant_usage(redis, "dollars", now_ms=await server_ms(redis))
        assert report is not None
        [row] = [r for r in report.budgets if r.unit == "usd"]
        # claude-sonnet-4-6 below 200k: $3 in, $15 out per million
        assert row.used == pytest.approx(COUNTED * 3e-6 + ANSWER_OUTPUT * 15e-6)
        assert row.reserved == 0

        body = {**ask(), "model": "gpt-zzz"}
        async with http.post(f"{proxy.url}/v1/messages", json=body, headers=headers) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert "'gpt-zzz'" in error["message"] and "BUDGETER_PRICES" in error["message"]


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
