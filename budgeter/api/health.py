"""The small HTTP surface every process has: /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from budgeter.metrics import Metrics
from budgeter.store.types import RedisClient
from budgeter.upstream.client import UpstreamClient


@dataclass(frozen=True)
class HealthState:
    """What the health routes look at (without Redis or upstream, /readyz answers 503)."""

    metrics: Metrics
    redis: RedisClient | None = None
    upstream: UpstreamClient | None = None
    # reads the values that live in Redis right before a scrape (the API process only)
    refresh: Callable[[], Awaitable[None]] | None = None


HEALTH = web.AppKey("health", HealthState)


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app[HEALTH]
    if state.refresh is not None:
        await state.refresh()
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[HEALTH]
    checks = {"redis": False, "upstream": False}
    if state.redis is not None:
        try:
            checks["redis"] = bool(await state.redis.ping())
        except Exception:
            checks["redis"] = False
    if state.upstream is not None:
        checks["upstream"] = await state.upstream.ping()
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


def add_health_routes(app: web.Application, state: HealthState) -> None:
    """The health routes of a process without the API's route table (the worker)."""
    app[HEALTH] = state
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
