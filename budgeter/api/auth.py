"""Who may call what: tenant keys on ``/v1/...`` (``x-api-key`` or ``Authorization:
Bearer``), admin tokens on ``/admin...`` (``BUDGETER_ADMIN_TOKEN``, an admin named
``admin``, and the named ones of ``BUDGETER_ADMIN_TOKENS``: an ``admin`` may do anything,
a ``viewer`` only read), and a throttle on failed attempts."""

from __future__ import annotations

import hmac

from aiohttp import web

from budgeter.api.appkeys import AUTH_THROTTLE, KEYS, SETTINGS
from budgeter.api.errors import REQUEST_ID, ApiError, Handler
from budgeter.api.request import ADMIN_ACTOR, PRINCIPAL
from budgeter.settings import Settings
from budgeter.tenants.audit import Actor
from budgeter.tenants.credentials import NoPolicyError, Principal

READ_METHODS = ("GET", "HEAD", "OPTIONS")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _refuse(request: web.Request, status: int, message: str) -> ApiError:
    """A failed authentication: 401/403, or 429 once the client failed too often."""
    throttle = request.app[AUTH_THROTTLE]
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
        principal = request[PRINCIPAL] = await _tenant_principal(request)
        response = await handler(request)
        if response.status < 400:  # "last used": a refused request changes nothing
            await request.app[KEYS].note_use(principal)
        return response
    if path.startswith("/admin"):
        await _check_admin(request)
    return await handler(request)


async def _tenant_principal(request: web.Request) -> Principal:
    """The key's owner. A missing key and a wrong one are told apart (both 401); a valid
    key whose tenant has no policy is 404, as every route answers for a missing tenant."""
    key = request.headers.get("x-api-key") or _bearer(request)
    if not key:
        raise await _refuse(
            request,
            401,
            "missing x-api-key header: send the tenant's key in x-api-key or Authorization: Bearer",
        )
    try:
        principal = await request.app[KEYS].authenticate(key)
    except NoPolicyError as exc:
        raise ApiError(404, str(exc)) from None
    if principal is None:
        raise await _refuse(request, 401, "invalid x-api-key: no such key (or it was revoked)")
    return principal


def _admin_tokens(settings: Settings) -> list[tuple[str, str, bytes]]:
    """(name, role, token) of every configured admin token."""
    tokens: list[tuple[str, str, bytes]] = [
        (name, spec.role, spec.token.get_secret_value().encode())
        for name, spec in settings.admin_tokens.items()
    ]
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        tokens.append(("admin", "admin", settings.admin_token.get_secret_value().encode()))
    return tokens


def _match(tokens: list[tuple[str, str, bytes]], token: str) -> tuple[str, str] | None:
    """The (name, role) of ``token``; every configured token is compared in constant time."""
    found = None
    for name, role, expected in tokens:
        if hmac.compare_digest(token.encode(), expected):
            found = (name, role)
    return found


async def _check_admin(request: web.Request) -> None:
    tokens = _admin_tokens(request.app[SETTINGS])
    if not tokens:
        raise ApiError(
            403,
            "the admin API is disabled: BUDGETER_ADMIN_TOKEN is not set "
            "(nor BUDGETER_ADMIN_TOKENS)",
        )
    token = _bearer(request)
    if token is None:
        raise await _refuse(
            request,
            401,
            "missing admin token: send Authorization: Bearer $BUDGETER_ADMIN_TOKEN",
        )
    found = _match(tokens, token)
    if found is None:
        raise await _refuse(request, 401, "invalid admin token")
    name, role = found
    if role != "admin" and request.method not in READ_METHODS:
        raise ApiError(
            403,
            f"the {role} token {name!r} may only read the admin API, not {request.method}",
            error_type="permission_error",
        )
    client = request.app[AUTH_THROTTLE].client_of(request)
    request[ADMIN_ACTOR] = Actor(name, client, request.get(REQUEST_ID, ""))
