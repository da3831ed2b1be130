"""``make bench``: every benchmark row, one table.

Each row is a measured value next to a reference measured side by side in the same run
(the machine is shared, so only ratios are meaningful), its target and PASS/MISS. The
table is printed with rich and written as markdown to bench/results.md, with the command
that reproduces each row.

    .venv/bin/python bench/run_all.py [--quick] [--only admission,fairness] [--profile DIR]
        [--peers]

Rows (modules bench/bench_<name>.py, each with ``async def run(opts) -> list[Row]``):
admission, end_to_end, concurrency, proxy_latency, queue_scale, fairness, tree_fairness,
durability, ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import ROOT, Options, Row, fmt
from rich.console import Console
from rich.table import Table

ROWS = (
    "admission",
    "end_to_end",
    "concurrency",
    "proxy_latency",
    "queue_scale",
    "fairness",
    "tree_fairness",
    "durability",
    "ledger",
)
# rows run only when asked for: ``--peers`` adds bench/bench_peers.py (LiteLLM's proxy in
# its own venv .venv-peers/, installed on first use)
OPTIONAL_ROWS = ("peers",)
RESULTS = ROOT / "bench" / "results.md"
# bench/results.md from this line on is written by hand (why each miss remains, with its
# profile): every run keeps it below the table it writes
HAND_WRITTEN = "<!-- hand-written below: run_all.py keeps this part -->"


def hand_written() -> str:
    """The hand-written tail of bench/results.md (from the HAND_WRITTEN line), or ''."""
    try:
        text = RESULTS.read_text()
    except OSError:
        return ""
    at = text.find(HAND_WRITTEN)
    return "" if at < 0 else "\n" + text[at:]


def command_for(name: str, quick: bool) -> str:
    flags = (" --quick" if quick else "") + (" --peers" if name in OPTIONAL_ROWS else "")
    return f".venv/bin/python bench/run_all.py --only {name}{flags}"


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("PASS" if ok else "MISS")


def git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def render(rows: list[Row], header: str, console: Console) -> None:
    table = Table(title=header, show_lines=False, expand=False)
    for column, justify in (
        ("row", "left"),
        ("metric", "left"),
        ("measured", "right"),
        ("reference (same run)", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("result", "center"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        result = verdict(row.ok)
        style = {"PASS": "green", "MISS": "red", "info": "dim"}[result]
        table.add_row(
            row.group,
            row.metric,
            fmt(row.value, row.unit),
            f"{fmt(row.reference, row.unit)}\n[dim]{row.ref_label}[/dim]"
            if row.reference is not None
            else f"[dim]{row.ref_label}[/dim]",
            fmt(row.ratio, "x"),
            row.target,
            f"[{style}]{result}[/{style}]",
        )
    console.print(table)
    for row in rows:
        if row.note:
            console.print(f"[dim]- {row.group} / {row.metric}: {row.note}[/dim]")


def markdown(rows: list[Row], header: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"{header}",
        "",
        "Only the ratios are meaningful: every reference is measured in the same run, on "
        "the same machine, side by side with the value.",
        "",
        "| row | metric | measured | reference (same run) | ratio | target | result | command |",
        "| --- | --- | ---: | ---: | ---: | --- | :---: | --- |",
    ]
    for row in rows:
        reference = (
            f"{fmt(row.reference, row.unit)} ({row.ref_label})"
            if row.reference is not None
            else row.ref_label
        )
        lines.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    row.group,
                    row.metric,
                    fmt(row.value, row.unit),
                    reference,
                    fmt(row.ratio, "x"),
                    row.target,
                    f"**{verdict(row.ok)}**",
                    f"`{row.command}`",
                )
            )
            + " |"
        )
    notes = [f"- **{row.group} / {row.metric}**: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


async def run_rows(names: list[str], opts: Options, console: Console) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        console.print(f"[bold]▶ {name}[/bold]")
        started = time.perf_counter()
        try:
            got: list[Row] = await module.run(opts)
        except Exception:
            console.print(f"[red]{name} failed:[/red]\n{traceback.format_exc()}")
            got = [Row(name, "failed (see log)", 0.0, "", None, "—", None, "—", False, "exception")]
        for row in got:
            row.command = command_for(name, opts.quick)
        rows += got
        console.print(f"  {name}: {time.perf_counter() - started:.0f} s")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows")
    parser.add_argument("--only", default="", help=f"comma list of rows: {', '.join(ROWS)}")
    parser.add_argument("--profile", type=Path, default=None, help="write profiles to DIR")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="add the peers row: LiteLLM's proxy next to budgeter (installs .venv-peers/)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help=f"markdown output (default {RESULTS})"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n not in (*ROWS, *OPTIONAL_ROWS)]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS + OPTIONAL_ROWS)}")
    if args.peers and "peers" not in names:
        names.append("peers")
    if "peers" in names and not args.peers:
        parser.error("the peers row needs --peers (it installs LiteLLM into .venv-peers/)")
    console = Console(width=max(Console().width, 160))
    opts = Options(quick=args.quick, profile_dir=args.profile)
    started = time.perf_counter()
    rows = asyncio.run(run_rows(names, opts, console))
    took = time.perf_counter() - started
    load = os.getloadavg()
    header = (
        f"budgeter benchmarks ({'--quick' if args.quick else 'full'}; "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {git_head()}, "
        f"{os.cpu_count()} cores, load avg {load[0]:.1f}/{load[1]:.1f} at the end, "
        f"{took / 60:.1f} min)"
    )
    render(rows, header, console)
    target = args.results or RESULTS
    if args.results is None and (args.only or args.profile):
        target = ROOT / "bench" / "results-partial.md"  # keep the full table intact
    target.write_text(markdown(rows, header) + hand_written())
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    console.print(f"written to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
