"""What every API handler reads from a request: its JSON body, who sent it, its path and
query parameters, and the public base URL it was sent to."""

from __future__ import annotations

from aiohttp import web

from budgeter.api.appkeys import SETTINGS
from budgeter.api.errors import ApiError
from budgeter.domain.messages import JsonInputError, JsonValue, parse_json
from budgeter.domain.policy import InvalidTenantError, check_tenant_id
from budgeter.tenants.audit import Actor
from budgeter.tenants.credentials import Principal

PRINCIPAL = web.RequestKey("principal", Principal)
ADMIN_ACTOR = web.RequestKey("admin_actor", Actor)


async def read_json(request: web.Request) -> JsonValue:
    if not request.can_read_body:
        raise ApiError(400, "request body is empty: send a JSON object")
    raw = await request.read()
    try:
        return parse_json(raw)
    except JsonInputError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def principal(request: web.Request) -> Principal:
    """The tenant key's owner, set by the auth middleware on every ``/v1/`` request."""
    return request[PRINCIPAL]


def admin_actor(request: web.Request) -> Actor:
    """Who called an ``/admin`` route (set by the auth middleware): the token's name, the
    client address and the request id, for the audit log."""
    return request[ADMIN_ACTOR]


def base_url(request: web.Request) -> str:
    public = request.app[SETTINGS].public_url
    return public or f"{request.scheme}://{request.host}"


def tenant_param(request: web.Request) -> str:
    tenant = request.match_info["tenant"]
    try:
        return check_tenant_id(tenant)
    except InvalidTenantError as exc:
        raise ApiError(400, str(exc)) from None


def limit_param(request: web.Request, *, default: int = 20) -> int:
    raw = request.query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, f"limit: not an integer: {raw!r}") from None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit: must be between 1 and 1000")
    return limit
