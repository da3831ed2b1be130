"""cli/demo.py: the final table counts jobs deferred at least once apart from DEFER
decisions, and prints cleanly both on a terminal and into a pipe."""

from __future__ import annotations

import asyncio
import io

from redis.asyncio import Redis
from rich.console import Console

from budgeter.cli.demo import (
    _REQUEUE_SHA,
    COLUMNS,
    TENANTS,
    DeferWatch,
    deferred_job,
    demo_requests,
    print_summary,
    summary_lines,
    summary_row,
)
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStatus, BatchStore
from budgeter.queue.jobqueue import JobQueue
from budgeter.tenants.store import TenantStore

TITLE = "budgeter demo: 500 requests in 19.3 s"


def rows() -> list[list[str]]:
    def status(ok: int, errored: int) -> BatchStatus:
        return BatchStatus("b", "t", 0, 0, 1, None, 0, ok, errored, 0, 0)

    alpha, beta, gamma = TENANTS
    return [
        summary_row(alpha, status(250, 0), 250, 31_637, 11.0, jobs_deferred=0, decisions=0),
        summary_row(beta, status(150, 0), 150, 13_340, 19.2, jobs_deferred=19, decisions=180),
        summary_row(gamma, status(62, 38), 100, 4_955, 9.6, jobs_deferred=11, decisions=26),
    ]


def test_jobs_deferred_and_decisions_are_two_columns() -> None:
    assert "jobs deferred" in COLUMNS and "DEFER decisions" in COLUMNS
    beta = dict(zip(COLUMNS, rows()[1], strict=True))
    assert beta["jobs deferred"] == "19" and beta["DEFER decisions"] == "180"
    assert beta["succeeded"] == "150" and beta["tokens used/budget"] == "13,340/-"
    gamma = dict(zip(COLUMNS, rows()[2], strict=True))
    assert gamma["rejected"] == "38" and gamma["tokens used/budget"] == "4,955/5,000"


def test_into_a_pipe_plain_lines_that_never_wrap() -> None:
    out = io.StringIO()
    console = Console(file=out, width=40)  # not a terminal, and narrow
    assert not console.is_terminal
    print_summary(console, TITLE, rows())
    text = out.getvalue()
    assert "\x1b[" not in text  # no colour codes
    assert not any(ch in text for ch in "┃│━─┏")  # no box drawing
    lines = text.splitlines()
    assert lines[0] == TITLE
    assert lines[1].split("  ")[0] == "tenant" and "jobs deferred" in lines[1]
    assert len(lines) == 5  # title, header, one line per tenant: nothing wrapped
    assert lines[3].split() == [
        "beta",
        "120",
        "rpm,",
        "40k",
        "otpm",
        "150",
        "19",
        "180",
        "0",
        "0",
        "13,340/-",
        "7.8",
    ]
    assert summary_lines(TITLE, rows()) == lines
    assert len({len(line) for line in lines[1:]}) <= 2  # aligned columns


def test_on_a_terminal_a_table_whose_cells_do_not_wrap() -> None:
    for width in (200, 125, 100):
        out = io.StringIO()
        console = Console(file=out, width=width, force_terminal=True, color_system=None)
        print_summary(console, TITLE, rows())
        text = out.getvalue()
        lines = text.splitlines()
        body = [line for line in lines if line.lstrip("│ ").startswith(("alpha", "beta", "gamma"))]
        assert len(body) == 3, lines  # each tenant on one line: nothing wrapped
        beta = body[1]
        for cell in ("150", "19", "180", "13,340/-", "7.8"):
            assert f" {cell} " in beta + " ", (cell, beta)
        if width >= 125:  # a table, as wide as the terminal at most
            assert "┃" in text and all(len(line) <= width for line in lines)
            assert "jobs deferred" in text and "DEFER decisions" in text
        else:  # too narrow even without the policy: the plain lines, not a squeezed table
            assert lines == summary_lines(TITLE, rows())
        if width == 200:
            assert "120 rpm, 40k otpm" in beta


def test_other_commands_are_no_defer() -> None:
    for line in (
        "",
        "GET x",
        "EVALSHA abc 1 budgeter:{t:a}:queue job head 1 1",  # another script
        f"EVALSHA {_REQUEUE_SHA} 1 budgeter:{{t:a}}:queue job tail 0 1",  # a retry
        f"EVALSHA {_REQUEUE_SHA} x",
    ):
        assert deferred_job(line) is None, line
    line = f"EVALSHA {_REQUEUE_SHA} 2 budgeter:{{t:a-1}}:queue k2 b1:c1 head 1 3"
    assert deferred_job(line) == ("a-1", "b1:c1")


async def test_the_watch_counts_jobs_not_decisions(redis: Redis, redis_url: str) -> None:
    """A worker's JobQueue.defer, seen through MONITOR: two jobs deferred three times in
    all count as two; a failed attempt put back (retry_later) counts as none."""
    await TenantStore(redis).put("deferring", TenantPolicy())
    batch = await BatchStore(redis).create("deferring", demo_requests(TENANTS[1], 3))
    queue = JobQueue(redis)
    watch = DeferWatch()
    seen: list[str] = []
    original = watch.see

    def see(command: str) -> None:
        seen.append(command)
        original(command)

    watch.see = see  # type: ignore[method-assign]
    started = asyncio.Event()
    task = asyncio.create_task(watch.run(redis_url, started))
    try:
        await asyncio.wait_for(started.wait(), timeout=30)
        for job_index in (0, 0, 1):
            picks = await queue.pick_many(3, lease_ms=60_000)
            jobs = sorted(picks.jobs, key=lambda j: j.custom_id)
            for j, job in enumerate(jobs):
                if j == job_index:
                    assert await queue.defer(job, 0) == "requeued"
                else:
                    assert await queue.requeue(job, head=True, count_attempt=True) == "requeued"
            await queue.activate("deferring", unpark=True)
        third = await queue.pick_many(1, lease_ms=60_000)
        assert await queue.retry_later(third.jobs[0]) == "requeued"
        await redis.echo("the-end")
        for _ in range(600):  # MONITOR streams in order: once this is seen, all was
            if any(c == "ECHO the-end" for c in seen):
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert watch.count("deferring") == 2
    assert watch.jobs["deferring"] == {f"{batch}:beta-0000", f"{batch}:beta-0001"}
