"""``budgeter demo``: the real pipeline on embedded defaults.

An embedded redis-server, the built-in mock upstream, N worker processes, three tenants
with different policies (one meets its rate window, one exhausts its daily budget),
about 500 requests, progress bars and a final table. Exits 0 when every request reached
exactly one terminal state, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from budgeter.domain.messages import BatchRequest
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStatus, BatchStore
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis, die_with_parent, free_port
from budgeter.store.scripts import lua_source
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from budgeter.upstream.mock import MockConfig, create_app


@dataclass(frozen=True)
class DemoTenant:
    name: str
    share: float
    max_tokens: int
    policy: TenantPolicy
    story: str


TENANTS = (
    DemoTenant(
        "alpha",
        0.5,
        256,
        TenantPolicy(weight=2, budgets={"day": 5_000_000}, rate={"rpm": 6000}),
        "weight 2, 5M/day, 6000 rpm",
    ),
    DemoTenant(
        "beta",
        0.3,
        128,
        TenantPolicy(weight=1, rate={"rpm": 120, "otpm": 40_000}),
        "120 rpm, 40k otpm",
    ),
    DemoTenant(
        "gamma",
        0.2,
        128,
        TenantPolicy(weight=1, budgets={"day": 5_000}),
        "5k tokens/day",
    ),
)

TOPICS = (
    "why API gateways matter",
    "token buckets versus leaky buckets",
    "weighted fair queueing",
    "idempotent job submission",
    "calendar budgets in UTC",
    "settling reservations exactly once",
)


def demo_requests(tenant: DemoTenant, count: int) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{tenant.name}-{i:04d}",
                "params": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": tenant.max_tokens,
                    "messages": [
                        {
                            "role": "user",
                            "content": f"In two sentences, explain {TOPICS[i % len(TOPICS)]} "
                            f"(request {i} of {tenant.name}).",
                        }
                    ],
                },
            }
        )
        for i in range(count)
    ]


async def scrape_decisions(session: aiohttp.ClientSession, ports: list[int]) -> dict[str, int]:
    """DEFER decisions per tenant, summed over every worker's /metrics (one job can be
    deferred many times: each pick of a job its window cannot hold yet is a decision)."""
    deferred: dict[str, int] = {}
    for port in ports:
        try:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
        except aiohttp.ClientError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name != "budgeter_admission_decisions":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("decision") == "DEFER":
                    tenant = sample.labels["tenant"]
                    deferred[tenant] = deferred.get(tenant, 0) + int(sample.value)
    return deferred


_REQUEUE_SHA = hashlib.sha1(lua_source("queue/requeue.lua").encode()).hexdigest()
_TENANT_TAG = re.compile(r"\{t:([a-z0-9][a-z0-9_-]*)\}")


def deferred_job(command: str) -> tuple[str, str] | None:
    """(tenant, job id) when a MONITOR line is a worker deferring a job: queue/requeue.lua
    called with ARGV[3] = '1' (back to the head of its queue, not counted as an attempt;
    see JobQueue.defer). None for any other command."""
    parts = command.split(" ")
    if len(parts) < 4 or parts[0].upper() != "EVALSHA" or parts[1] != _REQUEUE_SHA:
        return None
    try:
        numkeys = int(parts[2])
    except ValueError:
        return None
    keys, argv = parts[3 : 3 + numkeys], parts[3 + numkeys :]
    tag = _TENANT_TAG.search(keys[0]) if keys else None
    if tag is None or len(argv) < 3 or argv[2] != "1":
        return None
    return tag.group(1), argv[0]


@dataclass
class DeferWatch:
    """The jobs deferred at least once, per tenant, seen on the demo's own Redis through
    MONITOR (the workers are separate processes; their metrics count decisions, not
    jobs). Only the demo's embedded server is watched."""

    jobs: dict[str, set[str]] = field(default_factory=dict)

    def see(self, command: str) -> None:
        found = deferred_job(command)
        if found is not None:
            self.jobs.setdefault(found[0], set()).add(found[1])

    def count(self, tenant: str) -> int:
        return len(self.jobs.get(tenant, ()))

    async def run(self, url: str, started: asyncio.Event) -> None:
        """Until cancelled; ``started`` is set once MONITOR is on."""
        redis = Redis.from_url(url, decode_responses=True)
        try:
            async with redis.monitor() as monitor:
                started.set()
                while True:
                    self.see((await monitor.next_command())["command"])
        finally:
            await redis.aclose()


