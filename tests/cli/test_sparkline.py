"""``budgeter usage report --chart``'s sparklines (budgeter/cli/sparkline.py): pure scaling
and bucketing, and lines drawn from real rollups in Redis."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.cli.errors import CliError
from budgeter.cli.sparkline import BLOCKS, buckets, chart_lines, report_chart, sparkline
from budgeter.domain.policy import TenantPolicy
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000 + 30 * 60_000


def test_scaled_to_the_peak_zero_blank_small_visible() -> None:
    assert sparkline([0, 1, 50, 100]) == " " + BLOCKS[0] + BLOCKS[3] + BLOCKS[7]
    assert sparkline([0, 0]) == "  "
    assert sparkline([]) == ""


def test_buckets_sum_consecutive_minutes_ending_at_the_last() -> None:
    assert buckets([1, 2, 3], 5) == [1, 2, 3]
    assert buckets([1, 2, 3, 4, 5], 2) == [1 + 2, 3 + 4 + 5]  # the partial column first
    assert buckets(list(range(10)), 5) == [0 + 1, 2 + 3, 4 + 5, 6 + 7, 8 + 9]
    assert sum(buckets(list(range(1440)), 60)) == sum(range(1440))
    assert len(buckets(list(range(1440)), 60)) == 60
    assert buckets([1], 0) == []


async def test_chart_lines_from_the_rollups(redis: Redis) -> None:
    store = TenantStore(redis)
    adm = Admission(redis)
    for tenant in ("acme", "b"):
        await store.put(tenant, TenantPolicy())
    for k, n in ((10, 100), (5, 400), (0, 200)):
        at = NOW - k * 60_000
        assert (await adm.reserve("acme", f"r{k}", 0, n, model="m", now_ms=at)).kind == "ADMIT"
        await adm.settle("acme", f"r{k}", Usage(0, n), now_ms=at)
    lines = await chart_lines(
        redis, ["acme", "b"], prefix="budgeter", since_ms=NOW - 59 * 60_000, now_ms=NOW
    )
    assert lines[0] == "tokens per minute, the 60 minutes to now"
    acme = lines[1]
    spark = acme[len("acme  ") : len("acme  ") + 60]
    assert spark[-1] == BLOCKS[3] and spark[-6] == BLOCKS[7] and spark[-11] == BLOCKS[1]
    assert spark.count(" ") == 57
    assert acme.endswith("700 tokens, peak 400/min, $0.0000")
    assert lines[2].startswith("b     " + " " * 60) and "0 tokens" in lines[2]


async def test_report_chart_every_tenant_and_a_bad_since(redis: Redis) -> None:
    store = TenantStore(redis)
    for tenant in ("zeta", "acme"):
        await store.put(tenant, TenantPolicy())
    lines = await report_chart(redis, prefix="budgeter", since="1h", now_ms=NOW)
    assert lines[0] == "tokens per minute, the 60 minutes to now"
    assert [line.split()[0] for line in lines[1:]] == sorted(["zeta", "acme"])
    with pytest.raises(CliError, match=r"^--since: not a time"):
        await report_chart(redis, prefix="budgeter", since="soon", now_ms=NOW)
    await redis.flushall()
    assert await report_chart(redis, prefix="budgeter", since="1h", now_ms=NOW) == ["no tenants"]
