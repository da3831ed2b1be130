"""Redis ACL users: a real redis-server started with an ACL file (``default`` off, one
user ``budgeter`` limited to keys under the prefix and to non-dangerous commands) serves
admission and the queue through ``redis://budgeter:PASSWORD@host:port/0``; a wrong
password is one line and exit 1 from the CLI, never a traceback, and never the password."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.exceptions import AuthenticationError, NoPermissionError

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.store.client import make_redis
from budgeter.store.embedded import die_with_parent, find_redis_server, free_port
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, start_budgeter, wait_ended, wait_http

PASSWORD = "s3cret-acl-pw"
NOW = 1_764_201_600_000
# what budgeter needs: its own keys (the prefix), every command but the dangerous ones
ACL = f"""user default off
user budgeter on >{PASSWORD} ~budgeter:* resetchannels +@all -@dangerous
"""


@pytest.fixture(scope="module")
def acl_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server whose only user is ``budgeter`` (from an ACL file)."""
    directory = tmp_path_factory.mktemp("acl-redis")
    acl_file = directory / "users.acl"
    acl_file.write_text(ACL)
    port = free_port()
    process = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--aclfile",
            str(acl_file),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        _wait_answers(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(30)


def _wait_answers(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "redis-server exited at start (bad ACL file?)"
        try:
            with sync_redis.Redis(port=port, username="budgeter", password=PASSWORD) as client:
                if client.ping():
                    return
        except (sync_redis.ConnectionError, OSError):
            time.sleep(0.05)
    raise AssertionError(f"redis-server with an ACL file did not answer on {port}")


def _url(port: int, password: str = PASSWORD) -> str:
    return f"redis://budgeter:{password}@127.0.0.1:{port}/0"


@pytest.fixture
async def acl_redis(acl_port: int) -> AsyncIterator[RedisClient]:
    client = make_redis(_url(acl_port))
    yield client
    await client.aclose()


def test_the_default_user_is_off_and_budgeter_is_confined(acl_port: int) -> None:
    with sync_redis.Redis(port=acl_port) as anonymous, pytest.raises(AuthenticationError):
        anonymous.get("budgeter:x")  # NOAUTH: the default user is off
    with sync_redis.Redis(port=acl_port, username="budgeter", password=PASSWORD) as client:
        with pytest.raises(NoPermissionError):
            client.get("other:x")  # outside the prefix
        with pytest.raises(NoPermissionError):
            client.flushall()  # a dangerous command


async def test_admission_and_the_queue_work_as_an_acl_user(acl_redis: RedisClient) -> None:
    tenant = f"acl{os.getpid()}"
    await TenantStore(acl_redis).put(tenant, TenantPolicy(budgets={"day": 1_000_000}))
    admission = Admission(acl_redis)
    assert (await admission.reserve(tenant, "r1", 100, 50, now_ms=NOW)).kind == "ADMIT"
    settled = await admission.settle(tenant, "r1", Usage(100, 20), now_ms=NOW)
    assert settled.settled == 1 and settled.actual_tokens == 120
    await acl_redis.script_flush()  # SCRIPT is not dangerous: loaded again on NOSCRIPT
    assert (await admission.reserve(tenant, "r2", 100, 50, now_ms=NOW)).kind == "ADMIT"

    queue = JobQueue(acl_redis)
    jobs = [NewJob(f"c{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(3)]
    assert await queue.submit(tenant, "b1", jobs) == 3
    picked = [await queue.pick(lease_ms=30_000, now_ms=NOW) for _ in range(3)]
    assert [pick.job.custom_id for pick in picked if pick.job] == ["c0", "c1", "c2"]

    store = BatchStore(acl_redis)
    batch_id = await store.create(tenant, requests_for(tenant, 2))
    assert (await store.status(batch_id)).total == 2


async def test_a_wrong_password_is_refused_at_once(acl_port: int) -> None:
    client = make_redis(_url(acl_port, "wrong"))
    try:
        with pytest.raises(AuthenticationError):
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize("password", ["wrong-pw-123", None])
async def test_a_refused_login_is_one_line_and_exit_1_from_the_cli(
    acl_port: int, tmp_path: Path, password: str | None
) -> None:
    """A wrong password, and no login at all (the default user is off)."""
    url = _url(acl_port, password) if password else f"redis://127.0.0.1:{acl_port}/0"
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": url,
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
        "BUDGETER_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        "tenants",
        "list",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 120)
    err = err_bytes.decode()
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("budgeter: error: Redis"), err
    assert "Traceback" not in err and PASSWORD not in err
    assert password is None or password not in err


async def test_the_api_and_a_worker_serve_a_batch_as_an_acl_user(
    acl_port: int, tmp_path: Path
) -> None:
    """Real processes with ``BUDGETER_REDIS_URL=redis://budgeter:...@``: every command
    they send (scripts, pipelines, the readiness check, maintenance) is allowed."""
    env = {
        **os.environ,
        "BUDGETER_REDIS_URL": _url(acl_port),
        "BUDGETER_MAINTENANCE_SECONDS": "0.5",
        "BUDGETER_LOG_LEVEL": "ERROR",
    }
    client = make_redis(_url(acl_port))
    procs: list[asyncio.subprocess.Process] = []
    try:
        for command in ("mock-upstream", "api", "worker"):
            proc, port = await start_budgeter(command, port_dir=tmp_path, env=env)
            procs.append(proc)
            if command == "mock-upstream":
                env["BUDGETER_UPSTREAM_URL"] = f"http://127.0.0.1:{port}"
            if command == "api":
                await wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60)
        tenant = f"aclp{os.getpid()}"
        await TenantStore(client).put(tenant, TenantPolicy(budgets={"day": 1_000_000}))
        store = BatchStore(client)
        batch_id = await store.create(tenant, requests_for(tenant, 10))
        await wait_ended(store, [batch_id], timeout_s=90)
        assert (await store.status(batch_id)).succeeded == 10
        assert all(proc.returncode is None for proc in procs)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
        await client.aclose()
