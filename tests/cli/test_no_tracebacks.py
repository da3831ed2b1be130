"""Every way a command can fail ends in one line on stderr and a documented exit status,
never a traceback: a closed stdout (141), a port in use (2), Redis or the upstream
unreachable (1), Ctrl-C (130), a bad flag (2); and ``submit --wait`` exits 0 only when
every request succeeded, 3 otherwise. Real ``python -m budgeter`` processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from budgeter.cli import commands
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.settings import Settings
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from tests.helpers import mock_upstream, requests_for, start_budgeter, wait_ended

LIMIT_S = 120  # a bound against hangs only: the machine may be slow


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_DATA_DIR": str(tmp_path / "data"),
        "BUDGETER_LOG_LEVEL": "WARNING",
    }


async def run(*args: str, env: dict[str, str], stdout: int = -1) -> tuple[int, str, str]:
    """``python -m budgeter ARGS``: exit status, stdout, stderr (``stdout``: a file
    descriptor to write to instead of a pipe)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budgeter",
        *args,
        env=env,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode(), err.decode()


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@contextmanager
def interruptible() -> Iterator[None]:
    """Children started inside take Ctrl-C as from a terminal, even when this test runs
    with SIGINT ignored (a background job of a non-interactive shell): a handled signal
    is reset to the default on exec, an ignored one would stay ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# closed stdout ------------------------------------------------------------------------


CLOSED_STDOUT_CASES = [
    ["results", "{batch}"],
    ["tenants", "list"],
    ["usage", "--tenant", "pipe-t"],  # rich tables
    ["top", "--once"],
    ["--help"],
    ["--version"],
]


@pytest.mark.parametrize("args", CLOSED_STDOUT_CASES, ids=" ".join)
async def test_a_closed_stdout_exits_141_quietly(
    args: list[str], env: dict[str, str], redis: RedisClient
) -> None:
    tenants = TenantStore(redis, prefix="budgeter")
    await tenants.put("pipe-t", TenantPolicy.model_validate({"budgets": {"day": 1000}}))
    store = BatchStore(redis, prefix="budgeter")
    batch_id = await store.create("pipe-t", requests_for("p", 50), ttl_ms=3_600_000)
    await store.cancel(batch_id, tenant="pipe-t")  # 50 result lines, no worker needed
    await wait_ended(store, [batch_id])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte (`| head -0`)
    try:
        argv = [arg.format(batch=batch_id) for arg in args]
        code, _, err = await run(*argv, env=env, stdout=write_end)
    finally:
        os.close(write_end)
    assert (code, err) == (141, "")


# port in use ----------------------------------------------------------------------------


@pytest.mark.usefixtures("redis")
async def test_a_port_in_use_is_one_line_naming_the_flag(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, flag in (
            (["api", "--port", port], "--port"),
            (["worker", "--metrics-port", port], "--metrics-port"),
            (["mock-upstream", "--port", port], "--port"),
        ):
            code, _, err = await run(*args, env=env)
            assert code == 2, err
            assert one_line(err) == (
                f"budgeter: error: port {port} is in use ({flag}, 0 picks a free one)"
            )


async def test_port_0_binds_a_free_port_and_logs_it(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "BUDGETER_LOG_LEVEL": "INFO"}
    proc, port = await start_budgeter(
        "mock-upstream", port_dir=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    assert proc.returncode == 0
    assert f"listening on http://127.0.0.1:{port}" in err.decode()


# Redis and the upstream unreachable -------------------------------------------------------


async def test_redis_unreachable_is_one_line_and_exit_1(env: dict[str, str]) -> None:
    env = {**env, "BUDGETER_REDIS_URL": "redis://127.0.0.1:1/0"}
    code, _, err = await run("tenants", "list", env=env)
    assert code == 1, err
    line = one_line(err)
    assert line.startswith("budgeter: error: Redis unreachable: ")
    assert "127.0.0.1:1" in line and line.endswith("(BUDGETER_REDIS_URL)")


@pytest.fixture
def _keep_logging() -> Iterator[None]:
    """``main`` in this process sets up logging on the captured stderr: put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_keep_logging")
