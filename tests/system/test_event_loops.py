"""Every process on either event loop (BUDGETER_EVENT_LOOP): uvloop, the default where it
is installed, and asyncio's own, which stays supported. Real api, worker and mock processes
on loopback serve a small batch and a proxied message on each, and each logs its loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from budgeter.cli import event_loop
from budgeter.cli.commands import main
from budgeter.cli.errors import EXIT_USAGE
from budgeter.cli.event_loop import loop_factory
from budgeter.settings import SettingsError
from tests.helpers import start_budgeter, wait_http

ADMIN = "loop-admin-token"
PARAMS = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def _stop(procs: list[asyncio.subprocess.Process]) -> list[int]:
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    return [await asyncio.wait_for(proc.wait(), 60) for proc in procs]


async def _traffic(api: str, session: aiohttp.ClientSession) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    policy = {"budgets": {"day": 1_000_000}, "rate": {"rpm": 6000}}
    async with session.put(f"{api}/admin/tenants/loops", json=policy, headers=admin) as resp:
        assert resp.status == 201, await resp.text()
    async with session.post(f"{api}/admin/tenants/loops/keys", headers=admin) as resp:
        key = (await resp.json())["key"]
    tenant = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    requests = [{"custom_id": f"c-{i}", "params": PARAMS} for i in range(6)]
    url = f"{api}/v1/messages/batches"
    async with session.post(url, json={"requests": requests}, headers=tenant) as resp:
        assert resp.status == 200, await resp.text()
        batch: dict[str, Any] = await resp.json()
    async with asyncio.timeout(60):  # guards a hang only
        while batch["processing_status"] != "ended":
            await asyncio.sleep(0.05)
            async with session.get(f"{url}/{batch['id']}", headers=tenant) as resp:
                batch = await resp.json()
    async with session.get(f"{url}/{batch['id']}/results", headers=tenant) as resp:
        lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"c-{i}" for i in range(6)]
    assert {line["result"]["type"] for line in lines} == {"succeeded"}
    async with session.post(f"{api}/v1/messages", json=PARAMS, headers=tenant) as resp:
        assert resp.status == 200, await resp.text()
        message = await resp.json()
    assert message["type"] == "message" and message["usage"]["output_tokens"] >= 1
    bad = {**PARAMS, "max_tokens": 0}  # an error answer, encoded by budgeter itself
    async with session.post(f"{api}/v1/messages", json=bad, headers=tenant) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
@pytest.mark.usefixtures("redis")  # a flushed Redis
async def test_api_worker_and_mock_serve_on_the_chosen_loop(
    choice: str, redis_url: str, tmp_path: Path
) -> None:
    expected = "asyncio" if choice == "asyncio" else loop_factory("uvloop")[1]
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
        "BUDGETER_ADMIN_TOKEN": ADMIN,
        "BUDGETER_LOG_LEVEL": "INFO",
        "BUDGETER_EVENT_LOOP": choice,
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("mock-upstream", "worker", "api")}
    procs: list[asyncio.subprocess.Process] = []
    try:
        with logs["mock-upstream"].open("wb") as err:
            mock, mock_port = await start_budgeter(
                "mock-upstream", port_dir=tmp_path, env=env, stderr=err
            )
        procs.append(mock)
        env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{mock_port}"
        with logs["worker"].open("wb") as err:
            worker, _ = await start_budgeter(
                "worker", "--concurrency", "4", port_dir=tmp_path, env=env, stderr=err
            )
        procs.append(worker)
        with logs["api"].open("wb") as err:
            api, api_port = await start_budgeter("api", port_dir=tmp_path, env=env, stderr=err)
        procs.append(api)
        base = f"http://127.0.0.1:{api_port}"
        await wait_http(f"{base}/healthz")
        async with aiohttp.ClientSession() as session:
            await _traffic(base, session)
    finally:
        codes = await _stop(procs[::-1])
    assert codes == [0, 0, 0]
    for name, path in logs.items():
        text = path.read_text()
        assert f"event loop: {expected}\n" in text, f"{name}: {text}"
        assert "Traceback" not in text, f"{name}: {text}"


def test_auto_picks_uvloop_where_it_is_installed_and_asyncio_is_its_own() -> None:
    # uvloop is a dependency wherever it installs (not on Windows), so CI has it
    auto, name = loop_factory("auto")
    assert auto is not None and name.startswith("uvloop ")
    assert loop_factory("asyncio") == (None, "asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(event_loop.importlib, "import_module", missing)
    assert loop_factory("auto") == (None, "asyncio (uvloop is not installed)")
    with pytest.raises(SettingsError, match=r"^BUDGETER_EVENT_LOOP: uvloop is not installed"):
        loop_factory("uvloop")
    monkeypatch.setenv("BUDGETER_EVENT_LOOP", "uvloop")
    assert main(["tenants", "list"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("budgeter: error: BUDGETER_EVENT_LOOP: uvloop is not installed")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("BUDGETER_EVENT_LOOP", "trio")
    assert main(["tenants", "list"]) == EXIT_USAGE
    assert "BUDGETER_EVENT_LOOP: Value error, must be 'auto', 'uvloop' or 'asyncio'" in (
        capsys.readouterr().err
    )
