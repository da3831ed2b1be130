"""The status page's charts (issue 18, item 5), rendered by a real headless Chromium: per
tenant a tokens-per-minute chart over the last hour from the per-minute rollups, and
today's spend against the day budget (tokens and USD), inline SVG with no external asset."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.serving import serve_app
from budgeter.tenants.store import TenantStore
from tests.api.test_status_page import (
    ROOT,
    TOKEN,
    card,
    chromium_binary,
    make_app,
    run_chromium,
)

MODEL = "claude-sonnet-4-5"
PRICE = ModelPrice(input=3, output=15, cache_write=3.75, cache_read=0.3)


def wave(k: int) -> int:
    """Output tokens settled ``k`` minutes ago: a daily-looking wave."""
    return 400 + int(300 * math.sin(k / 6)) + 20 * (k % 5)


DAY_MS = 86_400_000


async def busy_hour(redis: Redis, by_day: dict[int, int]) -> dict[str, int]:
    """Two tenants with an hour of settles; returns each one's tokens over the hour, and
    adds search-api's by UTC day (since the epoch) to ``by_day`` (the hour may span two)."""
    store = TenantStore(redis)
    await store.put(
        "search-api",
        TenantPolicy.model_validate({"budgets": {"day": 60_000}, "usd_budgets": {"day": 2.5}}),
    )
    await store.put("nightly-etl", TenantPolicy.model_validate({"budgets": {"day": 500_000}}))
    await store.put("quiet", TenantPolicy.model_validate({}))
    adm = Admission(redis, prices=PriceTable({MODEL: PRICE}, bundled=False))
    now = int(time.time() * 1000)
    totals = {"search-api": 0, "nightly-etl": 0}
    for k in range(49, -1, -1):  # minutes ago (the page may load a minute later: still in its hour)
        at = now - k * 60_000
        for tenant, n in (("search-api", wave(k)), ("nightly-etl", 3000 if k % 10 < 3 else 0)):
            if not n:
                continue
            rid = f"{tenant}-{k}"
            decision = await adm.reserve(tenant, rid, 100, n, model=MODEL, now_ms=at)
            assert decision.kind == "ADMIT", decision
            await adm.settle(tenant, rid, Usage(100, n), now_ms=at)
            totals[tenant] += 100 + n
            if tenant == "search-api":
                by_day[at // DAY_MS] = by_day.get(at // DAY_MS, 0) + 100 + n
    return totals


async def test_chromium_draws_minute_and_today_charts(
    redis: Redis, redis_url: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    binary = chromium_binary()
    by_day: dict[int, int] = {}
    totals = await busy_hour(redis, by_day)
    async with serve_app(make_app(redis, redis_url), "127.0.0.1", 0) as port:
        url = f"http://127.0.0.1:{port}/#token={TOKEN}"
        asked_day = int(time.time() * 1000) // DAY_MS
        code, dom, err = await run_chromium(
            binary, tmp_path / "profile-dom", "--dump-dom", url, budget_ms=1000
        )
        assert code == 0, err[-2000:]
        rendered_day = int(time.time() * 1000) // DAY_MS
        search = card(dom, "search-api")
        chart = re.search(r'<svg class="chart"[^>]*data-chart="minutes"[^>]*>', search)
        assert chart, search[-3000:]
        assert f'data-total="{totals["search-api"]}"' in chart.group(0)
        peak = max(100 + wave(k) for k in range(50))
        assert f'data-peak="{peak}"' in chart.group(0)
        assert len(re.findall(r'class="bar-minute"', search)) == 60
        assert "tokens per minute, last hour" in search
        today = re.search(
            r'data-today="tokens".*?<svg[^>]*data-used="(\d+)" data-limit="(\d+)"', search
        )
        # today: the settles since UTC midnight of the render, the whole hour unless it
        # crossed midnight (it failed from 00:00 to 01:00 UTC); either day's if midnight
        # passed during the render
        spent = {str(by_day.get(day, 0)) for day in (asked_day, rendered_day)}
        assert today and today.group(2) == "60000", search[-3000:]
        assert today.group(1) in spent, (today.groups(), spent)
        usd = re.search(r'data-today="usd".*?data-limit="([\d.]+)"', search)
        assert usd and usd.group(1) == "2.5"
        etl = card(dom, "nightly-etl")
        assert f'data-total="{totals["nightly-etl"]}"' in etl
        assert 'data-today="usd"' in etl and "(no day budget)" in etl  # spent, no USD budget
        quiet = card(dom, "quiet")
        assert 'data-total="0"' in quiet and "0 tokens (no day budget)" in quiet
        assert 'data-today="usd"' not in quiet

        shot = artifacts_dir / "status-page-charts.png"
        shot.unlink(missing_ok=True)
        code, _, err = await run_chromium(
            binary,
            tmp_path / "profile-shot",
            f"--screenshot={shot.resolve()}",
            url,
            budget_ms=1000,
            size="1400,1300",
        )
        assert code == 0, err[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    if os.environ.get("BUDGETER_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "status-page-charts.png")
