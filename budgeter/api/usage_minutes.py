"""``GET /admin/tenants/{tenant}/usage/minutes`` and the tenant's own ``GET
/v1/usage/minutes``: the per-minute rollups settle.lua keeps for 48 h
(budgeter.tenants.rollups), one row per minute from ``since`` (default ``1h``; RFC 3339,
unix ms or a span back from now, clamped to 48 h) to now, zeros included."""

from __future__ import annotations

import time

from aiohttp import web

from budgeter.api.appkeys import REDIS, SETTINGS, TENANTS
from budgeter.api.errors import ApiError
from budgeter.api.request import principal, tenant_param
from budgeter.api.schemas import ok
from budgeter.store.keys import TenantKeys
from budgeter.tenants.audit import BadQueryError, parse_since
from budgeter.tenants.rollups import answer, read_minutes

DEFAULT_SINCE = "1h"


async def get_minutes(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    if not await request.app[TENANTS].exists(tenant):
        raise ApiError(404, f"tenant {tenant!r} not found")
    return await _minutes_of(request, tenant)


async def get_own_minutes(request: web.Request) -> web.Response:
    return await _minutes_of(request, principal(request).tenant)


async def _minutes_of(request: web.Request, tenant: str) -> web.Response:
    now_ms = int(time.time() * 1000)
    text = request.query.get("since") or DEFAULT_SINCE
    try:
        since_ms = parse_since(text, now_ms=now_ms)
    except BadQueryError as exc:
        raise ApiError(400, str(exc)) from None
    keys = TenantKeys(request.app[SETTINGS].key_prefix, tenant)
    rows = await read_minutes(request.app[REDIS], keys, since_ms=since_ms, now_ms=now_ms)
    return ok(answer(tenant, rows, since_ms=since_ms, now_ms=now_ms))
