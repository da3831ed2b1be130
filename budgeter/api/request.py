"""What every API handler reads from a request: its JSON body and who sent it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from budgeter.api.errors import ApiError
from budgeter.domain.messages import JsonInputError, parse_json
from budgeter.tenants.credentials import Principal

PRINCIPAL = web.RequestKey("principal", Principal)


async def read_json(request: web.Request) -> Any:
    if not request.can_read_body:
        raise ApiError(400, "request body is empty: send a JSON object")
    raw = await request.read()
    try:
        return parse_json(raw)
    except JsonInputError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
