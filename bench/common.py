"""Shared pieces of the benchmark rows: the Row record, servers started and stopped by
the bench (embedded Redis, budgeter processes), CPU accounting and optional profiling.

Every row measures a value and, in the same run, a reference next to it; only the ratio
is meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Row:
    """One line of the table: a measured value next to its side-by-side reference."""

    group: str  # the bench module (``--only`` name)
    metric: str
    value: float
    unit: str
    reference: float | None
    ref_label: str
    ratio: float | None
    target: str
    ok: bool | None  # None: informational (no target)
    note: str = ""
    command: str = ""


@dataclass
class Options:
    quick: bool = False
    profile_dir: Path | None = None  # set: attach py-spy / pyinstrument and write profiles
    extra: dict[str, Any] = field(default_factory=dict)


def run_standalone(run: Any, **options: type) -> None:
    """``python bench/bench_<row>.py [--quick] [--<option> VALUE ...]``: one row module on
    its own, printing its rows (``options``: name -> type; unset ones keep the row's
    defaults)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    for name, kind in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind)
    args = parser.parse_args()
    extra = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    for row in asyncio.run(run(Options(quick=args.quick, extra=extra))):
        print(row)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit in ("ms", "x"):
        text = f"{value:,.2f}"
    elif unit == "MB":
        text = f"{value:,.1f}"
    elif unit == "":
        text = f"{value:,.3f}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.2f}"
    return f"{text} {unit}".strip() if unit not in ("", "x") else (text + unit)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


# servers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_server(name: str = "bench") -> AsyncIterator[tuple[EmbeddedRedis, Any]]:
    """An embedded redis-server on a free loopback port (no persistence) and a client."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as data:
        server = EmbeddedRedis(data, appendonly=False)
        await asyncio.to_thread(server.start)
        client = make_redis(server.url)
        try:
            yield server, client
        finally:
            await client.aclose()
            await asyncio.to_thread(server.stop)


def base_env(redis_url: str, upstream_url: str = "http://127.0.0.1:9", **extra: str) -> dict:
    return {
        **os.environ,
        "BUDGETER_REDIS_URL": redis_url,
        "BUDGETER_UPSTREAM_URL": upstream_url,
        "BUDGETER_UPSTREAM_API_KEY": "bench-upstream",
        "BUDGETER_ADMIN_TOKEN": "bench",
        "BUDGETER_LOG_LEVEL": "ERROR",
        "BUDGETER_DRAIN_SECONDS": "1",
        **extra,
    }


class Proc:
    """A child process started by the bench; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self.popen = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stderr=self.log, cwd=str(ROOT)
        )
        self.ps = psutil.Process(self.popen.pid)
        self.spy: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        try:
            times = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def rss(self) -> int:
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def log_text(self) -> str:
        if getattr(self, "final_log", None) is not None:
            return str(self.final_log)
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""

    def log_count(self, needle: str) -> int:
        return self.log_text().count(needle)

    def start_profile(self, out: Path) -> None:
        """Attach py-spy (sampling, non-blocking) until :meth:`stop_profile`."""
        spy = Path(PY).with_name("py-spy")
        if not spy.exists():
            print(f"  (py-spy not installed in the venv: no profile of {self.name})")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.spy = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_profile(self) -> None:
        spy, self.spy = self.spy, None
        if spy is None:
            return
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        self.stop_profile()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        log = getattr(self, "log", None)
        if log is not None and not log.closed:
            log.close()
            self.final_log = self.log_text()
            if os.environ.get("BENCH_KEEP_LOGS") != "1":
                with contextlib.suppress(OSError):
                    os.unlink(log.name)


def budgeter_proc(name: str, argv: list[str], env: dict[str, str]) -> Proc:
    return Proc(name, [PY, "-m", "budgeter", *argv], env)


@contextlib.contextmanager
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()


