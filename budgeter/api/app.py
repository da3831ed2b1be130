"""``budgeter api``: the HTTP front door (aiohttp).

Anthropic's Message Batches API for tenants (their own key in ``x-api-key`` or
``Authorization: Bearer``), the admin API (``Authorization: Bearer $BUDGETER_ADMIN_TOKEN``),
``/openapi.json``, ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from budgeter.admission.admission import admission_from_settings
from budgeter.api.access_log import access_log_middleware
from budgeter.api.errors import REQUEST_ID, ApiError, Handler, errors_middleware
from budgeter.api.health import HealthState, add_health_routes
from budgeter.api.openapi import openapi_document
from budgeter.api.proxy import PROXY, LocalCountCache, ProxyDeps, count_tokens, create_message
from budgeter.api.request import PRINCIPAL, read_json
from budgeter.api.schemas import (
    CreateBatchBody,
    DeletedMessageBatch,
    GlobalPolicyAnswer,
    KeyCreated,
    KeyInfo,
    KeyList,
    MessageBatch,
    MessageBatchList,
    TenantAnswer,
    TenantList,
    UsageAnswer,
    dump,
)
from budgeter.api.status_page import add_status_page
from budgeter.domain.messages import first_error
from budgeter.domain.policy import (
    PRIORITIES,
    GlobalPolicy,
    InvalidTenantError,
    TenantPolicy,
    check_tenant_id,
)
from budgeter.metrics import Metrics, refresh_state_metrics
from budgeter.queue.batches import BatchNotEndedError, BatchNotFoundError, BatchStore
from budgeter.queue.jobqueue import UnknownTenantError
from budgeter.serving import upstream_session
from budgeter.settings import Settings
from budgeter.store.client import redis_from_settings
from budgeter.store.keys import global_policy_key
from budgeter.tenants.auth_throttle import AuthThrottle
from budgeter.tenants.credentials import KEY_CACHE_SECONDS, KeyStore, Principal
from budgeter.tenants.status import status_snapshot
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage
from budgeter.upstream.token_counter import upstream_and_counter

SETTINGS = web.AppKey("settings", Settings)
STORES = web.AppKey("stores", dict)  # name -> store; filled by the cleanup context


# middlewares --------------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _refuse(request: web.Request, status: int, message: str) -> ApiError:
    """A failed authentication: 401/403, or 429 once the client failed too often."""
    throttle: AuthThrottle = request.app[STORES]["auth_throttle"]
    wait_s = await throttle.failed(throttle.client_of(request))
    if wait_s is not None:
        return ApiError(
            429,
            "too many failed authentications from this address; retry later",
            headers={"retry-after": str(int(wait_s))},
        )
    return ApiError(status, message)


def _undecodable_credentials(request: web.Request) -> str | None:
    """The credential header whose value is not UTF-8 (aiohttp hands its bytes over as lone
    surrogates, which no key or token comparison can encode), if any."""
    for name in ("authorization", "x-api-key"):
        value = request.headers.get(name)
        if value is not None and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith(("/v1/", "/admin")):
        bad_header = _undecodable_credentials(request)
        if bad_header is not None:
            raise ApiError(401, f"invalid credentials: the {bad_header} header is not UTF-8")
    if path.startswith("/v1/"):
        key = request.headers.get("x-api-key") or _bearer(request)
        if not key:
            raise await _refuse(
                request, 401, "missing API key: send it in x-api-key or Authorization: Bearer"
            )
        principal = await request.app[STORES]["keys"].authenticate(key)
        if principal is None:
            raise await _refuse(request, 401, "invalid API key")
        request[PRINCIPAL] = principal
    elif path.startswith("/admin"):
        expected = request.app[SETTINGS].admin_token
        if expected is None or not expected.get_secret_value():
            raise ApiError(403, "the admin API is disabled: BUDGETER_ADMIN_TOKEN is not set")
        token = _bearer(request) or ""
        if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise await _refuse(request, 401, "invalid admin token")
    return await handler(request)


# helpers -------------------------------------------------------------------------------


def base_url(request: web.Request) -> str:
    public = request.app[SETTINGS].public_url
    return public or f"{request.scheme}://{request.host}"


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found


def tenant_param(request: web.Request) -> str:
    tenant = request.match_info["tenant"]
    try:
        return check_tenant_id(tenant)
    except InvalidTenantError as exc:
        raise ApiError(400, str(exc)) from None


def ok(model: Any, status: int = 200) -> web.Response:
    return web.json_response(dump(model), status=status)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, f"limit: not an integer: {raw!r}") from None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit: must be between 1 and 1000")
    return limit


# batches ----------------------------------------------------------------------------


async def create_batch(request: web.Request) -> web.Response:
    who = principal(request)
    payload = await read_json(request)
    try:
        body = CreateBatchBody.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(400, first_error(exc)) from None
    seen: set[str] = set()
    for index, item in enumerate(body.requests):
        if item.custom_id in seen:
            raise ApiError(
                400, f"requests.{index}.custom_id: duplicate custom_id {item.custom_id!r}"
            )
        seen.add(item.custom_id)
    policy = await request.app[STORES]["tenants"].get(who.tenant)
    if policy is None:
        raise ApiError(403, "this key's tenant has no policy")
    for index, item in enumerate(body.requests):
        if not policy.allows(item.params.model):
            raise ApiError(
                403,
                f"requests.{index}.params.model: model {item.params.model!r} is not in this "
                "tenant's allowed_models",
            )
    settings = request.app[SETTINGS]
    priority = _priority_header(request, policy.default_priority)
    ttl_ms = _deadline_header(request, int(settings.batch_ttl_hours * 3_600_000))
    store: BatchStore = request.app[STORES]["batches"]
    try:
        batch_id = await store.create(who.tenant, body.requests, ttl_ms=ttl_ms, priority=priority)
    except UnknownTenantError:
        raise ApiError(403, "this key's tenant has no policy") from None
    status = await store.status(batch_id, tenant=who.tenant)
    return ok(MessageBatch.of(status, base_url(request)))


PRIORITY_HEADER = "budgeter-priority"
DEADLINE_HEADER = "budgeter-deadline-seconds"
MAX_DEADLINE_S = 7 * 86_400


def _priority_header(request: web.Request, default: str) -> str:
    value = request.headers.get(PRIORITY_HEADER, default).strip().lower()
    if value not in PRIORITIES:
        raise ApiError(400, f"{PRIORITY_HEADER}: must be one of high, normal, low")
    return value


def _deadline_header(request: web.Request, default_ms: int) -> int:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return default_ms
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 1 <= seconds <= MAX_DEADLINE_S:
        raise ApiError(400, f"{DEADLINE_HEADER}: a number of seconds from 1 to {MAX_DEADLINE_S}")
    return int(seconds * 1000)


async def get_batch(request: web.Request) -> web.Response:
    store: BatchStore = request.app[STORES]["batches"]
    status = await _status_or_404(store, request)
    return ok(MessageBatch.of(status, base_url(request)))


async def _status_or_404(store: BatchStore, request: web.Request) -> Any:
    try:
        return await store.status(request.match_info["batch_id"], tenant=principal(request).tenant)
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None


async def list_batches(request: web.Request) -> web.Response:
    store: BatchStore = request.app[STORES]["batches"]
    before_id = request.query.get("before_id")
    after_id = request.query.get("after_id")
    if before_id and after_id:
        raise ApiError(400, "before_id and after_id cannot be used together")
    try:
        page, has_more = await store.list(
            principal(request).tenant,
            limit=_limit(request),
            before_id=before_id,
            after_id=after_id,
        )
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    data = [MessageBatch.of(status, base_url(request)) for status in page]
    return ok(
        MessageBatchList(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )
    )


async def cancel_batch(request: web.Request) -> web.Response:
    store: BatchStore = request.app[STORES]["batches"]
    try:
        status = await store.cancel(
            request.match_info["batch_id"], tenant=principal(request).tenant
        )
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    return ok(MessageBatch.of(status, base_url(request)))


async def batch_results(request: web.Request) -> web.StreamResponse:
    store: BatchStore = request.app[STORES]["batches"]
    status = await _status_or_404(store, request)
    if not status.ended:
        raise ApiError(
            400, f"batch {status.id} is still {status.processing_status}: results come when it ends"
        )
    response = web.StreamResponse(
        headers={"content-type": "application/x-jsonl", "request-id": request[REQUEST_ID]}
    )
    await response.prepare(request)
    buffer: list[str] = []
    async for line in store.raw_results(status.id, tenant=status.tenant):
        buffer.append(line)
        if len(buffer) >= 500:
            await response.write(("\n".join(buffer) + "\n").encode())
            buffer.clear()
    if buffer:
        await response.write(("\n".join(buffer) + "\n").encode())
    await response.write_eof()
    return response


async def delete_batch(request: web.Request) -> web.Response:
    store: BatchStore = request.app[STORES]["batches"]
    batch_id = request.match_info["batch_id"]
    try:
        await store.delete(batch_id, tenant=principal(request).tenant)
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except BatchNotEndedError as exc:
        raise ApiError(400, str(exc)) from None
    return ok(DeletedMessageBatch(id=batch_id))


# admin -------------------------------------------------------------------------------


def _policy(payload: Any) -> TenantPolicy:
    try:
        return TenantPolicy.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(400, f"invalid policy: {first_error(exc)}") from None


async def put_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = _policy(await read_json(request))
    tenants: TenantStore = request.app[STORES]["tenants"]
    existed = await tenants.exists(tenant)
    await tenants.put(tenant, policy)
    return ok(TenantAnswer(tenant=tenant, policy=policy), 200 if existed else 201)


async def get_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = await request.app[STORES]["tenants"].get(tenant)
    if policy is None:
        raise ApiError(404, f"tenant {tenant!r} not found")
    return ok(TenantAnswer(tenant=tenant, policy=policy))


async def list_tenants(request: web.Request) -> web.Response:
    tenants: TenantStore = request.app[STORES]["tenants"]
    data = []
    for tenant in await tenants.list():
        policy = await tenants.get(tenant)
        if policy is not None:
            data.append(TenantAnswer(tenant=tenant, policy=policy))
    return ok(TenantList(data=data))


async def delete_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    tenants: TenantStore = request.app[STORES]["tenants"]
    if not await tenants.delete(tenant):  # (revokes its keys too)
        raise ApiError(404, f"tenant {tenant!r} not found")
    return web.json_response({"tenant": tenant, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    if not await request.app[STORES]["tenants"].exists(tenant):
        raise ApiError(404, f"tenant {tenant!r} not found")
    key_id, key = await request.app[STORES]["keys"].create(tenant)
    return ok(KeyCreated(id=key_id, key=key, tenant=tenant), 201)


async def list_keys(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    keys = await request.app[STORES]["keys"].list(tenant)
    return ok(KeyList(data=[KeyInfo.model_validate(k) for k in keys]))


async def revoke_key(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    key_id = request.match_info["key_id"]
    if not await request.app[STORES]["keys"].revoke(tenant, key_id):
        raise ApiError(404, f"key {key_id!r} of tenant {tenant!r} not found")
    return web.json_response({"id": key_id, "revoked": True})


async def get_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, tenant_param(request))


async def get_own_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, principal(request).tenant)


async def _usage_of(request: web.Request, tenant: str) -> web.Response:
    settings = request.app[SETTINGS]
    report = await tenant_usage(
        request.app[STORES]["redis"],
        tenant,
        prefix=settings.key_prefix,
        now_ms=int(time.time() * 1000),
    )
    if report is None:
        raise ApiError(404, f"tenant {tenant!r} not found")
    return ok(UsageAnswer.model_validate(report))


async def get_status(request: web.Request) -> web.Response:
    snapshot = await status_snapshot(
        request.app[STORES]["redis"],
        prefix=request.app[SETTINGS].key_prefix,
        now_ms=int(time.time() * 1000),
    )
    return web.json_response(snapshot)


async def get_global_policy(request: web.Request) -> web.Response:
    raw = await request.app[STORES]["redis"].get(
        global_policy_key(request.app[SETTINGS].key_prefix)
    )
    return ok(GlobalPolicyAnswer(policy=GlobalPolicy.from_stored(raw)))


async def put_global_policy(request: web.Request) -> web.Response:
    try:
        policy = GlobalPolicy.model_validate(await read_json(request))
    except ValidationError as exc:
        raise ApiError(400, first_error(exc)) from None
    await request.app[STORES]["redis"].set(
        global_policy_key(request.app[SETTINGS].key_prefix),
        policy.model_dump_json(exclude_defaults=True),
    )
    return ok(GlobalPolicyAnswer(policy=policy))


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


@asynccontextmanager
async def _redis_for(settings: Settings, given: Any) -> AsyncIterator[Any]:
    if given is not None:
        yield given
        return
    async with redis_from_settings(settings) as client:
        yield client


# the app ------------------------------------------------------------------------------


def create_app(
    settings: Settings, *, redis: Any = None, metrics: Metrics | None = None
) -> web.Application:
    """The API app. With ``redis`` given (tests), it is used and not closed here."""
    app = web.Application(
        middlewares=[access_log_middleware, errors_middleware, auth_middleware],
        client_max_size=settings.api_max_body_mb * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[STORES] = {}
    app[PROXY] = {}
    health = HealthState(metrics or Metrics(max_tenants=settings.metrics_max_tenants))
    add_health_routes(app, health)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with _redis_for(settings, redis) as client, upstream_session(settings) as session:
            admission = admission_from_settings(client, settings)
            upstream, counter = upstream_and_counter(
                session, client, settings, health.metrics, admission.global_limits
            )
            stores = app[STORES]
            stores["redis"] = client
            stores["upstream"] = upstream
            stores["batches"] = BatchStore(client, prefix=settings.key_prefix)
            stores["tenants"] = TenantStore(client, prefix=settings.key_prefix)
            stores["keys"] = KeyStore(client, prefix=settings.key_prefix, cache_s=KEY_CACHE_SECONDS)
            stores["auth_throttle"] = AuthThrottle(
                client,
                settings.key_prefix,
                limit=settings.auth_failures_per_minute,
                trust_forwarded_for=settings.trust_forwarded_for,
            )
            app[PROXY]["deps"] = ProxyDeps(
                redis=client,
                upstream=upstream,
                counter=LocalCountCache.over(counter),
                admission=admission,
                queue=stores["batches"].queue,
                metrics=health.metrics,
                prefix=settings.key_prefix,
                hold_ms=int(
                    (settings.upstream_timeout_seconds + settings.reservation_grace_seconds) * 1000
                ),
            )
            health.redis, health.upstream = client, upstream

            async def refresh() -> None:
                tenants = await stores["tenants"].list()
                await refresh_state_metrics(
                    client, health.metrics, tenants, prefix=settings.key_prefix
                )

            health.refresh = refresh
            try:
                yield
            finally:
                await stores["keys"].aclose()

    app.cleanup_ctx.append(resources)
    r = app.router
    r.add_post("/v1/messages", create_message)
    r.add_post("/v1/messages/count_tokens", count_tokens)
    r.add_post("/v1/messages/batches", create_batch)
    r.add_get("/v1/messages/batches", list_batches)
    r.add_get("/v1/messages/batches/{batch_id}", get_batch)
    r.add_delete("/v1/messages/batches/{batch_id}", delete_batch)
    r.add_post("/v1/messages/batches/{batch_id}/cancel", cancel_batch)
    r.add_get("/v1/messages/batches/{batch_id}/results", batch_results)
    r.add_get("/v1/usage", get_own_usage)
    r.add_get("/admin/tenants", list_tenants)
    # {tenant:[^/]+}: braces too reach tenant_param, which refuses them with a clear 400
    tenant = "/admin/tenants/{tenant:[^/]+}"
    r.add_put(tenant, put_tenant)
    r.add_get(tenant, get_tenant)
    r.add_delete(tenant, delete_tenant)
    r.add_post(f"{tenant}/keys", create_key)
    r.add_get(f"{tenant}/keys", list_keys)
    r.add_delete(f"{tenant}/keys/{{key_id}}", revoke_key)
    r.add_get(f"{tenant}/usage", get_usage)
    r.add_get("/admin/status", get_status)
    r.add_get("/admin/global-policy", get_global_policy)
    r.add_put("/admin/global-policy", put_global_policy)
    r.add_get("/openapi.json", openapi_json)
    add_status_page(app)
    return app
