"""The admin API (``Authorization: Bearer $BUDGETER_ADMIN_TOKEN``): tenants and their
policies (replaced by PUT, merged by PATCH), their keys, usage (also a tenant's own, on
``/v1/usage``), the status of every tenant, and the upstream account's global policy.

Every ``/admin/tenants/{tenant}/...`` route answers 404 ``not_found_error`` for a tenant
without a policy (only PUT creates one)."""

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
from budgeter.tenants.merge_patch import (
    MERGE_PATCH_TYPE,
    InvalidPolicyError,
    policy_answer,
    validate_policy,
)
from budgeter.tenants.status import status_snapshot
from budgeter.tenants.store import PolicyConflictError
from budgeter.tenants.usage import tenant_usage

PATCH_TYPES = (MERGE_PATCH_TYPE, "application/json")


def _policy(payload: JsonValue) -> TenantPolicy:
    try:
        return validate_policy(payload)
    except InvalidPolicyError as exc:
        raise ApiError(400, str(exc)) from None


def _not_found(tenant: str) -> ApiError:
    return ApiError(404, f"tenant {tenant!r} not found")


async def _existing_tenant(request: web.Request) -> str:
    """The path's tenant, which must have a policy (else 404)."""
    tenant = tenant_param(request)
    if not await request.app[TENANTS].exists(tenant):
        raise _not_found(tenant)
    return tenant


async def put_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = _policy(await read_json(request))
    tenants = request.app[TENANTS]
    existed = await tenants.exists(tenant)
    await tenants.put(tenant, policy)
    return web.json_response(policy_answer(tenant, policy), status=200 if existed else 201)


async def patch_tenant(request: web.Request) -> web.Response:
    """A JSON merge patch (RFC 7396) of the stored policy, validated whole after merging."""
    tenant = tenant_param(request)
    if request.content_type not in PATCH_TYPES:
        raise ApiError(
            415,
            f"content-type must be {MERGE_PATCH_TYPE} or application/json, "
            f"not {request.content_type}",
            error_type="invalid_request_error",
        )
    patch = await read_json(request)
    try:
        policy = await request.app[TENANTS].patch(tenant, patch)
    except InvalidPolicyError as exc:
        raise ApiError(400, str(exc)) from None
    except PolicyConflictError as exc:
        raise ApiError(409, str(exc)) from None
    if policy is None:
        raise _not_found(tenant)
    return web.json_response(policy_answer(tenant, policy))


async def get_tenant(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    policy = await request.app[TENANTS].get(tenant)
    if policy is None:
        raise _not_found(tenant)
    return web.json_response(policy_answer(tenant, policy))


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
        raise _not_found(tenant)
    return web.json_response({"tenant": tenant, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    tenant = await _existing_tenant(request)
    key_id, key = await request.app[KEYS].create(tenant)
    return ok(KeyCreated(id=key_id, key=key, tenant=tenant), 201)


async def list_keys(request: web.Request) -> web.Response:
    tenant = await _existing_tenant(request)
    keys = await request.app[KEYS].list_keys(tenant)
    return ok(KeyList(data=[KeyInfo.model_validate(k) for k in keys]))


async def revoke_key(request: web.Request) -> web.Response:
    tenant = await _existing_tenant(request)
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
        raise _not_found(tenant)
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
