"""Shared pieces of the benchmark rows: the Row record, servers started and stopped by
the bench (embedded Redis, budgeter processes), CPU accounting and optional profiling.

Every row measures a value and, in the same run, a reference next to it; only the ratio
is meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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

    def __init__(
        self, name: str, args: list[str], env: dict[str, str] | None = None, *, pipes: bool = False
    ) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        std = subprocess.PIPE if pipes else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdin=std,
            stdout=subprocess.PIPE if pipes else None,
            stderr=self.log,
            cwd=str(ROOT),
        )
        self.ps = psutil.Process(self.popen.pid)
        self.spy: subprocess.Popen[bytes] | None = None
        # set: the process runs bench/worker_unlimited.py with BENCH_PROFILE=<this path>,
        # and start_profile / stop_profile drive its pyinstrument by SIGUSR1 / SIGUSR2
        self.pyinstrument: Path | None = None
        self._profile_out: Path | None = None

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
        """Attach py-spy (sampling, non-blocking) until :meth:`stop_profile`; a process
        started with pyinstrument inside (``start_worker(..., profiled=True)``) starts it."""
        if getattr(self, "pyinstrument", None) is not None:
            self._profile_out = out.with_name(out.name.replace(".pyspy", ".pyinstrument"))
            self.popen.send_signal(signal.SIGUSR1)
            return
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
        out, self._profile_out = getattr(self, "_profile_out", None), None
        if out is not None and getattr(self, "pyinstrument", None) is not None:
            assert self.pyinstrument is not None
            self.pyinstrument.unlink(missing_ok=True)
            self.popen.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not self.pyinstrument.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            out.parent.mkdir(parents=True, exist_ok=True)
            if self.pyinstrument.exists():
                self.pyinstrument.replace(out)
                self.last_profile = out
                print(f"  profile of {self.name}: {out}")
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


async def start_mocks(count: int, latency_ms: float, env: dict[str, str]) -> tuple[list[Proc], str]:
    """``count`` mock processes listening on one port with SO_REUSEPORT (the kernel
    spreads the connections between them), so that the mock is not what a row measures."""
    port = free_port()
    argv = ["mock-upstream", "--port", str(port), "--latency-ms", str(latency_ms), "--reuse-port"]
    files = Path(tempfile.mkdtemp(prefix="bench-mocks-"))
    mocks = [
        budgeter_proc(f"mock{i}", [*argv, "--port-file", str(files / str(i))], env)
        for i in range(count)
    ]
    for i, mock in enumerate(mocks):  # each writes its port file once it listens
        for _ in range(600):
            if (files / str(i)).exists() or mock.popen.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if not (files / str(i)).exists():
            raise RuntimeError(f"{mock.name} did not start: {mock.log_text()[-2000:]}")
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz")
    return mocks, url


class DirectClient(Proc):
    """bench/direct_client.py in its own process (the worker's event loop), driven by
    JSON lines on its stdin (see that file)."""

    def __init__(self, name: str, url: str, env: dict[str, str]) -> None:
        super().__init__(name, [PY, str(ROOT / "bench" / "direct_client.py"), url], env, pipes=True)

    def _call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(command).encode() + b"\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited: {self.log_text()[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, {"cmd": cmd, **args})

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        super().stop(kill=kill, timeout_s=timeout_s)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


async def start_worker(
    env: dict[str, str],
    concurrency: int,
    *,
    script: str | None = None,
    profiled: bool = False,
) -> tuple[Proc, int]:
    """``budgeter worker`` (or a bench script taking the same arguments); waits for its
    /healthz. ``profiled``: run it inside bench/worker_unlimited.py (with no pool patched
    unless ``BENCH_UNLIMITED`` says so) with pyinstrument ready for ``start_profile``."""
    port = free_port()
    args = ["--concurrency", str(concurrency), "--metrics-port", str(port)]
    profile: Path | None = None
    if profiled:
        profile = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "worker.txt"
        env = {"BENCH_UNLIMITED": "", **env, "BENCH_PROFILE": str(profile)}
        script = script or "worker_unlimited.py"
    if script is None:
        proc = budgeter_proc("worker", ["worker", *args], env)
    else:
        proc = Proc("worker", [PY, str(ROOT / "bench" / script), *args], env)
    proc.pyinstrument = profile
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


def cpu_wait_s(proc: Proc) -> float:
    """Seconds the process's main thread spent runnable, waiting for a CPU
    (/proc/PID/schedstat, second field; 0 where the kernel keeps no schedstat)."""
    try:
        return int(Path(f"/proc/{proc.pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def profile_digest(proc: Proc, packages: int = 6, functions: int = 4) -> str:
    """One line for a row's note from the pyinstrument profile ``proc`` last wrote (see
    bench/worker_unlimited.py): its top packages and functions by self time; "" if none."""
    path: Path | None = getattr(proc, "last_profile", None)
    if path is None or not path.exists():
        return ""
    sections = path.read_text().split("\n\n")
    by_package = [ln.strip() for ln in sections[0].splitlines()[1:]][:packages]
    top = (
        [ln.strip() for ln in sections[1].splitlines()[1:]][:functions] if len(sections) > 1 else []
    )
    collector = next((x.strip() for x in sections[2:3] if x.startswith("garbage")), "")
    clock = os.environ.get("BENCH_PROFILE_CLOCK", "cpu")
    return (
        f"profile of the {proc.name} ({path.name}, pyinstrument, {clock} clock), self time by "
        f"package: {', '.join(by_package)}; top functions: {', '.join(top)}"
        + (f"; {collector}" if collector else "")
    )


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
