"""``GET /v1/usage/ledger`` (the calling tenant's own ledger) and ``GET /admin/ledger?tenant=``
(an admin's or viewer's read): the per-request ledger (budgeter/ledger), in time order,
filtered by ``since``, ``until`` (RFC 3339, unix ms or a span back from now), ``model`` and
``tag`` (``key=value``), a page of ``limit`` entries at a time (``cursor``: the answer's
``next_cursor``)."""

from __future__ import annotations

import time

from aiohttp import web

from budgeter.api.appkeys import REDIS, SETTINGS, TENANTS
from budgeter.api.errors import ApiError
from budgeter.api.request import limit_param, principal
from budgeter.api.schemas import ok
from budgeter.domain.policy import InvalidTenantError, check_tenant_id
from budgeter.ledger.read import LedgerFilter, LedgerPage, read_page
from budgeter.ledger.tags import TagError, check_tag
from budgeter.store.keys import TenantKeys
from budgeter.tenants.audit import CURSOR_RE, BadQueryError, parse_since

MAX_MODEL_CHARS = 200


def _time(request: web.Request, name: str, now_ms: int) -> int | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return parse_since(text, now_ms=now_ms)
    except BadQueryError as exc:
        raise ApiError(400, str(exc).replace("since:", f"{name}:", 1)) from None


def ledger_filter(request: web.Request) -> LedgerFilter:
    """The query's filters; a bad one is a 400 naming it."""
    now_ms = int(time.time() * 1000)
    where = LedgerFilter(since_ms=_time(request, "since", now_ms))
    where.until_ms = _time(request, "until", now_ms)
    model = request.query.get("model")
    if model is not None:
        if not model or len(model) > MAX_MODEL_CHARS or not model.isprintable():
            raise ApiError(400, "model: not a model name")
        where.model = model
    tag = request.query.get("tag")
    if tag is not None:
        key, sep, value = tag.partition("=")
        try:
            if not sep:
                raise TagError(f"tag {key[:40]!r}: write it as key=value")
            check_tag(key, value)
        except TagError as exc:
            raise ApiError(400, f"tag: {exc}") from None
        where.tag = (key, value)
    return where


async def _page(request: web.Request, tenant: str) -> web.Response:
    where = ledger_filter(request)
    cursor = request.query.get("cursor") or None
    if cursor is not None and not CURSOR_RE.fullmatch(cursor):
        raise ApiError(400, f"cursor: not a ledger entry id: {cursor[:40]!r}")
    limit = limit_param(request, default=100)
    keys = TenantKeys(request.app[SETTINGS].key_prefix, tenant)
    page: LedgerPage = await read_page(request.app[REDIS], keys, where, cursor=cursor, limit=limit)
    return ok(page)


async def get_own_ledger(request: web.Request) -> web.Response:
    return await _page(request, principal(request).tenant)


async def get_ledger(request: web.Request) -> web.Response:
    raw = request.query.get("tenant")
    if not raw:
        raise ApiError(400, "tenant: required (?tenant=<id>)")
    try:
        tenant = check_tenant_id(raw)
    except InvalidTenantError as exc:
        raise ApiError(400, str(exc)) from None
    if not await request.app[TENANTS].exists(tenant):
        raise ApiError(404, f"tenant {tenant!r} not found")
    return await _page(request, tenant)
