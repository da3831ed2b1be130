"""``budgeter api``: the HTTP front door (aiohttp).

Anthropic's Message Batches API for tenants (their own key in ``x-api-key`` or
``Authorization: Bearer``), the admin API (``Authorization: Bearer $BUDGETER_ADMIN_TOKEN``),
``/openapi.json``, ``/healthz``, ``/readyz`` and ``/metrics``. The routes are those of
:data:`budgeter.api.routes.ROUTES`; every store and service they use is built, with what
it needs, by :func:`resources` at start-up and closed by it at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from budgeter.admission.admission import admission_from_settings
from budgeter.api.access_log import access_log_middleware
from budgeter.api.appkeys import AUTH_THROTTLE, BATCHES, KEYS, REDIS, SETTINGS, TENANTS
from budgeter.api.auth import auth_middleware
from budgeter.api.deadline import redis_deadline_middleware
from budgeter.api.errors import errors_middleware
from budgeter.api.health import HEALTH, HealthState
from budgeter.api.local_count import LocalCountCache
from budgeter.api.models import MODELS, ModelCatalog
from budgeter.api.openapi import openapi_document
from budgeter.api.passthrough import BetaGate
from budgeter.api.proxy import PROXY, ProxyDeps
from budgeter.api.routes import OPENAPI, add_routes
from budgeter.domain.pricing import PriceTable
from budgeter.metrics import Metrics, refresh_state_metrics
from budgeter.queue.batches import BatchStore
from budgeter.serving import upstream_session
from budgeter.settings import Settings
from budgeter.store.client import redis_from_settings
from budgeter.store.types import RedisClient
from budgeter.tenants.auth_throttle import AuthThrottle
from budgeter.tenants.credentials import KEY_CACHE_SECONDS, KeyStore
from budgeter.tenants.store import TenantStore
from budgeter.upstream.token_counter import upstream_and_counter

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


@asynccontextmanager
async def _redis_for(settings: Settings, given: RedisClient | None) -> AsyncIterator[RedisClient]:
    if given is not None:
        yield given
        return
    async with redis_from_settings(settings, announce=True) as client:
        yield client


def resources(settings: Settings, redis: RedisClient | None, metrics: Metrics) -> CleanupContext:
    """The app's cleanup context: opens Redis (unless given) and the upstream session,
    builds every store and service on them into the app's keys, and closes them all."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        prefix = settings.key_prefix
        async with _redis_for(settings, redis) as client, upstream_session(settings) as session:
            admission = admission_from_settings(client, settings)
            upstream, counter = upstream_and_counter(
                session, client, settings, metrics, admission.global_limits
            )
            tenants = TenantStore(client, prefix=prefix)
            batches = BatchStore(client, prefix=prefix)
            keys = KeyStore(client, prefix=prefix, cache_s=KEY_CACHE_SECONDS)

            async def refresh() -> None:
                await refresh_state_metrics(
                    client, metrics, await tenants.list_ids(), prefix=prefix
                )

            app[REDIS] = client
            app[TENANTS] = tenants
            app[BATCHES] = batches
            app[KEYS] = keys
            app[AUTH_THROTTLE] = AuthThrottle(
                client,
                prefix,
                limit=settings.auth_failures_per_minute,
                trust_forwarded_for=settings.trust_forwarded_for,
            )
            app[PROXY] = ProxyDeps(
                redis=client,
                upstream=upstream,
                counter=LocalCountCache.over(counter),
                admission=admission,
                queue=batches.queue,
                tenants=tenants,
                metrics=metrics,
                prefix=prefix,
                hold_ms=int(
                    (settings.upstream_timeout_seconds + settings.reservation_grace_seconds) * 1000
                ),
                betas=BetaGate(settings.allowed_betas, tenants),
            )
            app[MODELS] = ModelCatalog(upstream, PriceTable(settings.prices).models)
            app[HEALTH] = HealthState(metrics, client, upstream, refresh)
            try:
                yield
            finally:
                await app[PROXY].settles.drain()  # the settles of answers sent: before Redis closes
                await keys.aclose()

    return context


def create_app(
    settings: Settings, *, redis: RedisClient | None = None, metrics: Metrics | None = None
) -> web.Application:
    """The API app. With ``redis`` given (tests), it is used and not closed here."""
    app = web.Application(
        middlewares=[
            access_log_middleware,
            errors_middleware,
            redis_deadline_middleware,
            auth_middleware,
        ],
        client_max_size=settings.api_max_body_mb * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[OPENAPI] = openapi_document()
    app.cleanup_ctx.append(
        resources(settings, redis, metrics or Metrics(max_tenants=settings.metrics_max_tenants))
    )
    add_routes(app)
    return app