async def wait_http(url: str, timeout_s: float = 30.0) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def start_mock(latency_ms: float, env: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    proc = budgeter_proc(
        "mock",
        ["mock-upstream", "--port", str(port), "--latency-ms", str(latency_ms)],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz")
    return proc, url


async def start_worker(
    env: dict[str, str], concurrency: int, *, script: str | None = None
) -> tuple[Proc, int]:
    """``budgeter worker`` (or a bench script taking the same arguments); waits for its
    /healthz."""
    port = free_port()
    args = ["--concurrency", str(concurrency), "--metrics-port", str(port)]
    if script is None:
        proc = budgeter_proc("worker", ["worker", *args], env)
    else:
        proc = Proc("worker", [PY, str(ROOT / "bench" / script), *args], env)
    await wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port


def redis_pid(server: EmbeddedRedis) -> Proc | None:
    """The embedded redis-server wrapped for CPU accounting (not stopped by the bench's Proc)."""
    if server.process is None:
        return None
    wrapper = Proc.__new__(Proc)
    wrapper.name = "redis"
    wrapper.popen = server.process  # type: ignore[assignment]
    wrapper.ps = psutil.Process(server.process.pid)
    wrapper.spy = None
    wrapper.log = None  # type: ignore[assignment]
    return wrapper


class CpuMeter:
    """CPU seconds used by some processes (and this one) between start and stop."""

    def __init__(self, procs: dict[str, Proc | None], *, include_self: bool = True) -> None:
        self.procs = {name: p for name, p in procs.items() if p is not None}
        self.include_self = include_self
        self.start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: p.cpu_s() for name, p in self.procs.items()}
        if self.include_self:
            t = psutil.Process().cpu_times()
            now["bench"] = t.user + t.system
        return now

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        """Adds to ``used``: a meter may be entered several times."""
        end = self._now()
        for name in end:
            self.used[name] = self.used.get(name, 0.0) + end[name] - self.start[name]

    def per_job_ms(self, jobs: int) -> str:
        return ", ".join(f"{name} {1000 * s / max(jobs, 1):.2f}" for name, s in self.used.items())


@contextlib.contextmanager
def profiled(opts: Options, name: str) -> Iterator[None]:
    """pyinstrument around an in-process section when ``--profile`` is given."""
    if opts.profile_dir is None:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        opts.profile_dir.mkdir(parents=True, exist_ok=True)
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        (opts.profile_dir / f"{name}.pyinstrument.txt").write_text(text)


def profile_path(opts: Options, name: str) -> Path | None:
    return None if opts.profile_dir is None else opts.profile_dir / f"{name}.pyspy.txt"


def elapsed_since(start: float) -> float:
    return time.perf_counter() - start


class RedisMonitor:
    """Counts the commands Redis receives (MONITOR) while active: per client address, and
    separately those run inside Lua scripts. A diagnostic for round trips per job."""

    LINE = re.compile(rb'^\+\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')

    def __init__(self, port: int) -> None:
        self.port = port
        self.commands: Counter[tuple[str, str]] = Counter()  # (addr | 'lua', COMMAND)
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RedisMonitor:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(b"MONITOR\r\n")
        await self._writer.drain()
        assert (await reader.readline()).startswith(b"+OK")
        self._task = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            m = self.LINE.match(line)
            if m:
                self.commands[(m[1].decode(), m[2].decode().upper())] += 1

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.2)  # let the last lines arrive
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def per_job(self, jobs: int, exclude: set[str]) -> tuple[float, float, str]:
        """(client commands per job, commands inside Lua per job, top client commands)."""
        client: Counter[str] = Counter()
        lua = 0
        for (addr, command), n in self.commands.items():
            if addr == "lua":
                lua += n
            elif addr not in exclude:
                client[command] += n
        top = ", ".join(f"{c.lower()} {n / jobs:.2f}" for c, n in client.most_common(8))
        return sum(client.values()) / jobs, lua / jobs, top


async def client_addrs(redis: Any, name: str) -> set[str]:
    return {c["addr"] for c in await redis.client_list() if c.get("name") == name}
