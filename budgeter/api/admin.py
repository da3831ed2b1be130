"""The admin API (``Authorization: Bearer $BUDGETER_ADMIN_TOKEN``): tenants and their
policies, their keys, usage (also a tenant's own, on ``/v1/usage``), the status of every
tenant, and the upstream account's global policy."""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import ValidationError

from budgeter.api.appkeys import KEYS, REDIS, SETTINGS, TENANTS
from budgeter.api.errors import ApiError
from budgeter.api.request import principal, read_json, tenant_param
from budgeter.api.schemas import (
    GlobalPolicyAnswer,
    KeyCreated,
    KeyInfo,
    KeyList,
    TenantAnswer,
    TenantList,
    ok,
)
from budgeter.domain.messages import JsonValue, first_error
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.store.keys import global_policy_key
from budgeter.tenants.status import status_snapshot
from budgeter.tenants.usage import tenant_usage


def _policy(payload: JsonValue) -> TenantPolicy:
    try:
        return TenantPolicy.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(400, f"invalid policy: {first_error(exc)}") from None


async def put_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = _policy(await read_json(request))
    tenants = request.app[TENANTS]
    existed = await tenants.exists(tenant)
    await tenants.put(tenant, policy)
    return ok(TenantAnswer(tenant=tenant, policy=policy), 200 if existed else 201)


async def get_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = await request.app[TENANTS].get(tenant)
    if policy is None:
        raise ApiError(404, f"tenant {tenant!r} not found")
    return ok(TenantAnswer(tenant=tenant, policy=policy))


async def list_tenants(request: web.Request) -> web.Response:
    tenants = request.app[TENANTS]
    data = []
    for tenant in await tenants.list_ids():
        policy = await tenants.get(tenant)
        if policy is not None:
            data.append(TenantAnswer(tenant=tenant, policy=policy))
    return ok(TenantList(data=data))


async def delete_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    if not await request.app[TENANTS].delete(tenant):  # (revokes its keys too)
        raise ApiError(404, f"tenant {tenant!r} not found")
    return web.json_response({"tenant": tenant, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    if not await request.app[TENANTS].exists(tenant):
        raise ApiError(404, f"tenant {tenant!r} not found")
    key_id, key = await request.app[KEYS].create(tenant)
    return ok(KeyCreated(id=key_id, key=key, tenant=tenant), 201)


async def list_keys(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    keys = await request.app[KEYS].list_keys(tenant)
    return ok(KeyList(data=[KeyInfo.model_validate(k) for k in keys]))


async def revoke_key(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    key_id = request.match_info["key_id"]
    if not await request.app[KEYS].revoke(tenant, key_id):
        raise ApiError(404, f"key {key_id!r} of tenant {tenant!r} not found")
    return web.json_response({"id": key_id, "revoked": True})


async def get_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, tenant_param(request))


async def get_own_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, principal(request).tenant)


async def _usage_of(request: web.Request, tenant: str) -> web.Response:
    report = await tenant_usage(
        request.app[REDIS],
        tenant,
        prefix=request.app[SETTINGS].key_prefix,
        now_ms=int(time.time() * 1000),
    )
    if report is None:
        raise ApiError(404, f"tenant {tenant!r} not found")
    return ok(report)


async def get_status(request: web.Request) -> web.Response:
    snapshot = await status_snapshot(
        request.app[REDIS],
        prefix=request.app[SETTINGS].key_prefix,
        now_ms=int(time.time() * 1000),
    )
    return web.json_response(snapshot)


async def get_global_policy(request: web.Request) -> web.Response:
    raw = await request.app[REDIS].get(global_policy_key(request.app[SETTINGS].key_prefix))
    return ok(GlobalPolicyAnswer(policy=GlobalPolicy.from_stored(raw)))


async def put_global_policy(request: web.Request) -> web.Response:
    try:
        policy = GlobalPolicy.model_validate(await read_json(request))
    except ValidationError as exc:
        raise ApiError(400, first_error(exc)) from None
    await request.app[REDIS].set(
        global_policy_key(request.app[SETTINGS].key_prefix),
        policy.model_dump_json(exclude_defaults=True),
    )
    return ok(GlobalPolicyAnswer(policy=policy))
