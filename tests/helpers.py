"""Shared test helpers: a mock upstream served on loopback, waiting for batches, starting
``budgeter`` processes on port 0 and reading the port they bound."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from budgeter.domain.messages import BatchRequest
from budgeter.queue.batches import BatchStore
from budgeter.serving import serve_app
from budgeter.store.durability import NotReplicated
from budgeter.upstream.mock import MockConfig, create_app


@asynccontextmanager
async def mock_upstream(
    config: MockConfig | None = None,
) -> AsyncIterator[tuple[str, web.Application]]:
    app = create_app(config or MockConfig())
    async with serve_app(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}", app


def requests_for(
    prefix: str, count: int, *, max_tokens: int = 64, model: str = "claude-test"
) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{prefix}-{i}",
                "params": {
                    "model": model,
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"question {i} from {prefix}"}],
                },
            }
        )
        for i in range(count)
    ]


async def wait_ended(store: BatchStore, batch_ids: list[str], *, timeout_s: float = 60) -> None:
    """Wait (bounded) until every batch has ended; the timeout only guards a hang."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                statuses = [await store.status(b) for b in batch_ids]
            except (RedisError, OSError, AttributeError):  # the poll's own connection lost
                await asyncio.sleep(0.2)  # in a failover (redis-py may trip on it): again
                continue
            if all(s.ended for s in statuses):
                return
            await asyncio.sleep(0.05)


async def wait_http(url: str, timeout_s: float = 30) -> None:
    """Wait (bounded) until ``url`` answers 200: a process started by a test is serving."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


def listen_args(port_file: Path) -> list[str]:
    """Flags for ``budgeter api``, ``worker`` or ``mock-upstream``: bind port 0 and write
    the port bound to ``port_file`` (no free port picked, released, then raced for)."""
    return ["--port", "0", "--port-file", str(port_file)]


def _port_in(port_file: Path) -> int | None:
    text = port_file.read_text() if port_file.exists() else ""
    return int(text) if text.endswith("\n") else None  # written whole (renamed into place)


async def read_port(
    port_file: Path, proc: asyncio.subprocess.Process, timeout_s: float = 60
) -> int:
    """The port a process started with :func:`listen_args` bound, once it listens."""
    async with asyncio.timeout(timeout_s):
        while True:
            port = _port_in(port_file)
            if port is not None:
                return port
            if proc.returncode is not None:
                raise AssertionError(
                    f"{port_file.stem} exited ({proc.returncode}) before listening"
                )
            await asyncio.sleep(0.02)


async def start_budgeter(
    command: str, *args: str, port_dir: Path, name: str | None = None, **kwargs: Any
) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``budgeter COMMAND ARGS --port 0 --port-file ...`` (keyword arguments go to
    :func:`asyncio.create_subprocess_exec`); returns the process and the port it bound."""
    port_file = port_dir / f"{name or command}.port"
    port_file.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "budgeter", command, *args, *listen_args(port_file), **kwargs
    )
    try:
        return proc, await read_port(port_file, proc)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise


def read_port_blocking(
    port_file: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60
) -> int:
    """:func:`read_port` for a process started with :class:`subprocess.Popen`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = _port_in(port_file)
        if port is not None:
            return port
        if proc.poll() is not None:
            raise AssertionError(f"{port_file.stem} exited ({proc.returncode}) before listening")
        time.sleep(0.02)
    raise TimeoutError(f"{port_file.stem} did not listen within {timeout_s} s")


class UnreplicatedAfter:
    """A registered script that runs and then fails as a WAIT that fell short would
    (``NotReplicated`` carrying its reply: the write is on the master, the caller gets the
    error) on each call numbered in ``failing`` (1 = the first; None: every call).
    ``calls`` counts the calls. Put it in place of a script attribute of the object under
    test (``Admission._reserve``, ``JobQueue._dequeue``)."""

    def __init__(self, script: Any, failing: set[int] | None = None) -> None:
        self._real = script
        self.script = script.script
        self.failing = failing
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        reply = await self._real(*args, **kwargs)
        if self.failing is None or self.calls in self.failing:
            raise NotReplicated("1 replica wanted, 0 acknowledged").with_reply(reply)
        return reply