def test_upstream_unreachable_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    """No command calls the upstream itself today; one that does reports a refused
    connection like this (the real aiohttp error, through the real ``main``)."""

    async def calls_the_upstream(_args: object, _settings: Settings) -> int:
        async with aiohttp.ClientSession() as session, session.get("http://127.0.0.1:1/"):
            return 0

    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    monkeypatch.setattr(commands, "dispatch", calls_the_upstream)
    assert commands.main(["tenants", "list"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("budgeter: error: upstream unreachable: Cannot connect to host")
    assert line.endswith("(BUDGETER_UPSTREAM_URL)")


# usage errors ------------------------------------------------------------------------------


async def test_bad_flags_and_settings_are_one_line_and_exit_2(env: dict[str, str]) -> None:
    code, _, err = await run("submit", "--nope", env=env)
    assert code == 2
    assert one_line(err).startswith("budgeter submit: error: ")
    code, _, err = await run("tenants", "list", env={**env, "BUDGETER_LOG_FORMAT": "xml"})
    assert code == 2
    assert one_line(err).startswith("budgeter: error: BUDGETER_LOG_FORMAT: ")


# Ctrl-C ----------------------------------------------------------------------------------


async def test_ctrl_c_during_submit_wait_exits_130(
    env: dict[str, str], redis: RedisClient, tmp_path: Path
) -> None:
    await TenantStore(redis, prefix="budgeter").put("sigint-t", TenantPolicy())
    path = _batch_file(tmp_path / "batch.jsonl", 16, 16, 16)
    with interruptible():
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "budgeter", "submit", "--tenant", "sigint-t"),
            *(str(path), "--wait"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), LIMIT_S)
        batch_id = line.decode().strip()
        assert batch_id.startswith("msgbatch_")  # queued; no worker runs, so it waits
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert one_line(err.decode()) == (
        f"budgeter: interrupted; batch {batch_id} goes on (budgeter results {batch_id})"
    )


def _drain(fd: int, seen: threading.Event, out: list[bytes]) -> None:
    """Read a pty until it closes (the child never blocks on a full terminal)."""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its side
            return
        if not chunk:
            return
        out.append(chunk)
        seen.set()


@pytest.mark.usefixtures("redis")
async def test_ctrl_c_stops_top_with_130(env: dict[str, str]) -> None:
    """``top`` on a terminal (a pty): once it has drawn, Ctrl-C ends it with 130."""
    controller, terminal = pty.openpty()
    with interruptible():
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "budgeter", "top", "--interval", "1"),
            env=env,
            stdout=terminal,
            stderr=asyncio.subprocess.PIPE,
        )
    os.close(terminal)
    drawn, output = threading.Event(), list[bytes]()
    reader = threading.Thread(target=_drain, args=(controller, drawn, output), daemon=True)
    reader.start()
    try:
        assert await asyncio.to_thread(drawn.wait, LIMIT_S), "top drew nothing"
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(reader.join, LIMIT_S)
        os.close(controller)
    assert proc.returncode == 130
    assert "Traceback" not in err.decode() and "Traceback" not in b"".join(output).decode()


@pytest.mark.usefixtures("redis")
async def test_ctrl_c_drains_a_worker_and_exits_130(env: dict[str, str], tmp_path: Path) -> None:
    with interruptible():
        proc, _ = await start_budgeter(
            "worker", port_dir=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
        )
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), LIMIT_S)
    assert proc.returncode == 130
    assert "Traceback" not in err.decode()


# submit --wait exit statuses -----------------------------------------------------------


def _batch_file(path: Path, *max_tokens: int) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "params": {
                        "model": "claude-test",
                        "max_tokens": tokens,
                        "messages": [{"role": "user", "content": f"hello {i}"}],
                    },
                }
            )
            + "\n"
            for i, tokens in enumerate(max_tokens)
        )
    )
    return path


@pytest.mark.timeout(300)  # a worker and two submits on a busy machine
async def test_submit_wait_exits_0_only_when_every_request_succeeded(
    env: dict[str, str], redis: RedisClient, tmp_path: Path
) -> None:
    # a request larger than the whole budget is refused (errored), the small ones fit
    policy = TenantPolicy.model_validate({"budgets": {"total": 2000}})
    await TenantStore(redis, prefix="budgeter").put("wait-t", policy)
    async with mock_upstream() as (upstream_url, _):
        env = {**env, "BUDGETER_UPSTREAM_URL": upstream_url}
        worker, _ = await start_budgeter("worker", port_dir=tmp_path, env=env)
        try:
            all_ok = _batch_file(tmp_path / "ok.jsonl", 16, 16, 16)
            code, out, err = await run(
                "submit", "--tenant", "wait-t", str(all_ok), "--wait", env=env
            )
            assert code == 0, err
            assert one_line(err) == (
                f"batch {out.strip()} ended: 3 succeeded, 0 errored, 0 expired, 0 canceled"
            )
            mixed = _batch_file(tmp_path / "mixed.jsonl", 16, 5000, 16, 5000, 16)
            code, out, err = await run(
                "submit", "--tenant", "wait-t", str(mixed), "--wait", env=env
            )
            assert code == 3, err
            assert one_line(err) == (
                f"batch {out.strip()} ended: 3 succeeded, 2 errored, 0 expired, 0 canceled"
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), LIMIT_S) == 0
