"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as text: the functions
with the most samples inclusive (anywhere on the stack) and exclusive (on top), and the
budgeter lines that are on the stack most often.

    .venv/bin/python bench/profile_summary.py PROFILE.pyspy.txt [--top 30] [--focus budgeter]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse(path: Path) -> tuple[list[tuple[list[str], int]], int]:
    stacks: list[tuple[list[str], int]] = []
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        stacks.append((frames, int(count)))
        total += int(count)
    return stacks, total


def label(frame: str, *, with_line: bool) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    where = short(m["file"])
    if with_line and m["line"]:
        where += f":{m['line']}"
    return f"{m['func']} ({where})"


def summarise(path: Path, top: int, focus: str) -> str:
    stacks, total = parse(path)
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        names = [label(f, with_line=False) for f in frames]
        if frames and ("select (selectors.py" in frames[-1] or "epoll" in frames[-1]):
            idle += count
        for name in set(names):
            inclusive[name] += count
        exclusive[names[-1]] += count
        for f in set(frames):
            if focus in f:
                lines[label(f, with_line=True)] += count
    out = [f"{path.name}: {total} samples, {100 * idle / max(total, 1):.0f}% idle in select()"]
    out.append(f"\n-- inclusive (top {top}) --")
    for name, n in inclusive.most_common(top):
        out.append(f"{100 * n / total:6.1f}%  {name}")
    out.append(f"\n-- exclusive (top {top}) --")
    for name, n in exclusive.most_common(top):
        out.append(f"{100 * n / total:6.1f}%  {name}")
    out.append(f"\n-- {focus} lines on the stack (top {top}) --")
    for name, n in lines.most_common(top):
        out.append(f"{100 * n / total:6.1f}%  {name}")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--focus", default="budgeter/")
    args = parser.parse_args()
    for profile in args.profiles:
        print(summarise(profile, args.top, args.focus))
        print()
