"""``budgeter worker``: one process, many coroutines, /metrics on --metrics-port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from budgeter.admission.admission import admission_from_settings
from budgeter.api.health import HealthState, add_health_routes
from budgeter.metrics import Metrics
from budgeter.notify.delivery import Delivery, DeliveryConfig
from budgeter.serving import listen_url, serve_app, stop_event_on_signals, upstream_session
from budgeter.settings import Settings
from budgeter.store.client import redis_from_settings
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.upstream.token_counter import upstream_and_counter
from budgeter.worker.worker import Worker, WorkerConfig

log = logging.getLogger("budgeter.worker")


@contextlib.asynccontextmanager
async def notifications(
    settings: Settings,
    redis: RedisClient,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    stop: asyncio.Event,
) -> AsyncIterator[None]:
    """Deliver the outbox to BUDGETER_WEBHOOK_URL beside the lanes, when it is set."""
    if settings.webhook_url is None:
        yield
        return
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if secret is None:
        log.warning("BUDGETER_WEBHOOK_SECRET is not set: notifications are sent unsigned")
    config = DeliveryConfig(settings.webhook_url, secret, settings.webhook_format)
    tenants = TenantStore(redis, prefix=settings.key_prefix).known
    delivery = Delivery(
        redis, session, config, metrics=metrics, prefix=settings.key_prefix, tenants=tenants
    )
    task = asyncio.create_task(delivery.run(stop))
    try:
        yield
    finally:
        await task


def worker_config(settings: Settings, concurrency: int) -> WorkerConfig:
    return WorkerConfig(
        concurrency=concurrency,
        lease_ms=int(settings.lease_seconds * 1000),
        reservation_grace_ms=int(settings.reservation_grace_seconds * 1000),
        max_attempts=settings.max_attempts,
        drain_s=settings.drain_seconds,
        maintenance_interval_s=settings.maintenance_seconds,
        results_retention_ms=int(settings.results_retention_days * 86_400_000),
        prefix=settings.key_prefix,
    )


async def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    host: str,
    port: int,
    port_file: Path | None = None,
) -> int:
    stop = stop_event_on_signals()
    metrics = Metrics(max_tenants=settings.metrics_max_tenants)
    async with (
        redis_from_settings(settings, announce=True) as redis,
        upstream_session(settings) as session,
    ):
        admission = admission_from_settings(redis, settings)
        upstream, counter = upstream_and_counter(
            session, redis, settings, metrics, admission.global_limits
        )
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=worker_config(settings, concurrency),
            metrics=metrics,
            counter=counter,
            admission=admission,
        )
        app = web.Application()
        add_health_routes(app, HealthState(metrics, redis, upstream))
        async with serve_app(app, host, port, port_file=port_file) as bound:
            log.info(
                "listening on %s",
                listen_url(host, bound),
                extra={"concurrency": concurrency},
            )
            async with notifications(settings, redis, session, metrics, stop):
                await worker.run(stop)
        log.info("worker stopped", extra={"processed": worker.processed})
    return 0
