"""``GET /v1/models`` and ``GET /v1/models/{model_id}`` in Anthropic's shapes.

The list is the upstream's own ``/v1/models`` (every page of it), kept for
``CATALOG_TTL_S``; an upstream without that route (404, 405) is answered from the price
table's models instead. A failed fetch keeps serving the last list it had (or the price
table's) and tries again after ``RETRY_TTL_S``. Each tenant sees only the models its
``allowed_models`` lets it use, paged with ``limit``, ``before_id`` and ``after_id``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from budgeter.api.appkeys import TENANTS
from budgeter.api.errors import ApiError
from budgeter.api.request import limit_param, principal
from budgeter.domain.messages import JsonValue
from budgeter.upstream.client import UpstreamClient, UpstreamError

log = logging.getLogger("budgeter.models")

CATALOG_TTL_S = 300.0
RETRY_TTL_S = 30.0
UPSTREAM_PAGE = 1000
MAX_UPSTREAM_PAGES = 20
NO_DATE = "1970-01-01T00:00:00Z"  # created_at of a model known only from the price table
_NO_MODELS_ROUTE = frozenset({404, 405})

Model = dict[str, JsonValue]
"""One model object as the upstream answers it (at least ``type``, ``id``)."""


class ModelInfo(BaseModel):
    """A model (the upstream's object passed through; it may carry more fields)."""

    model_config = ConfigDict(extra="allow")

    type: str = "model"
    id: str
    display_name: str
    created_at: str


def _list_schema() -> dict[str, Any]:
    nullable = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {
        "type": "object",
        "required": ["data", "has_more", "first_id", "last_id"],
        "properties": {
            "data": {"type": "array", "items": ModelInfo.model_json_schema()},
            "has_more": {"type": "boolean"},
            "first_id": nullable,
            "last_id": nullable,
        },
    }


MODEL_SCHEMA: dict[str, Any] = ModelInfo.model_json_schema()
MODEL_LIST_SCHEMA: dict[str, Any] = _list_schema()


def display_name(model_id: str) -> str:
    """``claude-sonnet-4-5`` -> ``Claude Sonnet 4.5``; ``claude-3-5-haiku-latest`` ->
    ``Claude 3.5 Haiku Latest`` (a dated suffix stays as it is)."""
    words: list[str] = []
    for part in model_id.split("-"):
        if re.fullmatch(r"\d{1,2}", part) and words and re.fullmatch(r"[\d.]+", words[-1]):
            words[-1] += "." + part
        else:
            words.append(part[:1].upper() + part[1:])
    return " ".join(words)


def price_table_models(names: Iterable[str]) -> list[Model]:
    """The models a price table names (``*`` is none), newest-looking first (by id)."""
    ids = sorted({name for name in names if name != "*"}, reverse=True)
    return [
        {"type": "model", "id": i, "display_name": display_name(i), "created_at": NO_DATE}
        for i in ids
    ]


def _models_of(payload: dict[str, JsonValue]) -> tuple[list[Model], str | None]:
    """The well-formed model objects of one upstream page, and the id to page on after it
    (None: the last page)."""
    data = payload.get("data")
    models = [
        item
        for item in (data if isinstance(data, list) else [])
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
    ]
    for item in models:
        item.setdefault("type", "model")
        item.setdefault("display_name", str(item["id"]))
        item.setdefault("created_at", NO_DATE)
    last = payload.get("last_id")
    more = payload.get("has_more") is True and isinstance(last, str) and bool(models)
    return models, (str(last) if more else None)


class ModelCatalog:
    """The models budgeter offers, cached (``clock`` is injectable for tests)."""

    def __init__(
        self,
        upstream: UpstreamClient,
        price_models: Callable[[], Iterable[str]],
        *,
        ttl_s: float = CATALOG_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self._price_models = price_models  # read only when the upstream has no list
        self.ttl_s = ttl_s
        self._clock = clock
        self._models: list[Model] | None = None
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()
        self.source = "none"  # "upstream" or "prices" once read

    async def models(self) -> list[Model]:
        if self._models is not None and self._clock() < self._fresh_until:
            return self._models
        async with self._lock:
            if self._models is None or self._clock() >= self._fresh_until:
                await self._refresh()
        assert self._models is not None
        return self._models

    async def _refresh(self) -> None:
        try:
            models = await self._fetch()
        except UpstreamError as exc:
            if exc.status in _NO_MODELS_ROUTE:
                log.info("the upstream has no /v1/models: the price table's models are listed")
                self._keep(self._fallback(), "prices", self.ttl_s)
            else:
                log.warning("upstream /v1/models failed (%s); trying again later", exc)
                if self._models is None:
                    self._keep(self._fallback(), "prices", RETRY_TTL_S)
                else:  # the last list, whichever it was
                    self._keep(self._models, self.source, RETRY_TTL_S)
            return
        self._keep(models, "upstream", self.ttl_s)

    def _fallback(self) -> list[Model]:
        return price_table_models(self._price_models())

    def _keep(self, models: list[Model], source: str, ttl_s: float) -> None:
        self._models, self.source = models, source
        self._fresh_until = self._clock() + ttl_s

    async def _fetch(self) -> list[Model]:
        models: list[Model] = []
        after: str | None = None
        for _ in range(MAX_UPSTREAM_PAGES):
            query = {"limit": str(UPSTREAM_PAGE)} | ({"after_id": after} if after else {})
            page, after = _models_of((await self.upstream.get_json("/v1/models", query)).payload)
            models.extend(page)
            if after is None:
                break
        return models


MODELS = web.AppKey("models", ModelCatalog)


async def _allowed_models(request: web.Request) -> list[Model]:
    policy = await request.app[TENANTS].get(principal(request).tenant)
    if policy is None:
        raise ApiError(404, "this key's tenant has no policy (tenant not found)")
    return [m for m in await request.app[MODELS].models() if policy.allows(str(m["id"]))]


def _index(models: list[Model], model_id: str) -> int:
    for i, model in enumerate(models):
        if model["id"] == model_id:
            return i
    raise ApiError(404, f"model {model_id!r} not found")


def page_of(
    models: list[Model], limit: int, before_id: str | None, after_id: str | None
) -> tuple[list[Model], bool]:
    """One page of ``models`` (in order) and whether there are more in its direction."""
    if after_id is not None:
        start = _index(models, after_id) + 1
        return models[start : start + limit], start + limit < len(models)
    if before_id is not None:
        end = _index(models, before_id)
        start = max(0, end - limit)
        return models[start:end], start > 0
    return models[:limit], limit < len(models)


async def list_models(request: web.Request) -> web.Response:
    before_id = request.query.get("before_id")
    after_id = request.query.get("after_id")
    if before_id and after_id:
        raise ApiError(400, "before_id and after_id cannot be used together")
    limit = limit_param(request)
    page, has_more = page_of(await _allowed_models(request), limit, before_id, after_id)
    return web.json_response(
        {
            "data": page,
            "has_more": has_more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
    )


async def get_model(request: web.Request) -> web.Response:
    models = await _allowed_models(request)
    return web.json_response(models[_index(models, request.match_info["model_id"])])
