"""Anthropic-shaped errors for every answer of the API, and a request-id on each."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from budgeter.domain.results import STATUS_ERROR_TYPES, error_body

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


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(
        error_body(exc.error_type, exc.message), status=exc.status, headers=exc.headers
    )


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


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
            404: f"{request.method} {request.path}: no such route",
            405: f"method {request.method} not allowed on {request.path}",
            413: "request body too large",
        }.get(exc.status, exc.reason)
        response = error_response(ApiError(exc.status, message))
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id, "path": request.path})
        response = error_response(ApiError(500, "internal server error"))
    if not response.prepared:
        response.headers["request-id"] = request_id
    return response
