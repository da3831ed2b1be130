"""``budgeter usage export`` and ``budgeter usage report`` (issue 18, item 3) against a real
Redis: CSV and JSONL rows for every entry in the window, groups by tenant, model, tag, day
and batch with a total row equal to the usage counters; bad options are one-line errors."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator

import pytest
import redis as sync_redis

from budgeter.admission.admission import Admission, Usage
from budgeter.cli.commands import main
from budgeter.store.client import make_redis


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


async def spend(url: str) -> None:
    redis = make_redis(url)
    adm = Admission(redis)
    plan: list[tuple[str, str, dict[str, object], Usage]] = [
        ("acme", "m1", {"s": "batch:msgbatch_1/c1", "g": {"team": "a"}}, Usage(10, 20, 1, 2)),
        ("acme", "m2", {"s": "req_1", "g": {"team": "b"}}, Usage(5, 6)),
        ("acme", "m1", {"s": "batch:msgbatch_1/c2"}, Usage(7, 8)),
        ("beta", "m1", {"s": "req_2", "g": {"team": "a"}}, Usage(100, 1)),
    ]
    for n, (tenant, model, meta, usage) in enumerate(plan):
        assert (await adm.reserve(tenant, f"r{n}", 1, 50, model=model, meta=meta)).kind == "ADMIT"
        await adm.settle(tenant, f"r{n}", usage)
    assert (await adm.reserve("acme", "gone", 1, 50, model="m1")).kind == "ADMIT"
    await adm.release("acme", "gone")
    await redis.aclose()


@pytest.mark.usefixtures("env")
def test_export_and_report(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for tenant in ("acme", "beta"):
        assert main(["tenants", "set", tenant, "--policy", "{}"]) == 0
    asyncio.run(spend(redis_url))
    capsys.readouterr()

    assert main(["usage", "export", "--tenant", "acme"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["model"], r["input"], r["outcome"]) for r in rows] == [
        ("m1", "10", "settled"), ("m2", "5", "settled"), ("m1", "7", "settled"),
        ("m1", "0", "released"),
    ]  # fmt: skip
    assert (
        json.loads(rows[0]["tags"]) == {"team": "a"} and rows[0]["source"] == "batch:msgbatch_1/c1"
    )
    assert main(["usage", "export", "--tenant", "acme", "--format", "jsonl", "--until", "1"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["usage", "export", "--tenant", "beta", "--format", "jsonl", "--since", "1d"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["input"] == 100 and json.loads(line)["tenant"] == "beta"

    def report(*flags: str) -> list[list[str]]:
        assert main(["usage", "report", "--format", "csv", *flags]) == 0
        return list(csv.reader(io.StringIO(capsys.readouterr().out)))

    assert report() == [
        ["tenant", "requests", "input", "output", "cache_creation", "cache_read", "usd"],
        ["acme", "3", "22", "34", "1", "2", "0.000000"],
        ["beta", "1", "100", "1", "0", "0", "0.000000"],
        ["total", "4", "122", "35", "1", "2", "0.000000"],
    ]
    assert [r[:3] for r in report("--group-by", "model")][1:] == [
        ["m1", "3", "117"], ["m2", "1", "5"], ["total", "4", "122"],
    ]  # fmt: skip
    assert [r[:3] for r in report("--group-by", "tag:team")][1:] == [
        ["(none)", "1", "7"], ["a", "2", "110"], ["b", "1", "5"], ["total", "4", "122"],
    ]  # fmt: skip
    assert [r[:3] for r in report("--group-by", "batch", "--tenant", "acme")][1:] == [
        ["(proxy)", "1", "5"], ["msgbatch_1", "2", "17"], ["total", "3", "22"],
    ]  # fmt: skip
    days = report("--group-by", "day")
    assert len(days) == 3 and days[1][0][:2] == "20"
    assert main(["usage", "report", "--group-by", "model"]) == 0  # the rich table
    out = capsys.readouterr().out
    assert "total" in out and "equal to the total" in out
    assert main(["usage", "--tenant", "acme"]) == 0  # the tables, as before


@pytest.mark.parametrize(
    "argv",
    [
        ["usage", "export"],
        ["usage", "export", "--tenant", "acme", "--format", "xml"],
        ["usage", "export", "--tenant", "Bad Id"],
        ["usage", "export", "--tenant", "nobody"],
        ["usage", "report", "--group-by", "color"],
        ["usage", "report", "--group-by", "tag:"],
        ["usage", "report", "--format", "jsonl"],
        ["usage", "report", "--since", "yesterday-ish"],
        ["usage"],
    ],
)
@pytest.mark.usefixtures("env")
def test_bad_options_are_one_line_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "set", "acme", "--policy", "{}"]) == 0
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err and "Traceback" not in err and len(err.splitlines()) == 1, err
