"""Bench-only wrapper: ``budgeter worker`` exactly as shipped, except for

- the pools named in ``BENCH_UNLIMITED`` (comma list; empty: none): ``http``: every
  aiohttp TCPConnector gets ``limit=0, limit_per_host=0`` (whatever
  ``BUDGETER_UPSTREAM_MAX_CONNECTIONS`` says); ``redis``: a redis-py asyncio
  ConnectionPool created without a size gets ``max_connections=100_000`` (redis-py's
  default is 100; budgeter sizes its own pools by ``BUDGETER_REDIS_MAX_CONNECTIONS``);
- ``BENCH_PROFILE=PATH``: SIGUSR1 starts pyinstrument (a sample of the main thread every
  1 ms of its CPU time; ``BENCH_PROFILE_CLOCK=wall``: of wall time), SIGUSR2 stops it and
  writes PATH: self time (time on top of the stack) by package and by function, then
  pyinstrument's call tree. The CPU clock costs a clock_gettime per call and return
  (about 3x slower; call-heavy code looks a little heavier), but on a loaded machine the
  wall clock charges a socket write with the time the kernel ran other processes, and the
  event loop's wait (``run``) with idle time.

Used by the concurrency row to show what limits a worker once a pool does not, and by
``--profile`` (bench/common.py ``start_worker(..., profiled=True)``). Budgeter's own code
is not changed.

    BENCH_UNLIMITED=http,redis .venv/bin/python bench/worker_unlimited.py --concurrency 2000
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from redis.asyncio import connection as redis_connection

UNLIMITED = {x.strip() for x in os.environ.get("BENCH_UNLIMITED", "http").split(",")}
PROFILE = os.environ.get("BENCH_PROFILE")
CLOCK = os.environ.get("BENCH_PROFILE_CLOCK", "cpu")

if "http" in UNLIMITED:
    _connector_init = aiohttp.TCPConnector.__init__

    def _connector(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> None:
        kwargs["limit"] = kwargs["limit_per_host"] = 0  # whatever the settings asked
        _connector_init(self, *args, **kwargs)

    aiohttp.TCPConnector.__init__ = _connector  # type: ignore[method-assign]

if "redis" in UNLIMITED:
    _pool_init = redis_connection.ConnectionPool.__init__

    def _pool(self: Any, *args: Any, **kwargs: Any) -> None:
        # only where no size is given: 100,000 Redis connections opened at once would
        # overflow redis-server's listen backlog (511) into SYN retransmits
        kwargs["max_connections"] = kwargs.get("max_connections") or 100_000
        _pool_init(self, *args, **kwargs)

    redis_connection.ConnectionPool.__init__ = _pool  # type: ignore[method-assign]


def self_times(root: Any, top: int = 40) -> str:
    """The functions with the most self time (time on top of the stack), as shares of
    the whole; the event loop's own wait (uvloop / selectors) is idle time."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    stack = [root]
    while stack:
        frame = stack.pop()
        children = list(frame.children)
        stack.extend(children)
        rest = frame.time - sum(c.time for c in children)
        if rest <= 0:
            continue
        if frame.function in ("[self]", "[await]", "[out-of-context]") and frame.parent:
            frame = frame.parent
        path = frame.file_path_short or ""
        own[f"{frame.function} ({path}:{frame.line_no})"] += rest
        packages[_package(path, frame.function)] += rest
    total = root.time or 1.0
    lines = [f"self time by package, of {total:.2f} s sampled:"]
    lines += [f"{100 * t / total:6.1f}%  {name}" for name, t in packages.most_common()]
    lines += ["", f"self time, top {top} functions:"]
    lines += [f"{100 * t / total:6.1f}%  {name}" for name, t in own.most_common(top)]
    return "\n".join(lines)


def _package(path: str, function: str) -> str:
    if path.startswith("<built-in>") or not path:
        return "builtins (C calls)"
    if "budgeter/" in path:
        parts = path.split("budgeter/", 1)[1].split("/")
        return "budgeter/" + parts[0] if len(parts) > 1 else "budgeter"
    if function == "run" and path.startswith("asyncio/runners"):
        return "event loop (uvloop, C: idle in wall time)"
    return path.split("/", 1)[0].removesuffix(".py")


if PROFILE:
    from pyinstrument import Profiler
    from pyinstrument.stack_sampler import get_stack_sampler

    _profiler: Profiler | None = None
    _gc = {"began": 0.0, "spent": 0.0, "runs": 0.0, "gen2": 0.0}

    def _gc_timer(phase: str, info: dict[str, int]) -> None:
        """Time in the cyclic garbage collector (charged by the profile to whatever frame
        allocated when a collection began)."""
        if phase == "start":
            _gc["began"] = time.perf_counter()
        elif _gc["began"]:
            _gc["spent"] += time.perf_counter() - _gc["began"]
            _gc["runs"] += 1
            _gc["gen2"] += info.get("generation") == 2

    def _start(_sig: int, _frame: FrameType | None) -> None:
        global _profiler
        if _profiler is None:
            _gc.update(began=0.0, spent=0.0, runs=0.0, gen2=0.0)
            gc.callbacks.append(_gc_timer)
            if CLOCK == "cpu":  # the main thread's CPU time: where the CPU goes
                get_stack_sampler().timer_func = time.thread_time
            _profiler = Profiler(interval=0.001, async_mode="disabled")
            _profiler.start()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        global _profiler
        profiler, _profiler = _profiler, None
        if profiler is None:
            return
        session = profiler.stop()
        gc.callbacks.remove(_gc_timer)
        root = session.root_frame()
        tree = profiler.output_text(unicode=False, color=False, show_all=False)
        collector = (
            f"garbage collector: {_gc['runs']:.0f} collections ({_gc['gen2']:.0f} of the "
            f"oldest generation), {_gc['spent']:.2f} s of wall time while profiled"
        )
        text = (self_times(root) if root is not None else "(no samples)") + "\n\n"
        text += collector + "\n\n" + tree
        out = Path(str(PROFILE))
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)

if __name__ == "__main__":
    from budgeter.cli.commands import main

    sys.exit(main(["worker", *sys.argv[1:]]))
