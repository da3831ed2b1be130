"""Tags and the ledger through the API (issue 18, items 2 and 3) against a real Redis and the
mock upstream: the ``budgeter-tags`` header and ``metadata.user_id`` reach the entry of a
``/v1/messages`` call (plain and streamed) and of every job of a tagged batch; ``GET
/v1/usage/ledger`` reads only the caller's own; ``GET /admin/ledger?tenant=``; bad tags and
bad query parameters are 400s naming them, with nothing reserved."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.ledger.tags import MAX_TAGS, TagError, parse_tags_header, request_tags
from tests.api.test_proxy import ADMIN, Proxy, ask, proxy  # noqa: F401 -- the fixture

HOSTILE_TAGS = [
    "Team=x",  # upper case key
    "1team=x",
    "team",  # no '='
    "=x",
    "t" * 33 + "=x",
    "team=" + "v" * 129,
    "team=a,team=b",
    ",".join(f"k{n}=v" for n in range(MAX_TAGS + 1)),
    "team=a\x01b",
    "té=x",
    "team=x;y,other",
]


def test_tag_parsing() -> None:
    assert parse_tags_header(" team = search , feature=rerank ") == {
        "team": "search",
        "feature": "rerank",
    }
    assert parse_tags_header(None) == {} and parse_tags_header("  ") == {}
    assert parse_tags_header("a=,b=x=y") == {"a": "", "b": "x=y"}
    for bad in HOSTILE_TAGS:
        try:
            parse_tags_header(bad)
        except TagError:
            continue
        raise AssertionError(bad)
    assert request_tags({"a": "1"}, {"metadata": {"user_id": "u-9"}}) == {"a": "1", "user": "u-9"}
    assert request_tags({"user": "h"}, {"metadata": {"user_id": "u-9"}}) == {"user": "h"}
    assert request_tags({}, {"metadata": "nope"}) == {}
    full = {f"k{n}": "v" for n in range(MAX_TAGS)}
    # metadata.user_id is the API's own field: it never refuses a request
    assert request_tags(full, {"metadata": {"user_id": "u"}}) == full  # 8 already: left out
    long_id = '{"device_id":"' + "d" * 150 + '","session_id":"s\n1"}'
    user = request_tags({}, {"metadata": {"user_id": long_id}})["user"]
    assert len(user) == 117 and user.startswith('{"device_id":"ddd') and "~" in user
    assert request_tags({}, {"metadata": {"user_id": "a\nb"}}) == {"user": "a b"}


async def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return r.status, await r.json()


async def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        if r.content_type == "text/event-stream":
            await r.read()
            return r.status, None
        return r.status, await r.json()


async def test_tags_reach_the_ledger_and_tenants_read_their_own(
    proxy: Proxy,  # noqa: F811
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    key = await proxy.tenant("acme", {"budgets": {"day": 1_000_000}})
    other = await proxy.tenant("other", {"budgets": {"day": 1_000_000}})
    h = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    tagged = {**h, "budgeter-tags": "team=search,feature=rerank"}
    status, answer = await _post(
        f"{proxy.url}/v1/messages", {**ask(1), "metadata": {"user_id": "u-1"}}, tagged
    )
    assert status == 200, answer
    status, _ = await _post(f"{proxy.url}/v1/messages", {**ask(2), "stream": True}, tagged)
    assert status == 200
    await proxy.settled()
    for bad in HOSTILE_TAGS:
        if "\x01" in bad:  # no client sends a control character in a header
            continue
        hostile = {**h, "budgeter-tags": bad}
        status, answer = await _post(f"{proxy.url}/v1/messages", ask(3), hostile)
        assert status == 400 and answer["type"] == "error", (bad, answer)
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"].startswith("budgeter-tags:")
    assert not await redis.hlen("budgeter:{t:acme}:resv")

    status, page = await _get(f"{proxy.url}/v1/usage/ledger", h)
    assert status == 200
    entries = page["entries"]
    assert [e["tags"] for e in entries] == [
        {"team": "search", "feature": "rerank", "user": "u-1"},
        {"team": "search", "feature": "rerank"},
    ]
    assert all(e["tenant"] == "acme" and e["outcome"] == "settled" for e in entries)
    assert all(e["source"].startswith("req_") and e["key"].startswith("key_") for e in entries)
    assert all(e["output"] > 0 and e["model"] == "claude-sonnet-4-6" for e in entries)
    status, page = await _get(f"{proxy.url}/v1/usage/ledger?tag=user=u-1", h)
    assert [e["source"] for e in page["entries"]] == [entries[0]["source"]]
    status, page = await _get(f"{proxy.url}/v1/usage/ledger?limit=1", h)
    assert len(page["entries"]) == 1 and page["next_cursor"] == entries[0]["id"]
    cursor = page["next_cursor"]
    status, page = await _get(f"{proxy.url}/v1/usage/ledger?cursor={cursor}", h)
    assert [e["id"] for e in page["entries"]] == [entries[1]["id"]]
    status, page = await _get(f"{proxy.url}/v1/usage/ledger", {"x-api-key": other})
    assert status == 200 and page["entries"] == []  # only its own

    status, page = await _get(
        f"{proxy.url}/admin/ledger?tenant=acme&model=claude-sonnet-4-6", ADMIN
    )
    assert status == 200 and [e["id"] for e in page["entries"]] == [e["id"] for e in entries]

    # a tagged batch: every job's entry carries the batch's tags and its source
    batch = {
        "requests": [
            {"custom_id": "c-1", "params": {**ask(4), "metadata": {"user_id": "u-2"}}},
            {"custom_id": "c-2", "params": ask(5)},
        ]
    }
    status, created = await _post(
        f"{proxy.url}/v1/messages/batches", batch, {**h, "budgeter-tags": "team=batchy"}
    )
    assert status == 200, created
    for bad in HOSTILE_TAGS[:3]:
        status, answer = await _post(
            f"{proxy.url}/v1/messages/batches", batch, {**h, "budgeter-tags": bad}
        )
        assert status == 400 and answer["error"]["message"].startswith("budgeter-tags:")
    raw = await redis.hget(f"budgeter:{{t:acme}}:batch:{created['id']}", "tags")
    assert raw == '{"team":"batchy"}'
    for secret in ("rerank", "u-1", "u-2", "batchy"):  # tags and metadata: never at INFO
        assert secret not in caplog.text


async def test_hostile_ledger_queries(proxy: Proxy) -> None:  # noqa: F811
    key = await proxy.tenant("acme", {"budgets": {"day": 1_000_000}})
    h = {"x-api-key": key}
    for query in (
        "since=yesterday-ish",
        "until=%00",
        "tag=team",
        "tag=Team=x",
        "tag=" + "a" * 40 + "=x",
        "cursor=abc",
        "cursor=1-2-3",
        "limit=0",
        "limit=5000",
        "limit=x",
        "model=",
        "model=" + "m" * 201,
        "model=a%0Ab",
    ):
        status, answer = await _get(f"{proxy.url}/v1/usage/ledger?{query}", h)
        assert status == 400, (query, answer)
        assert answer["error"]["type"] == "invalid_request_error"
        assert query.split("=")[0] in answer["error"]["message"], (query, answer)
    for query, want in (
        ("", 400),
        ("tenant=Bad%20Id", 400),
        ("tenant=%7Bt%3Aacme%7D", 400),
        ("tenant=nobody", 404),
    ):
        status, answer = await _get(f"{proxy.url}/admin/ledger?{query}", ADMIN)
        assert status == want, (query, answer)
    status, _ = await _get(f"{proxy.url}/admin/ledger?tenant=acme", h)  # a tenant key: no
    assert status == 401
    status, _ = await _get(f"{proxy.url}/v1/usage/ledger", {})
    assert status == 401
    await asyncio.sleep(0)
