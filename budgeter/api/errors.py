"""Anthropic-shaped errors for every answer of the API, and a request-id on each."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from budgeter.domain import jsonio
from budgeter.domain.results import STATUS_ERROR_TYPES, error_body
from budgeter.store.outage import OUTAGE, RETRY_INTERVAL_S, unreachable_cause

log = logging.getLogger("budgeter.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)

# Anthropic's table, plus the statuses only budgeter's API answers with (any other: api_error)
_STATUS_TYPES = {**STATUS_ERROR_TYPES, 405: "invalid_request_error", 409: "invalid_request_error"}


class ApiError(Exception):
    """An error answer: status, Anthropic error type, message, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or _STATUS_TYPES.get(status, "api_error")
        self.message = message
        self.headers = headers or {}


REDIS_UNREACHABLE = ApiError(
    503,
    "budgeter's Redis is unreachable; retry shortly",
    error_type="overloaded_error",
    headers={"retry-after": str(int(RETRY_INTERVAL_S))},
)


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(
        error_body(exc.error_type, exc.message),
        status=exc.status,
        headers=exc.headers,
        dumps=jsonio.dumps_str,
    )


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _not_found(request: web.Request) -> str:
    """A route budgeter does not serve; under /v1/ (Files, Skills, the Admin API, ...) it
    says so, since a client may take budgeter for the upstream."""
    route = f"{request.method} {request.path}"
    if request.path.startswith("/v1/"):
        return f"{route}: this route is not proxied by budgeter"
    return f"{route}: no such route"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: _not_found(request),
            405: f"method {request.method} not allowed on {request.path}",
            413: "request body too large",
        }.get(exc.status, exc.reason)
        response = error_response(ApiError(exc.status, message))
    except Exception as exc:
        cause = unreachable_cause(exc)
        if cause is None:
            log.exception("unhandled error", extra={"request_id": request_id, "path": request.path})
            response = error_response(ApiError(500, "internal server error"))
        else:  # Redis away: one log line per interval, a 503 the SDKs retry after a while
            OUTAGE.unreachable(cause)
            response = error_response(REDIS_UNREACHABLE)
    if not response.prepared:
        response.headers["request-id"] = request_id
    return response
