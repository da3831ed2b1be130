"""The small HTTP surface every process has: /metrics, /healthz, /readyz."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from budgeter.metrics import Metrics
from budgeter.upstream import UpstreamClient

METRICS_KEY = web.AppKey("metrics", Metrics)
REDIS_KEY = web.AppKey("redis", object)
UPSTREAM_KEY = web.AppKey("upstream", UpstreamClient)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, bool] = {"redis": False, "upstream": False}
    redis: Any = request.app[REDIS_KEY]
    try:
        checks["redis"] = bool(await redis.ping())
    except Exception:
        checks["redis"] = False
    checks["upstream"] = await request.app[UPSTREAM_KEY].ping()
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


def add_health_routes(
    app: web.Application, *, metrics: Metrics, redis: Any, upstream: UpstreamClient
) -> None:
    app[METRICS_KEY] = metrics
    app[REDIS_KEY] = redis
    app[UPSTREAM_KEY] = upstream
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