COLUMNS = (
    "tenant",
    "policy",
    "succeeded",
    "jobs deferred",
    "DEFER decisions",
    "rejected",
    "expired",
    "tokens used/budget",
    "jobs/s",
)
"""The final table: 'jobs deferred' counts jobs deferred at least once, 'DEFER
decisions' every DEFER answer (a job is asked again each time its tenant is picked)."""


def summary_lines(title: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """The final table as plain aligned lines, for a stdout that is not a terminal: no
    colour, no box, and a cell is never wrapped however long the line gets."""
    table = [list(COLUMNS), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    left = {0, 1}
    lines = [title]
    for r in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def print_summary(console: Console, title: str, rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal wide enough for every column but the policy (which ends
    in an ellipsis when it does not fit); plain lines otherwise. No cell ever wraps."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    # each column has a space either side and a rule after it, plus the first rule
    room_for_policy = console.width - (sum(widths) - widths[1] + 3 * len(COLUMNS) + 1)
    if not console.is_terminal or room_for_policy < 10:
        console.file.write("\n".join(summary_lines(title, rows)) + "\n")
        console.file.flush()
        return
    table = Table(title=title)
    for column, width in zip(COLUMNS, widths, strict=True):
        policy = column == "policy"
        table.add_column(
            column,
            justify="left" if column in ("tenant", "policy") else "right",
            no_wrap=True,
            overflow="ellipsis",
            min_width=None if policy else width,
            max_width=min(width, room_for_policy) if policy else width,
        )
    for r in rows:
        table.add_row(*r)
    console.print(table)


async def run_demo(
    settings: Settings,
    *,
    requests: int = 500,
    workers: int = 2,
    latency_ms: float = 40.0,
    progress: bool = True,
    timeout_s: float = 300.0,
) -> int:
    console = Console(stderr=True)
    data_dir = settings.data_dir / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = EmbeddedRedis(data_dir, appendonly=True)
    await asyncio.to_thread(server.start)
    processes: list[asyncio.subprocess.Process] = []
    redis = make_redis(server.url)
    try:
        mock = create_app(MockConfig(latency_ms=latency_ms, api_key="demo-upstream-key"))
        async with serve_app(mock, "127.0.0.1", 0) as mock_port, aiohttp.ClientSession() as http:
            console.print(
                f"[bold]budgeter demo[/]: embedded redis {server.url}, mock upstream "
                f"http://127.0.0.1:{mock_port}, {workers} worker processes",
                soft_wrap=True,
            )
            metrics_ports = [free_port() for _ in range(workers)]
            env = {
                **os.environ,
                "BUDGETER_REDIS_URL": server.url,
                "BUDGETER_UPSTREAM_URL": f"http://127.0.0.1:{mock_port}",
                "BUDGETER_UPSTREAM_API_KEY": "demo-upstream-key",
                "BUDGETER_LOG_LEVEL": "WARNING",
                "BUDGETER_KEY_PREFIX": settings.key_prefix,
            }
            for port in metrics_ports:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "budgeter",
                        "worker",
                        "--concurrency",
                        "16",
                        "--metrics-port",
                        str(port),
                        env=env,
                        preexec_fn=die_with_parent,
                    )
                )
            store = TenantStore(redis, prefix=settings.key_prefix)
            batches = BatchStore(redis, prefix=settings.key_prefix)
            plan: list[tuple[DemoTenant, int]] = []
            remaining = requests
            for index, tenant in enumerate(TENANTS):
                count = remaining if index == len(TENANTS) - 1 else round(requests * tenant.share)
                remaining -= count
                await store.put(tenant.name, tenant.policy)
                plan.append((tenant, count))
            watch = DeferWatch()
            watching = asyncio.Event()
            watcher = asyncio.create_task(watch.run(server.url, watching))
            await asyncio.wait(
                [watcher, asyncio.create_task(watching.wait())],
                return_when=asyncio.FIRST_COMPLETED,
                timeout=30,
            )
            started = time.monotonic()
            submitted: list[tuple[DemoTenant, str, int]] = []
            try:
                for tenant, count in plan:
                    batch_id = await batches.create(tenant.name, demo_requests(tenant, count))
                    submitted.append((tenant, batch_id, count))
                finished_at: dict[str, float] = {}
                statuses = await _watch(
                    batches, submitted, finished_at, started, console, progress, timeout_s
                )
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
            decisions = await scrape_decisions(http, metrics_ports)
            elapsed = time.monotonic() - started
            rows = []
            now_ms = int(time.time() * 1000)
            for tenant, batch_id, count in submitted:
                span = finished_at.get(batch_id, time.monotonic()) - started
                used = await _tokens_today(redis, tenant.name, settings.key_prefix, now_ms)
                rows.append(
                    summary_row(
                        tenant,
                        statuses[batch_id],
                        count,
                        used,
                        span,
                        jobs_deferred=watch.count(tenant.name),
                        decisions=decisions.get(tenant.name, 0),
                    )
                )
            print_summary(
                Console(),
                f"budgeter demo: {requests} requests in {elapsed:.1f} s",
                rows,
            )
            all_terminal = all(
                statuses[b].processing == 0 and statuses[b].total == n for _, b, n in submitted
            )
            total = sum(s.total - s.processing for s in statuses.values())
            console.print(
                f"throughput: {total / elapsed:.1f} jobs/s over {elapsed:.1f} s "
                f"({workers} workers x 16 coroutines, mock latency {latency_ms:.0f} ms)",
                soft_wrap=True,
            )
            if not all_terminal:
                console.print("[red]some requests did not reach a terminal state[/]")
                return 1
            return 0
    finally:
        await _stop_processes(processes)
        await redis.aclose()
        await asyncio.to_thread(server.stop)


def summary_row(
    tenant: DemoTenant,
    status: BatchStatus,
    count: int,
    used: int,
    span_s: float,
    *,
    jobs_deferred: int,
    decisions: int,
) -> list[str]:
    limit = tenant.policy.budgets.get("day")
    return [
        tenant.name,
        tenant.story,
        str(status.succeeded),
        str(jobs_deferred),
        str(decisions),
        str(status.errored),
        str(status.expired),
        f"{used:,}/{limit:,}" if limit else f"{used:,}/-",
        f"{count / span_s:.1f}" if span_s > 0 else "-",
    ]


async def _tokens_today(redis: RedisClient, tenant: str, prefix: str, now_ms: int) -> int:
    report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
    return int(
        sum(
            row.amount(kind) or 0
            for row in (report.usage if report else [])
            if row.period == "day"
            for kind in ("input", "output", "cache_creation", "cache_read")
        )
    )


async def _watch(
    batches: BatchStore,
    submitted: list[tuple[DemoTenant, str, int]],
    finished_at: dict[str, float],
    started: float,
    console: Console,
    show: bool,
    timeout_s: float,
) -> dict[str, BatchStatus]:
    statuses: dict[str, BatchStatus] = {}
    with Progress(
        TextColumn("[bold]{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not (show and console.is_terminal),
    ) as bar:
        tasks = {
            batch_id: bar.add_task(tenant.name, total=count, detail="")
            for tenant, batch_id, count in submitted
        }
        deadline = started + timeout_s
        while True:
            for tenant, batch_id, _ in submitted:
                name = tenant.name
                status = await batches.status(batch_id)
                statuses[batch_id] = status
                if status.ended and batch_id not in finished_at:
                    finished_at[batch_id] = time.monotonic()
                    if show and not console.is_terminal:  # a line per batch, not a bar
                        line = _ended_line(name, status, finished_at[batch_id] - started)
                        console.print(line, soft_wrap=True, markup=False)
                bar.update(
                    tasks[batch_id],
                    completed=status.total - status.processing,
                    detail=f"ok {status.succeeded:>4}  refused {status.errored:>4}",
                )
            if all(s.ended for s in statuses.values()) or time.monotonic() > deadline:
                return statuses
            await asyncio.sleep(0.25)


def _ended_line(name: str, status: BatchStatus, after_s: float) -> str:
    return (
        f"{name}: {status.total} requests ended after {after_s:.1f} s "
        f"(ok {status.succeeded}, refused {status.errored}, expired {status.expired})"
    )


async def _stop_processes(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), timeout=30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
