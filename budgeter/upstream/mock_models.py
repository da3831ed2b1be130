"""The mock upstream's Models API: ``GET /v1/models`` (``limit`` 1-1000, default 20,
``before_id``, ``after_id``; newest first) and ``GET /v1/models/{model_id}``, in
Anthropic's shapes. The list is ``app[MODELS_KEY]`` (``MOCK_MODELS`` unless a test
changes it in place)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from budgeter.domain.results import error_body

MockModel = dict[str, str]
HeaderCheck = Callable[[web.Request], web.Response | None]

MOCK_MODELS: tuple[tuple[str, str, str], ...] = (  # (id, display name, created_at)
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
)

MODELS_KEY = web.AppKey[list[MockModel]]("mock_models")
_CHECK_KEY = web.AppKey[HeaderCheck]("mock_models_check")


def mock_model(model_id: str, name: str, created_at: str) -> MockModel:
    return {"type": "model", "id": model_id, "display_name": name, "created_at": created_at}


def _not_found(message: str) -> web.Response:
    return web.json_response(error_body("not_found_error", message), status=404)


def _bad(message: str) -> web.Response:
    return web.json_response(error_body("invalid_request_error", message), status=400)


def _index(models: list[MockModel], model_id: str) -> int | None:
    return next((i for i, m in enumerate(models) if m["id"] == model_id), None)


async def _list(request: web.Request) -> web.Response:
    if (refusal := request.app[_CHECK_KEY](request)) is not None:
        return refusal
    models = request.app[MODELS_KEY]
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        return _bad("limit: Input should be a valid integer")
    if not 1 <= limit <= 1000:
        return _bad("limit: must be between 1 and 1000")
    before, after = request.query.get("before_id"), request.query.get("after_id")
    start, end = 0, len(models)
    for cursor, is_after in ((after, True), (before, False)):
        if cursor is None:
            continue
        at = _index(models, cursor)
        if at is None:
            return _not_found(f"model {cursor!r} not found")
        start, end = (at + 1, len(models)) if is_after else (0, at)
    page = models[start:end][:limit] if before is None else models[max(start, end - limit) : end]
    more = (start + limit < end) if before is None else (end - limit > start)
    return web.json_response(
        {
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
    )


async def _get(request: web.Request) -> web.Response:
    if (refusal := request.app[_CHECK_KEY](request)) is not None:
        return refusal
    models = request.app[MODELS_KEY]
    at = _index(models, request.match_info["model_id"])
    if at is None:
        return _not_found(f"model: {request.match_info['model_id']}")
    return web.json_response(models[at])


def add_models_routes(app: web.Application, check: HeaderCheck) -> None:
    """Serve the Models API on ``app``; ``check`` refuses a request (its credentials, its
    anthropic-version) as the mock's other routes do."""
    app[MODELS_KEY] = [mock_model(*model) for model in MOCK_MODELS]
    app[_CHECK_KEY] = check
    app.router.add_get("/v1/models", _list)
    app.router.add_get("/v1/models/{model_id}", _get)
