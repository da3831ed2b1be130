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
from budgeter.api.request import admin_actor, limit_param, principal, read_json, tenant_param
from budgeter.api.schemas import (
    GlobalPolicyAnswer,
    KeyCreated,
    TenantAnswer,
    TenantList,
    ok,
)
from budgeter.domain.key_limits import InvalidKeyLimitsError, validate_new_key
from budgeter.domain.messages import JsonValue, first_error
from budgeter.domain.policy import GlobalPolicy, TenantPolicy
from budgeter.domain.tree import HasChildrenError, TreeError
from budgeter.store.keys import global_policy_key
from budgeter.tenants.audit import (
    AuditLog,
    BadQueryError,
    FieldChange,
    check_cursor,
    parse_since,
    policy_changes,
)
from budgeter.tenants.key_usage import key_list
from budgeter.tenants.merge_patch import (
    MERGE_PATCH_TYPE,
    InvalidPolicyError,
    policy_answer,
    reparent_note,
    validate_policy,
)
from budgeter.tenants.status import status_snapshot
from budgeter.tenants.store import PolicyConflictError
from budgeter.tenants.usage_tree import usage_report

PATCH_TYPES = (MERGE_PATCH_TYPE, "application/json")


async def _audit(
    request: web.Request, action: str, target: str, changes: list[FieldChange] | None = None
) -> None:
    """One audit log entry for this admin write (after the write succeeded)."""
    log = AuditLog.of(request.app[REDIS], request.app[SETTINGS])
    now_ms = int(time.time() * 1000)
    await log.record(admin_actor(request), action, target, changes or [], now_ms=now_ms)


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
    before = await tenants.get(tenant)
    try:
        await tenants.put(tenant, policy)
    except TreeError as exc:
        raise ApiError(400, str(exc)) from None
    except PolicyConflictError as exc:
        raise ApiError(409, str(exc)) from None
    action = "tenant.create" if before is None else "tenant.update"
    await _audit(request, action, tenant, policy_changes(before, policy))
    answer = policy_answer(tenant, policy) | reparent_note(before, policy)
    return web.json_response(answer, status=201 if before is None else 200)


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
        both = await request.app[TENANTS].patch_with_before(tenant, patch)
    except (InvalidPolicyError, TreeError) as exc:
        raise ApiError(400, str(exc)) from None
    except PolicyConflictError as exc:
        raise ApiError(409, str(exc)) from None
    if both is None:
        raise _not_found(tenant)
    before, policy = both
    await _audit(request, "tenant.update", tenant, policy_changes(before, policy))
    return web.json_response(policy_answer(tenant, policy) | reparent_note(before, policy))


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
    before = await request.app[TENANTS].get(tenant)
    try:
        deleted = await request.app[TENANTS].delete(tenant)  # (revokes its keys too)
    except (HasChildrenError, PolicyConflictError) as exc:
        raise ApiError(409, str(exc)) from None
    if not deleted:
        raise _not_found(tenant)
    await _audit(request, "tenant.delete", tenant, policy_changes(before, None))
    return web.json_response({"tenant": tenant, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    """An optional body ``{"name", "limits"}`` (budgeter/domain/key_limits.py)."""
    tenant = await _existing_tenant(request)
    body = await read_json(request) if request.can_read_body else {}
    try:
        new = validate_new_key(body)
    except InvalidKeyLimitsError as exc:
        raise ApiError(400, str(exc)) from None
    key_id, key = await request.app[KEYS].create(tenant, name=new.name, limits=new.limits)
    await _audit(request, "key.create", f"{tenant}/key:{key_id}")  # the id, never the key
    limits = new.limits if new.limits is not None and not new.limits.empty else None
    return ok(KeyCreated(id=key_id, key=key, tenant=tenant, name=new.name, limits=limits), 201)


async def list_keys(request: web.Request) -> web.Response:
    tenant = await _existing_tenant(request)
    return ok(await key_list(request.app[KEYS], tenant, now_ms=int(time.time() * 1000)))


async def revoke_key(request: web.Request) -> web.Response:
    tenant = await _existing_tenant(request)
    key_id = request.match_info["key_id"]
    if not await request.app[KEYS].revoke(tenant, key_id):
        raise ApiError(404, f"key {key_id!r} of tenant {tenant!r} not found")
    await _audit(request, "key.revoke", f"{tenant}/key:{key_id}")
    return web.json_response({"id": key_id, "revoked": True})


async def get_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, tenant_param(request))


async def get_own_usage(request: web.Request) -> web.Response:
    return await _usage_of(request, principal(request).tenant)


async def _usage_of(request: web.Request, tenant: str) -> web.Response:
    report = await usage_report(
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
    redis, key = request.app[REDIS], global_policy_key(request.app[SETTINGS].key_prefix)
    before = GlobalPolicy.from_stored(await redis.get(key))
    await redis.set(key, policy.model_dump_json(exclude_defaults=True))
    await _audit(request, "global_policy.update", "global-policy", policy_changes(before, policy))
    return ok(GlobalPolicyAnswer(policy=policy))


async def get_audit(request: web.Request) -> web.Response:
    """The audit log, newest first: ``target`` (a tenant, with its keys), ``actor``,
    ``since`` (RFC 3339 or unix milliseconds), ``cursor``, ``limit``."""
    query = request.query
    try:
        since = query.get("since")
        since_ms = None if not since else parse_since(since, now_ms=int(time.time() * 1000))
        cursor = check_cursor(query["cursor"]) if query.get("cursor") else None
    except BadQueryError as exc:
        raise ApiError(400, str(exc)) from None
    log = AuditLog.of(request.app[REDIS], request.app[SETTINGS])
    page = await log.read(
        target=query.get("target") or None,
        actor=query.get("actor") or None,
        since_ms=since_ms,
        cursor=cursor,
        limit=limit_param(request, default=100),
    )
    return ok(page)
