"""``budgeter usage report --since 1h --chart`` (issue 18, item 5): a sparkline per tenant
of its tokens per minute from the rollups; bad flags are one-line errors; ``budgeter
usage --tenant`` still prints the usage tables."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis as sync_redis

from budgeter.admission.admission import Admission, Usage
from budgeter.cli.commands import main
from budgeter.cli.sparkline import BLOCKS
from budgeter.store.client import make_redis


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


async def settle_some(url: str) -> None:
    redis = make_redis(url)
    adm = Admission(redis)
    now = int(time.time() * 1000)
    for k, n in ((30, 100), (2, 800)):
        at = now - k * 60_000
        assert (await adm.reserve("acme", f"r{k}", 0, n, model="m", now_ms=at)).kind == "ADMIT"
        await adm.settle("acme", f"r{k}", Usage(0, n), now_ms=at)
    await redis.aclose()


@pytest.mark.usefixtures("env")
def test_usage_report_chart(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    assert main(["tenants", "set", "quiet", "--policy", "{}"]) == 0
    asyncio.run(settle_some(redis_url))
    capsys.readouterr()
    assert main(["usage", "report", "--since", "1h", "--chart"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "tokens per minute, the 60 minutes to now" in out  # under the report's table
    acme = next(line for line in out if line.startswith("acme "))
    assert BLOCKS[-1] in acme and "900 tokens, peak 800/min" in acme
    quiet = next(line for line in out if line.startswith("quiet"))
    assert "0 tokens" in quiet and not any(b in quiet for b in BLOCKS)
    assert main(["usage", "report", "--chart", "--tenant", "acme", "--width", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tokens per minute"))
    assert lines[header].endswith("(6 minutes a column)") and len(lines) == header + 2
    assert lines[header + 1].startswith("acme ")
    assert main(["usage", "--tenant", "acme"]) == 0  # the tables, as before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--chart", "--width", "3"], "--width: must be between"),
        (["report", "--chart", "--tenant", "Bad!"], "tenant"),
        (["export", "--chart", "--tenant", "acme"], "--chart: only with usage report"),
    ],
)
@pytest.mark.usefixtures("env")
def test_usage_report_bad_flags_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    capsys.readouterr()
    assert main(["usage", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
