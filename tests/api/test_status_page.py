"""The status page (served, and rendered by a real headless Chromium) and ``budgeter top``,
on a busy run: several tenants, one rate-limited and parked, one with an open batch half
done, one with work in flight, and idle ones."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from rich.console import Console

from budgeter.admission.admission import Admission, Usage
from budgeter.api.app import create_app
from budgeter.api.status_page import add_status_page
from budgeter.cli.top import run_top
from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.results import error_body, errored, succeeded
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore

TOKEN = "admin-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]
OPUS = "claude-opus-4-5"  # shown exactly so, never 'Claude-Opus-4-5'
SONNET = "claude-sonnet-4-5"
IDLE = ("archive", "legacy-reports", "sandbox")
REFRESH_MS = 2000  # the page's refresh interval (status_page.html)
TIMES = "\N{MULTIPLICATION SIGN}"


def settings_for(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, admin_token=TOKEN, upstream_url="http://127.0.0.1:9")


def make_app(redis: Redis, redis_url: str) -> web.Application:
    app = create_app(settings_for(redis_url), redis=redis)
    if not any(route.resource.canonical == "/" for route in app.router.routes()):
        add_status_page(app)
    return app


def requests_of(prefix: str, count: int, model: str) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{prefix}-{i:03d}",
                "params": {
                    "model": model,
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"hello {i}"}],
                },
            }
        )
        for i in range(count)
    ]


def message(model: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 20, "output_tokens": 30},
    }


async def busy_run(redis: Redis) -> dict[str, str]:
    """What a busy afternoon looks like; returns the open batch ids by tenant."""
    store = TenantStore(redis)
    batches = BatchStore(redis)
    queue = JobQueue(redis)
    adm = Admission(redis)
    await store.put(
        "nightly-etl",
        TenantPolicy.model_validate(
            {"weight": 2, "budgets": {"day": 2_000_000}, "rate": {"itpm": 400_000}}
        ),
    )
    await store.put(
        "search-api",
        TenantPolicy.model_validate(
            {"budgets": {"hour": 200_000}, "rate": {"rpm": 20, "otpm": 40_000}}
        ),
    )
    await store.put(
        "support-bot",
        TenantPolicy.model_validate(
            {
                "budgets": {"day": 1_000_000},
                "models": {OPUS: {"budgets": {"day": 300_000}}},
                "max_concurrency": 8,
            }
        ),
    )
    for name in IDLE:
        await store.put(name, TenantPolicy.model_validate({"budgets": {"day": 100_000}}))

    # search-api: 20 rpm, all used; twelve more DEFER rate:rpm; its queue head parked
    for i in range(20):
        assert (await adm.reserve("search-api", f"s{i}", 100, 200, model=OPUS)).kind == "ADMIT"
        await adm.settle("search-api", f"s{i}", Usage(100, 150))
    until = 0
    for i in range(12):
        decision = await adm.reserve("search-api", f"d{i}", 100, 200, model=OPUS)
        assert (decision.kind, decision.reason) == ("DEFER", "rate:rpm")
        until = decision.until_ms
    search = await batches.create("search-api", requests_of("q", 6, OPUS))
    head = await queue.pick_many(1, lease_ms=600_000)
    assert [job.tenant for job in head.jobs] == ["search-api"]
    assert await queue.defer(head.jobs[0], until) == "requeued"

    # nightly-etl: a batch of 40, 25 succeeded, 3 errored, 2 leased, 10 waiting
    etl = await batches.create("nightly-etl", requests_of("etl", 40, SONNET))
    picked = await queue.pick_many(30, lease_ms=600_000)
    assert {job.tenant for job in picked.jobs} == {"nightly-etl"} and len(picked.jobs) == 30
    for n, job in enumerate(picked.jobs[:28]):
        rid = job.reservation_id
        assert (await adm.reserve("nightly-etl", rid, 20, 64, model=SONNET)).kind == "ADMIT"
        if n < 25:
            await adm.settle("nightly-etl", rid, Usage(20, 30))
            await queue.ack(job, "succeeded", succeeded(message(SONNET)))
        else:
            await adm.release("nightly-etl", rid)
            await queue.ack(job, "errored", errored(error_body("api_error", "upstream 500")))
    for job in picked.jobs[28:]:
        assert (await adm.reserve("nightly-etl", job.reservation_id, 20, 64)).kind == "ADMIT"

    # support-bot: opus calls settled, three in flight
    for i in range(6):
        assert (await adm.reserve("support-bot", f"b{i}", 900, 400, model=OPUS)).kind == "ADMIT"
        await adm.settle("support-bot", f"b{i}", Usage(900, 350))
    for i in range(3):
        assert (await adm.reserve("support-bot", f"f{i}", 800, 400, model=SONNET)).kind == "ADMIT"
    return {"nightly-etl": etl, "search-api": search}


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(redis, redis_url))) as test_client:
        yield test_client


async def test_page_is_served_self_contained(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["cache-control"] == "no-store"
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http:" not in csp and "https:" not in csp
    html = await resp.text()
    assert html.startswith("<!doctype html>")
    assert "/admin/status" in html and "sessionStorage" in html and "replaceState" in html
    external = [
        url
        for url in re.findall(r"(?:https?:)?//[A-Za-z0-9.\-]+[^\s\"'<>)]*", html)
        if not url.startswith(("//127.0.0.1", "//localhost"))
    ]
    assert external == [], f"external URLs in the page: {external}"
    assert not re.search(r"<(?:link|img|iframe)\b", html, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc=", html, re.I)
    assert "@import" not in html and "url(" not in html
    # model ids are shown as sent: nothing capitalises text, and only fixed labels are
    # upper-cased (the stat labels and section titles, which never hold an id)
    assert "capitalize" not in html
    uppercased = re.findall(r"([^{}]+)\{[^}]*text-transform:\s*uppercase", html)
    assert [s.strip() for s in uppercased] == [".stat .label", ".section-title"]
    assert f"var REFRESH_MS = {REFRESH_MS};" in html
    # the page itself needs no token; the data does
    assert (await client.get("/admin/status")).status == 401
    snapshot = await (await client.get("/admin/status", headers=ADMIN)).json()
    assert snapshot["tenants"] == []


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        if os.environ.get("BUDGETER_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed and BUDGETER_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


async def run_chromium(
    binary: str, profile: Path, *args: str, budget_ms: int, size: str = "1280,900"
) -> tuple[int, str, str]:
    """Chromium headless; ``budget_ms`` is virtual time (it does not pass while a fetch is
    pending, so it bounds the page's own timers, not how fast the machine is)."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def card(dom: str, tenant: str) -> str:
    start = dom.index(f'data-tenant="{tenant}"')
    end = dom.find('<section class="card', start)
    return dom[start : end if end > 0 else len(dom)]


def check_busy_dom(dom: str, batch_ids: dict[str, str]) -> None:
    # the first render came from the fetch made at load, not from a refresh tick
    assert 'data-renders="1"' in dom, dom[-3000:]
    # busiest first: etl (10 queued + 2 in flight + its open batch), search-api (6 queued),
    # support-bot (3 in flight); then the idle ones, folded away
    order = re.findall(r'<section class="card tenant( idle)?" data-tenant="([^"]+)"', dom)
    assert order == [
        ("", "nightly-etl"),
        ("", "search-api"),
        ("", "support-bot"),
        *((" idle", name) for name in IDLE),
    ], order
    details = dom.index('<details class="idle"')
    assert dom.index('data-tenant="support-bot"') < details < dom.index('data-tenant="archive"')
    assert "3 idle tenants" in dom
    # the rate-limited tenant: its rpm bucket full, its DEFERs grouped, its park honest
    search = card(dom, "search-api")
    # (the bucket refills continuously: 20 of 20 at first, one less every 3 s)
    in_use = re.search(r"(\d+) of 20 requests/min in use", search)
    assert in_use and int(in_use.group(1)) >= 10, search
    assert 'data-rate="rpm"' in search and 'data-rate="otpm"' in search
    assert "rate-limited: rpm" in search and re.search(r"whole limit free in \d", search)
    assert re.search(r'data-decision="DEFER" data-count="12"', search)
    assert "rate:rpm" in search and f"{TIMES}12" in search
    assert re.search(r'data-decision="ADMIT" data-count="8"', search)  # the list keeps 20
    assert "parked, next try in" in search or "parked, due now" in search
    assert not re.search(r"parked[^<]*\b0s", dom)
    # the open batch: progress and an ETA
    etl = card(dom, "nightly-etl")
    assert f'data-batch="{batch_ids["nightly-etl"]}"' in etl
    assert "28 / 40" in etl and "25 succeeded" in etl and "3 errored" in etl
    assert "12 queued or in flight" in etl and re.search(r"ETA (now|in \d)", etl)  # pace-based
    assert f'data-batch="{batch_ids["search-api"]}"' in search
    # model ids exactly as sent
    bot = card(dom, "support-bot")
    assert f'<span class="model">{OPUS}</span>' in bot and 'data-period="day"' in bot
    assert f'<span class="model">{SONNET}</span>' in etl
    assert OPUS.title() not in dom and OPUS.upper() not in dom
    assert TOKEN not in dom  # taken from the fragment, never rendered


async def test_chromium_renders_a_busy_run(
    redis: Redis, redis_url: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    binary = chromium_binary()
    batch_ids = await busy_run(redis)
    app = make_app(redis, redis_url)
    async with serve_app(app, "127.0.0.1", 0) as port:
        url = f"http://127.0.0.1:{port}/#token={TOKEN}"
        # less virtual time than one refresh interval: what is there came with the load
        code, dom, err = await run_chromium(
            binary, tmp_path / "profile-dom", "--dump-dom", url, budget_ms=REFRESH_MS // 2
        )
        assert code == 0, err[-2000:]
        check_busy_dom(dom, batch_ids)

        shot = artifacts_dir / "status-page.png"
        shot.unlink(missing_ok=True)
        code, _, err = await run_chromium(
            binary,
            tmp_path / "profile-shot",
            f"--screenshot={shot.resolve()}",
            url,
            budget_ms=REFRESH_MS // 2,
            size="1400,1300",
        )
        assert code == 0, err[-2000:]
    assert shot.exists(), err[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000, f"screenshot suspiciously small: {len(data)} bytes"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 1300)
    if os.environ.get("BUDGETER_UPDATE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


async def test_chromium_without_token_shows_form(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    binary = chromium_binary()
    async with serve_app(make_app(redis, redis_url), "127.0.0.1", 0) as port:
        code, dom, err = await run_chromium(
            binary, tmp_path / "profile", "--dump-dom", f"http://127.0.0.1:{port}/", budget_ms=500
        )
    assert code == 0, err[-2000:]
    assert re.search(r'<form class="login" id="login"(?! hidden)', dom), dom[-2000:]
    assert "data-tenant=" not in dom


async def test_top_orders_by_activity_and_folds_idle_tenants(redis: Redis, redis_url: str) -> None:
    await busy_run(redis)
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None, force_terminal=False)
    assert await run_top(settings_for(redis_url), once=True, console=console) == 0
    text = out.getvalue()
    rows = [line.split()[0] for line in text.splitlines() if line.strip()]
    active = [r for r in rows if r in ("nightly-etl", "search-api", "support-bot")]
    assert active == ["nightly-etl", "search-api", "support-bot"], text
    assert "3 idle: archive, legacy-reports, sandbox" in text
    assert not any(line.startswith(IDLE) for line in text.splitlines())
    assert f"DEFER rate:rpm {TIMES}12" in text
    assert re.search(r"rpm \d+%", text)  # the fullest bucket
    assert "28/40" in text  # the open batch
    assert "ready" in text and "parked" in text
    for period in ("hour", "day"):
        assert period in text
    assert not re.search(r"\b0s\)", text)  # a parked tenant due now is not 'parked 0s'
    narrow = io.StringIO()
    console = Console(file=narrow, width=80, color_system=None, force_terminal=False)
    assert await run_top(settings_for(redis_url), once=True, console=console) == 0
    lines = narrow.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "budgets: % remaining" in narrow.getvalue()
    assert any("nightly-etl" in line and "%" in line for line in lines)


async def test_top_once_default_console(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await TenantStore(redis).put("solo", TenantPolicy())
    assert await run_top(settings_for(redis_url), once=True) == 0
    out = capsys.readouterr().out
    assert "budgeter top" in out and "solo" in out


async def test_chromium_draws_the_tree_expanded_and_collapsed(
    redis: Redis, redis_url: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    from tests.tenants.test_status_tree import busy_tree

    binary = chromium_binary()
    await busy_tree(redis)  # org > research > (nlp, vision), org > sales (idle); api; solo
    async with serve_app(make_app(redis, redis_url), "127.0.0.1", 0) as port:
        base = f"http://127.0.0.1:{port}/#token={TOKEN}"
        doms = {}
        for name, url in (("open", base), ("folded", base + "&fold=research")):
            code, dom, err = await run_chromium(
                binary, tmp_path / f"profile-{name}", "--dump-dom", url, budget_ms=REFRESH_MS // 2
            )
            assert code == 0, err[-2000:]
            assert 'data-renders="1"' in dom, dom[-3000:]
            doms[name] = dom
        shot = artifacts_dir / "status-page-tree.png"
        shot.unlink(missing_ok=True)
        code, _, err = await run_chromium(
            binary,
            tmp_path / "profile-shot",
            f"--screenshot={shot.resolve()}",
            base,
            budget_ms=REFRESH_MS // 2,
            size="1400,1300",
        )
        assert code == 0 and shot.exists(), err[-2000:]
    if os.environ.get("BUDGETER_UPDATE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "status-page-tree.png")
    dom = doms["open"]
    order = re.findall(r'<section class="card tenant(?: idle)?" data-tenant="([^"]+)"', dom)
    # depth first, siblings busiest first; sales (idle) folded under org, solo at the end
    assert order == ["org", "research", "nlp", "vision", "sales", "api", "solo"], order
    # children sit inside their parent's subtree, which is open by default
    org = dom[dom.index('<div class="node" data-node="org">') : dom.index('data-tenant="api"')]
    assert re.search(r'<details class="subtree" data-parent="org" open=""', org)
    assert re.search(r'<details class="subtree" data-parent="research" open=""', org)
    assert org.index('data-parent="research"') < org.index('data-tenant="nlp"')
    assert "4 tenants below org" in org and "150 tokens, 3 requests" in org
    assert re.search(r'<details class="idle-below" data-parent="org"(?! open)', org)
    assert "1 idle below org: sales" in org
    assert "1 idle tenant" in dom and dom.index('<details class="idle"') > org.index("sales")
    # '#fold=research': that subtree is collapsed (its cards stay in the document), org not
    folded = doms["folded"]
    assert re.search(r'<details class="subtree" data-parent="research">', folded)
    assert re.search(r'<details class="subtree" data-parent="org" open=""', folded)
    assert 'data-tenant="nlp"' in folded and TOKEN not in folded
