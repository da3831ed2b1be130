"""With BUDGETER_REDIS_URL unset, real budgeter processes share one embedded Redis that
belongs to none of them: the one that started it can be SIGTERMed or SIGKILLed and the
others keep working; the CLI finds the same data from any directory; while the server
is stopped a worker logs one line per retry interval (no traceback), the API answers 503,
and both recover when it is started again on the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.shared_redis import SharedRedis
from budgeter.store.types import RedisClient
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore
from tests.helpers import mock_upstream, requests_for, start_budgeter, wait_ended

pytestmark = pytest.mark.timeout(600)

UNREACHABLE = "unreachable: "


@dataclass
class Machine:
    """budgeter processes of one user: one data dir, no BUDGETER_REDIS_URL."""

    root: Path
    env: dict[str, str]
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["BUDGETER_DATA_DIR"])

    async def start(self, name: str, command: str, *args: str) -> asyncio.subprocess.Process:
        log = self.root / f"{name}.log"
        stderr = open(log, "wb")  # noqa: SIM115, ASYNC230 - the child writes it while the test runs
        self._files.append(stderr)
        self.logs[name] = log
        proc, _ = await start_budgeter(
            command, *args, port_dir=self.root, name=name, env=self.env, stderr=stderr
        )
        self.procs.append(proc)
        return proc

    async def cli(self, *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            *args,
            env=self.env,
            cwd=cwd or self.root,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    async def stop_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for file in self._files:
            file.close()


@pytest.fixture
async def machine(tmp_path: Path) -> AsyncIterator[Machine]:
    async with mock_upstream() as (upstream_url, _):
        env = {k: v for k, v in os.environ.items() if k != "BUDGETER_REDIS_URL"}
        env |= {
            "BUDGETER_DATA_DIR": str(tmp_path / "data"),
            "BUDGETER_UPSTREAM_URL": upstream_url,
            "BUDGETER_ADMIN_TOKEN": "shared-admin",
            "BUDGETER_MAINTENANCE_SECONDS": "0.5",
            "BUDGETER_DRAIN_SECONDS": "2",
            "BUDGETER_LOG_LEVEL": "INFO",
        }
        box = Machine(tmp_path, env)
        try:
            yield box
        finally:
            await box.stop_all()
            code, _, err = await box.cli("redis", "stop")  # the server outlives them all
            assert code == 0, err
            assert SharedRedis(box.data_dir).running() is None


async def _client(box: Machine) -> RedisClient:
    server = SharedRedis(box.data_dir).running()
    assert server is not None
    return make_redis(server.url)


async def _tenant_with_key(redis: RedisClient, tenant: str) -> str:
    await TenantStore(redis).put(tenant, TenantPolicy(budgets={"day": 10_000_000}))
    keys = KeyStore(redis)
    try:
        return (await keys.create(tenant))[1]
    finally:
        await keys.aclose()


async def _batch_succeeds(redis: RedisClient, tenant: str, name: str, count: int = 20) -> None:
    store = BatchStore(redis)
    batch_id = await store.create(tenant, requests_for(name, count))
    await wait_ended(store, [batch_id], timeout_s=120)
    assert (await store.status(batch_id)).succeeded == count


async def _message(http: aiohttp.ClientSession, api: str, key: str) -> tuple[int, Any, str]:
    body = {
        "model": "claude-test",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    async with http.post(f"{api}/v1/messages", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("retry-after", "")


async def _api_port(box: Machine, name: str) -> str:
    return f"http://127.0.0.1:{int((box.root / f'{name}.port').read_text())}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_the_process_that_started_redis_can_die_and_the_others_keep_working(
    machine: Machine, sig: signal.Signals
) -> None:
    first = await machine.start("worker-a", "worker", "--concurrency", "4")
    assert "started here, detached" in machine.log("worker-a")
    server = SharedRedis(machine.data_dir).running()
    assert server is not None
    await machine.start("api", "api")
    await machine.start("worker-b", "worker", "--concurrency", "4")
    assert f"Redis: embedded at {server.url} (data dir {server.data_dir}; shared" in (
        machine.log("api")
    )
    api = await _api_port(machine, "api")
    redis = await _client(machine)
    try:
        key = await _tenant_with_key(redis, "acme")
        await _batch_succeeds(redis, "acme", "before")

        first.send_signal(sig)
        assert await asyncio.wait_for(first.wait(), timeout=60) == (
            0 if sig == signal.SIGTERM else -9
        )
        assert SharedRedis(machine.data_dir).running() == server  # the same server runs on

        await _batch_succeeds(redis, "acme", "after")  # worker-b serves it
        async with aiohttp.ClientSession() as http:
            status, answer, _ = await _message(http, api, key)
        assert status == 200, answer
    finally:
        await redis.aclose()
    for name in ("api", "worker-b"):
        assert "Traceback" not in machine.log(name)


async def test_the_cli_finds_the_same_data_from_any_directory(machine: Machine) -> None:
    here, there = machine.root / "here", machine.root / "there"
    here.mkdir()
    there.mkdir()
    code, _, err = await machine.cli("tenants", "set", "acme", "--policy", "{}", cwd=here)
    assert code == 0, err
    assert "started here, detached" in err  # the first one started the shared server
    code, out, err = await machine.cli("tenants", "list", cwd=there)
    assert code == 0, err
    assert "acme" in out
    assert not (here / ".budgeter").exists() and not (there / ".budgeter").exists()
    code, out, _ = await machine.cli("redis", "status", cwd=there)
    server = SharedRedis(machine.data_dir).running()
    assert code == 0 and server is not None
    assert f"url       {server.url}" in out and f"pid       {server.pid}" in out
    assert f"data dir  {machine.data_dir}" in out and "memory" in out and "uptime" in out
    code, out, _ = await machine.cli("redis", "stop", cwd=there)
    assert code == 0 and "stopped" in out
    code, out, _ = await machine.cli("redis", "status")
    assert code == 1 and "not running" in out


async def test_redis_stopped_is_one_line_per_retry_then_both_recover_on_the_same_port(
    machine: Machine,
) -> None:
    await machine.start("worker", "worker", "--concurrency", "4")
    await machine.start("api", "api")
    api = await _api_port(machine, "api")
    server = SharedRedis(machine.data_dir).running()
    assert server is not None
    redis = await _client(machine)
    try:
        key = await _tenant_with_key(redis, "acme")
        await _batch_succeeds(redis, "acme", "before")
    finally:
        await redis.aclose()

    code, out, err = await machine.cli("redis", "stop")
    assert code == 0 and "stopped" in out, err
    stopped_at = time.monotonic()
    async with aiohttp.ClientSession() as http:
        status, answer, retry_after = await _message(http, api, key)
    assert status == 503, answer
    assert answer["error"]["type"] == "overloaded_error" and retry_after == "5"
    async with asyncio.timeout(120):  # the worker keeps retrying: a second line comes
        while machine.log("worker").count(UNREACHABLE) < 2:  # noqa: ASYNC110 - a bounded poll of another process's log
            await asyncio.sleep(0.1)
    worker_log = machine.log("worker")
    elapsed = time.monotonic() - stopped_at
    assert worker_log.count(UNREACHABLE) <= elapsed / 5 + 1  # one line per 5 s at most
    assert f"warning budgeter.redis Redis at {server.url} unreachable: " in worker_log
    assert "Traceback" not in worker_log

    code, out, err = await machine.cli("redis", "start")
    assert code == 0 and f"started: {server.url}" in out, err  # the same port
    redis = await _client(machine)
    try:
        await _batch_succeeds(redis, "acme", "after")
    finally:
        await redis.aclose()
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _message(http, api, key)
    assert status == 200, answer
    async with asyncio.timeout(60):
        while "reachable again" not in machine.log("worker"):  # noqa: ASYNC110 - a bounded poll of another process's log
            await asyncio.sleep(0.1)
    for name in ("api", "worker"):
        assert "Traceback" not in machine.log(name)
