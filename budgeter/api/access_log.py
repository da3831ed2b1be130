"""One structured access-log line per API request (logger ``budgeter.access``): method,
path (never the query or any header), status, duration, tenant and request id."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from budgeter.api.errors import REQUEST_ID, Handler
from budgeter.api.request import PRINCIPAL

log = logging.getLogger("budgeter.access")


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if log.isEnabledFor(logging.INFO):
            principal = request.get(PRINCIPAL)
            log.info(
                "%s %s %d",
                request.method,
                request.path,
                status,
                extra={
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "tenant": principal.tenant if principal is not None else None,
                    "request_id": request.get(REQUEST_ID),
                },
            )
