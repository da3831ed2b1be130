"""Bench-only wrapper: ``budgeter api`` exactly as shipped, with pyinstrument ready in the
process: SIGUSR1 starts it (main thread, 0.5 ms interval, no async attribution, so a
function is on the stack only while it runs: its time is CPU, or a blocking syscall, or
the process preempted inside it), SIGUSR2 stops it and writes ``BENCH_PROFILE`` (JSON:
seconds sampled, the event loop's idle wait, the functions with the most self time and
with the most inclusive time) and, beside it, pyinstrument's call tree as text. Used by
the proxy_latency row under ``--profile DIR``.

``BENCH_API_PATCH`` (comma list; a diagnostic, never a measured row) changes budgeter
in this process only: ``no_headers`` answers no rate-limit headers, so the proxy makes no
Redis read for them (what reading them costs a call).

    BENCH_PROFILE=/tmp/api.json .venv/bin/python bench/api_profiled.py --port 8080
    BENCH_API_PATCH=no_headers .venv/bin/python bench/bench_proxy_latency.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path
from types import FrameType

from pyinstrument import Profiler
from pyinstrument.frame import Frame

PROFILE = os.environ.get("BENCH_PROFILE", "")
# self time here is the event loop waiting for work (uvloop's loop is C: it shows as its caller)
IDLE = ("asyncio/runners.py", "selectors.py", "asyncio/base_events.py")
TOP = 60


def name(frame: Frame) -> str:
    return f"{frame.function} ({frame.file_path_short}:{frame.line_no})"


def summary(root: Frame) -> dict[str, object]:
    own: defaultdict[str, float] = defaultdict(float)
    inclusive: defaultdict[str, float] = defaultdict(float)
    idle = 0.0
    stack: list[tuple[Frame, frozenset[str]]] = [(root, frozenset())]
    while stack:
        frame, above = stack.pop()
        if frame.is_synthetic:
            continue
        key = name(frame)
        children = [c for c in frame.children if not c.is_synthetic]
        rest = frame.time - sum(c.time for c in children)
        if any(marker in (frame.file_path_short or "") for marker in IDLE):
            idle += rest
        else:
            own[key] += rest
        if key not in above:  # recursion: counted once per stack
            inclusive[key] += frame.time
        stack.extend((c, above | {key}) for c in children)
    return {
        "seconds": root.time,
        "idle": idle,
        "self": sorted(own.items(), key=lambda kv: -kv[1])[:TOP],
        "inclusive": sorted(inclusive.items(), key=lambda kv: -kv[1])[:TOP],
    }


_profiler: Profiler | None = None


def _start(_sig: int, _frame: FrameType | None) -> None:
    global _profiler
    if _profiler is None:
        _profiler = Profiler(interval=0.0005, async_mode="disabled")
        _profiler.start()


def _stop(_sig: int, _frame: FrameType | None) -> None:
    global _profiler
    profiler, _profiler = _profiler, None
    if profiler is None:
        return
    session = profiler.stop()
    root = session.root_frame(trim_stem=False)
    out = Path(PROFILE)
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    out.with_suffix(".tree.txt").write_text(text)
    data = summary(root) if root is not None else {"seconds": 0.0}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)  # last: the bench waits for this file


def patch(names: set[str]) -> None:
    if "no_headers" in names:
        from budgeter.api import proxy

        async def no_headers(*_args: object, **_kwargs: object) -> dict[str, str]:
            return {}

        setattr(proxy, "tenant_ratelimit_headers", no_headers)  # noqa: B010 - a bench patch


if __name__ == "__main__":
    patch({x.strip() for x in os.environ.get("BENCH_API_PATCH", "").split(",") if x.strip()})
    if PROFILE:
        signal.signal(signal.SIGUSR1, _start)
        signal.signal(signal.SIGUSR2, _stop)
    from budgeter.cli.commands import main

    sys.exit(main(["api", *sys.argv[1:]]))
