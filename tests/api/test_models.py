"""``GET /v1/models`` and ``GET /v1/models/{id}`` (issue 16, item 3): the upstream's own
list (cached, injectable clock) or the price table's, filtered by ``allowed_models``,
paged as Anthropic pages, with the official SDK against the real mock upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.api.models import (
    CATALOG_TTL_S,
    RETRY_TTL_S,
    ModelCatalog,
    display_name,
    page_of,
    price_table_models,
)
from budgeter.serving import serve_app
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.mock import create_app as create_mock
from budgeter.upstream.mock_models import MOCK_MODELS, MODELS_KEY, mock_model
from budgeter.upstream.mock_record import RECORDER_KEY
from tests.api.passthrough_stack import UPSTREAM_KEY, Stack, passthrough_stack
from tests.helpers import mock_upstream

MOCK_IDS = [model_id for model_id, _, _ in MOCK_MODELS]


@asynccontextmanager
async def mock_upstream_app(app: web.Application) -> AsyncIterator[str]:
    """Serve a mock app the test holds (to change its model list in place)."""
    async with serve_app(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def stack(redis: Redis, redis_url: str) -> AsyncIterator[Stack]:
    async with passthrough_stack(redis, redis_url) as found:
        yield found


async def get(stack: Stack, path: str, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.url}{path}", headers={"x-api-key": key}) as resp,
    ):
        return resp.status, await resp.json()


async def test_the_sdk_lists_and_retrieves_the_upstreams_models(stack: Stack) -> None:
    key = await stack.tenant("lister")
    client = stack.client(key)
    listed = [model async for model in client.models.list(limit=2)]  # pages of 2, followed
    assert [m.id for m in listed] == MOCK_IDS
    assert listed[0].display_name == "Claude Opus 4.5" and listed[0].type == "model"
    one = await client.models.retrieve(MOCK_IDS[2])
    assert (one.id, one.display_name) == (MOCK_IDS[2], "Claude Sonnet 4.5")
    assert one.created_at.year == 2025
    with pytest.raises(anthropic.NotFoundError, match="not found"):
        await client.models.retrieve("claude-none")
    # one upstream read served it all (cached), with the upstream's key and version
    reads = [r for r in stack.received() if r.path == "/v1/models"]
    assert len(reads) == 1 and reads[0].query == {"limit": "1000"}
    assert reads[0].headers["anthropic-version"] == "2023-06-01"


async def test_a_tenant_sees_only_its_allowed_models(stack: Stack) -> None:
    allowed = [MOCK_IDS[1], MOCK_IDS[3], "claude-not-upstream"]
    key = await stack.tenant("narrow", {"allowed_models": allowed})
    status, page = await get(stack, "/v1/models", key)
    assert status == 200
    assert [m["id"] for m in page["data"]] == [MOCK_IDS[1], MOCK_IDS[3]]
    assert page == {
        "data": page["data"],
        "has_more": False,
        "first_id": MOCK_IDS[1],
        "last_id": MOCK_IDS[3],
    }
    assert (await get(stack, f"/v1/models/{MOCK_IDS[3]}", key))[0] == 200
    status, refused = await get(stack, f"/v1/models/{MOCK_IDS[0]}", key)
    assert status == 404 and refused["error"]["type"] == "not_found_error"
    assert MOCK_IDS[0] in refused["error"]["message"]


async def test_pages_follow_anthropics_cursors(stack: Stack) -> None:
    key = await stack.tenant("pager")
    status, first = await get(stack, "/v1/models?limit=2", key)
    assert status == 200
    assert [m["id"] for m in first["data"]] == MOCK_IDS[:2] and first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == (MOCK_IDS[0], MOCK_IDS[1])
    _, second = await get(stack, f"/v1/models?limit=2&after_id={first['last_id']}", key)
    assert [m["id"] for m in second["data"]] == MOCK_IDS[2:4] and second["has_more"] is True
    _, last = await get(stack, f"/v1/models?limit=2&after_id={second['last_id']}", key)
    assert [m["id"] for m in last["data"]] == MOCK_IDS[4:] and last["has_more"] is False
    _, back = await get(stack, f"/v1/models?limit=2&before_id={last['first_id']}", key)
    assert [m["id"] for m in back["data"]] == MOCK_IDS[2:4] and back["has_more"] is True
    _, start = await get(stack, f"/v1/models?limit=5&before_id={MOCK_IDS[1]}", key)
    assert [m["id"] for m in start["data"]] == MOCK_IDS[:1] and start["has_more"] is False
    _, everything = await get(stack, "/v1/models", key)  # default limit 20
    assert [m["id"] for m in everything["data"]] == MOCK_IDS and everything["has_more"] is False
    for query, status_code in [
        ("limit=0", 400),
        ("limit=1001", 400),
        ("limit=x", 400),
        (f"before_id={MOCK_IDS[1]}&after_id={MOCK_IDS[0]}", 400),
        ("after_id=claude-none", 404),
    ]:
        status, body = await get(stack, f"/v1/models?{query}", key)
        assert status == status_code, query
        assert body["type"] == "error"


async def test_the_models_routes_need_a_tenant_key(stack: Stack) -> None:
    for path in ("/v1/models", f"/v1/models/{MOCK_IDS[0]}"):
        status, body = await get(stack, path, "sk-bgt-wrong")
        assert status == 401 and body["error"]["type"] == "authentication_error"


async def test_without_an_upstream_list_the_price_table_answers(
    redis: Redis, redis_url: str
) -> None:
    bare = web.Application()  # an upstream with no /v1/models (like the AnyInt gateway's spec)
    prices = {"my-house-model": {"input": 1.0, "output": 2.0}}
    async with passthrough_stack(redis, redis_url, mock=bare, prices=prices) as stack:
        key = await stack.tenant("fallback")
        status, page = await get(stack, "/v1/models?limit=1000", key)
        assert status == 200
        ids = [m["id"] for m in page["data"]]
        assert "my-house-model" in ids and "*" not in ids
        status, one = await get(stack, "/v1/models/my-house-model", key)
        assert status == 200
        assert one == {
            "type": "model",
            "id": "my-house-model",
            "display_name": "My House Model",
            "created_at": "1970-01-01T00:00:00Z",
        }
        narrow = await stack.tenant("narrow", {"allowed_models": ["my-house-model"]})
        _, page = await get(stack, "/v1/models", narrow)
        assert [m["id"] for m in page["data"]] == ["my-house-model"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_catalog_is_cached_and_survives_a_failing_upstream() -> None:
    clock = Clock()
    mock = create_mock(MockConfig(api_key=UPSTREAM_KEY))
    async with mock_upstream_app(mock) as url, aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, url, UPSTREAM_KEY)
        catalog = ModelCatalog(upstream, lambda: ["from-prices"], clock=clock)

        def reads() -> int:
            return len([r for r in mock[RECORDER_KEY].records if r.path == "/v1/models"])

        assert [m["id"] for m in await catalog.models()] == MOCK_IDS
        clock.now += CATALOG_TTL_S - 1
        await catalog.models()
        assert reads() == 1 and catalog.source == "upstream"
        mock[MODELS_KEY].insert(0, mock_model("claude-new", "Claude New", "2026-01-01T00:00:00Z"))
        clock.now += 2
        assert [m["id"] for m in await catalog.models()] == ["claude-new", *MOCK_IDS]
        assert reads() == 2
        # the upstream now fails: the last list is kept, and asked again after RETRY_TTL_S
        async with session.post(f"{url}/mock/config", json={"api_key": "rotated"}) as resp:
            assert resp.status == 200
        clock.now += CATALOG_TTL_S + 1
        assert [m["id"] for m in await catalog.models()] == ["claude-new", *MOCK_IDS]
        clock.now += RETRY_TTL_S - 1
        await catalog.models()
        assert reads() == 3
        clock.now += 2
        await catalog.models()
        assert reads() == 4 and catalog.source == "upstream"


async def test_a_failing_upstream_with_no_list_yet_answers_the_price_table() -> None:
    async with (
        mock_upstream(MockConfig(api_key="other")) as (url, _app),
        aiohttp.ClientSession() as session,
    ):
        upstream = UpstreamClient(session, url, UPSTREAM_KEY)  # a key it refuses (401)
        catalog = ModelCatalog(upstream, lambda: ["p-1", "*", "p-2"])
        assert [m["id"] for m in await catalog.models()] == ["p-2", "p-1"]
        assert catalog.source == "prices"


async def test_the_upstream_list_is_read_page_by_page() -> None:
    mock = create_mock(MockConfig(api_key=UPSTREAM_KEY))
    many = [mock_model(f"m-{i:04d}", f"M {i}", "2025-01-01T00:00:00Z") for i in range(2500)]
    async with mock_upstream_app(mock) as url, aiohttp.ClientSession() as session:
        mock[MODELS_KEY][:] = many
        catalog = ModelCatalog(UpstreamClient(session, url, UPSTREAM_KEY), list)
        assert [m["id"] for m in await catalog.models()] == [m["id"] for m in many]
        reads = [r.query for r in mock[RECORDER_KEY].records if r.path == "/v1/models"]
        assert reads == [
            {"limit": "1000"},
            {"limit": "1000", "after_id": "m-0999"},
            {"limit": "1000", "after_id": "m-1999"},
        ]


def test_display_names_and_pages() -> None:
    assert display_name("claude-sonnet-4-5") == "Claude Sonnet 4.5"
    assert display_name("claude-3-5-haiku-latest") == "Claude 3.5 Haiku Latest"
    assert display_name("claude-opus-4-1-20250805") == "Claude Opus 4.1 20250805"
    models = price_table_models(["a", "c", "b", "*"])
    assert [m["id"] for m in models] == ["c", "b", "a"]
    assert page_of(models, 2, None, None) == (models[:2], True)
    assert page_of(models, 2, None, "c") == (models[1:], False)
    assert page_of(models, 1, "a", None) == (models[1:2], True)
    assert page_of(models, 5, "c", None) == ([], False)
