"""``budgeter demo``: the real pipeline on embedded defaults.

An embedded redis-server, the built-in mock upstream, N worker processes, three tenants
with different policies (one meets its rate window, one exhausts its daily budget),
about 500 requests, progress bars and a final table. Exits 0 when every request reached
exactly one terminal state, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
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
    """DEFER decisions per tenant, summed over every worker's /metrics."""
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
                f"http://127.0.0.1:{mock_port}, {workers} worker processes"
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
            started = time.monotonic()
            submitted: list[tuple[DemoTenant, str, int]] = []
            for tenant, count in plan:
                batch_id = await batches.create(tenant.name, demo_requests(tenant, count))
                submitted.append((tenant, batch_id, count))
            finished_at: dict[str, float] = {}
            statuses = await _watch(
                batches, submitted, finished_at, started, console, progress, timeout_s
            )
            deferred = await scrape_decisions(http, metrics_ports)
            elapsed = time.monotonic() - started
            table = Table(title=f"budgeter demo: {requests} requests in {elapsed:.1f} s")
            for column in (
                "tenant",
                "policy",
                "succeeded",
                "deferred",
                "rejected",
                "expired",
                "tokens used/budget",
                "jobs/s",
            ):
                table.add_column(
                    column, justify="left" if column in ("tenant", "policy") else "right"
                )
            now_ms = int(time.time() * 1000)
            all_terminal = True
            for tenant, batch_id, count in submitted:
                status = statuses[batch_id]
                all_terminal &= status.processing == 0 and status.total == count
                report = await tenant_usage(
                    redis, tenant.name, prefix=settings.key_prefix, now_ms=now_ms
                )
                used = sum(
                    row.amount(kind) or 0
                    for row in (report.usage if report else [])
                    if row.period == "day"
                    for kind in ("input", "output", "cache_creation", "cache_read")
                )
                limit = tenant.policy.budgets.get("day")
                span = finished_at.get(batch_id, time.monotonic()) - started
                table.add_row(
                    tenant.name,
                    tenant.story,
                    str(status.succeeded),
                    str(deferred.get(tenant.name, 0)),
                    str(status.errored),
                    str(status.expired),
                    f"{used:,}/{limit:,}" if limit else f"{used:,}/-",
                    f"{count / span:.1f}" if span > 0 else "-",
                )
            Console(width=max(Console().width, 110)).print(table)
            total = sum(s.total - s.processing for s in statuses.values())
            console.print(
                f"throughput: {total / elapsed:.1f} jobs/s over {elapsed:.1f} s "
                f"({workers} workers x 16 coroutines, mock latency {latency_ms:.0f} ms)"
            )
            if not all_terminal:
                console.print("[red]some requests did not reach a terminal state[/]")
                return 1
            return 0
    finally:
        await _stop_processes(processes)
        await redis.aclose()
        await asyncio.to_thread(server.stop)


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
        disable=not show,
    ) as bar:
        tasks = {
            batch_id: bar.add_task(tenant.name, total=count, detail="")
            for tenant, batch_id, count in submitted
        }
        deadline = started + timeout_s
        while True:
            for _, batch_id, _ in submitted:
                status = await batches.status(batch_id)
                statuses[batch_id] = status
                if status.ended and batch_id not in finished_at:
                    finished_at[batch_id] = time.monotonic()
                bar.update(
                    tasks[batch_id],
                    completed=status.total - status.processing,
                    detail=f"ok {status.succeeded:>4}  refused {status.errored:>4}",
                )
            if all(s.ended for s in statuses.values()) or time.monotonic() > deadline:
                return statuses
            await asyncio.sleep(0.25)


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
