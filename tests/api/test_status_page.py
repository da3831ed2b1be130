"""The status page (served, and rendered by a real headless Chromium) and ``budgeter top``."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from rich.console import Console

from budgeter.admission.admission import Admission, Usage
from budgeter.api.app import create_app
from budgeter.api.status_page import add_status_page
from budgeter.cli.top import run_top
from budgeter.domain.policy import TenantPolicy
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore

TOKEN = "admin-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


def settings_for(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, admin_token=TOKEN, upstream_url="http://127.0.0.1:9")


def make_app(redis: Redis, redis_url: str) -> web.Application:
    app = create_app(settings_for(redis_url), redis=redis)
    if not any(route.resource.canonical == "/" for route in app.router.routes()):
        add_status_page(app)
    return app


def request_line(custom_id: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": "claude-test",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"hello {custom_id}"}],
        },
    }


async def populate(session: aiohttp.ClientSession, base: str, redis: Redis) -> None:
    """Two tenants with budgets, queued batches, and ADMIT, DEFER and REJECT decisions."""
    policies = {
        "acme-corp": {"budgets": {"hour": 20_000, "day": 100_000, "month": 2_000_000}},
        "globex": {
            "budgets": {"day": 50_000, "total": 400_000},
            "max_concurrency": 1,
            "weight": 2,
        },
    }
    for tenant, policy in policies.items():
        async with session.put(f"{base}/admin/tenants/{tenant}", json=policy, headers=ADMIN) as r:
            assert r.status in (200, 201), await r.text()
        async with session.post(f"{base}/admin/tenants/{tenant}/keys", headers=ADMIN) as r:
            assert r.status == 201, await r.text()
            key = (await r.json())["key"]
        for batch in range(2):
            lines = [request_line(f"{tenant}-{batch}-{i}") for i in range(3 + batch)]
            async with session.post(
                f"{base}/v1/messages/batches", json={"requests": lines}, headers={"x-api-key": key}
            ) as r:
                assert r.status == 200, await r.text()
    adm = Admission(redis)
    assert (await adm.reserve("acme-corp", "a1", 1200, 800)).kind == "ADMIT"
    await adm.settle("acme-corp", "a1", Usage(1200, 650))
    assert (await adm.reserve("acme-corp", "a2", 3000, 1000)).kind == "ADMIT"
    assert (await adm.reserve("acme-corp", "a3", 30_000, 1000)).kind == "REJECT"
    assert (await adm.reserve("globex", "g1", 500, 2000)).kind == "ADMIT"
    deferred = await adm.reserve("globex", "g2", 500, 2000)
    assert deferred.kind == "DEFER" and deferred.reason == "concurrency"


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


async def run_chromium(binary: str, profile: Path, *args: str) -> tuple[int, str, str]:
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
        "--window-size=1280,900",
        "--virtual-time-budget=4000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def test_chromium_renders_status(
    redis: Redis, redis_url: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    binary = chromium_binary()
    app = make_app(redis, redis_url)
    async with serve_app(app, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"
        await populate(session, base, redis)
        url = f"{base}/#token={TOKEN}"

        code, dom, err = await run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
        assert code == 0, err[-2000:]
        assert 'data-tenant="acme-corp"' in dom and 'data-tenant="globex"' in dom, dom[-3000:]
        assert 'data-decision="ADMIT"' in dom
        assert 'data-decision="DEFER"' in dom and "concurrency" in dom
        assert 'data-decision="REJECT"' in dom and "too_large:budget:hour" in dom
        assert 'data-period="hour"' in dom and 'class="bar"' in dom
        assert TOKEN not in dom  # taken from the fragment, never rendered

        shot = artifacts_dir / "status-page.png"
        shot.unlink(missing_ok=True)
        code, _, err = await run_chromium(
            binary, tmp_path / "profile-shot", f"--screenshot={shot.resolve()}", url
        )
        assert code == 0, err[-2000:]
    assert shot.exists(), err[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000, f"screenshot suspiciously small: {len(data)} bytes"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
    if os.environ.get("BUDGETER_UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


async def test_chromium_without_token_shows_form(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    binary = chromium_binary()
    async with serve_app(make_app(redis, redis_url), "127.0.0.1", 0) as port:
        code, dom, err = await run_chromium(
            binary, tmp_path / "profile", "--dump-dom", f"http://127.0.0.1:{port}/"
        )
    assert code == 0, err[-2000:]
    assert re.search(r'<form class="login" id="login"(?! hidden)', dom), dom[-2000:]
    assert "data-tenant=" not in dom


async def test_top_once_prints_tenants(redis: Redis, redis_url: str) -> None:
    app = make_app(redis, redis_url)
    async with serve_app(app, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        await populate(session, f"http://127.0.0.1:{port}", redis)
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None, force_terminal=False)
    assert await run_top(settings_for(redis_url), once=True, console=console) == 0
    text = out.getvalue()
    assert "acme-corp" in text and "globex" in text
    assert "ready" in text and "parked" in text
    assert "DEFER concurrency" in text and "REJECT too_large:budget:hour" in text
    for period in ("hour", "day", "month", "total"):
        assert period in text
    narrow = io.StringIO()
    console = Console(file=narrow, width=80, color_system=None, force_terminal=False)
    assert await run_top(settings_for(redis_url), once=True, console=console) == 0
    lines = narrow.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "budgets: % remaining" in narrow.getvalue()
    assert any("acme-corp" in line and "%" in line for line in lines)


async def test_top_once_default_console(
    redis: Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await TenantStore(redis).put("solo", TenantPolicy())
    assert await run_top(settings_for(redis_url), once=True) == 0
    out = capsys.readouterr().out
    assert "budgeter top" in out and "solo" in out
