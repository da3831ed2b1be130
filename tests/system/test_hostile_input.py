"""Hostile input (issue 7): schemathesis on every documented route, fuzzed JSONL for
``budgeter submit``, and hand-made attacks on the API and the sync proxy.

Whatever comes in, the answer is never a 5xx nor a traceback; every error is Anthropic's
``{"type": "error", "error": {"type", "message"}}`` with a ``request-id``; and a refused
request changes nothing in Redis: another tenant's queued batch stays byte-identical and no
key appears. Every request stays on loopback: the API's upstream is a mock served here.
"""

from __future__ import annotations

import asyncio
import copy
import io
import itertools
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis as sync_redis
import requests
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from budgeter.api.app import create_app
from budgeter.api.openapi import openapi_document
from budgeter.cli.commands import main as cli_main
from budgeter.domain.messages import MAX_JSON_DEPTH, MAX_TOKENS_LIMIT
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.store.client import make_redis
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.mock import create_app as create_mock
from tests.helpers import mock_upstream

ADMIN_TOKEN = "admin-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_BODY_MB = 1


def hostile_settings(redis_url: str, upstream_url: str, **overrides: Any) -> Settings:
    return Settings(
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        api_max_body_mb=MAX_BODY_MB,
        upstream_url=upstream_url,
        upstream_max_attempts=1,
        # the unauthenticated probes must meet 401, not the failed-auth throttle
        auth_failures_per_minute=1_000_000,
        **overrides,
    )


def assert_error_shape(headers: Any, body: Any, where: str) -> None:
    """Anthropic's error body, and a request-id, on an error answer."""
    request_id = headers.get("request-id") or ""
    if isinstance(request_id, list):  # schemathesis' Response keeps every value
        request_id = request_id[0]
    assert request_id.startswith("req_"), f"{where}: no request-id"
    assert isinstance(body, dict) and set(body) == {"type", "error"}, f"{where}: {body!r}"
    assert body["type"] == "error", f"{where}: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"type", "message"}, f"{where}: {body!r}"
    assert isinstance(error["type"], str) and error["type"], f"{where}: {body!r}"
    assert isinstance(error["message"], str) and error["message"], f"{where}: {body!r}"


def request_line(custom_id: str, **params: Any) -> dict[str, Any]:
    body = {
        "model": "claude-test",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return {"custom_id": custom_id, "params": {**body, **params}}


# 1. schemathesis on every documented operation, against a live API ------------------------


@dataclass
class LiveApi:
    url: str


@pytest.fixture(scope="module")
def live_api(redis_url: str) -> Iterator[LiveApi]:
    """The API and the mock upstream on loopback ports, served by a thread of their own
    (schemathesis calls them synchronously with requests)."""
    started: dict[str, LiveApi] = {}
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        redis = make_redis(redis_url)
        try:
            async with serve_app(create_mock(MockConfig()), "127.0.0.1", 0) as mock_port:
                settings_ = hostile_settings(redis_url, f"http://127.0.0.1:{mock_port}")
                async with serve_app(create_app(settings_, redis=redis), "127.0.0.1", 0) as port:
                    started["live"] = LiveApi(f"http://127.0.0.1:{port}")
                    ready.set()
                    await stop.wait()
        finally:
            await redis.aclose()
            ready.set()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="hostile-live-api", daemon=True)
    thread.start()
    assert ready.wait(30) and "live" in started, "the live API did not start"
    try:
        yield started["live"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


# Free-form objects and unbounded arrays of request bodies make hypothesis-jsonschema
# generate megabytes of nested JSON per case (20 s for 30 batches). The copy fuzzed here
# bounds them (scalar extra fields, at most 3 items); every documented field, type and
# constraint stays, and the response schemas are the served ones, unchanged.
_REQUEST_ONLY = ("MessageParams", "Message", "CountTokensBody", "CreateBatchBody", "BatchRequest")


def _bounded(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("additionalProperties") is True:
            node["additionalProperties"] = {"type": ["string", "integer", "boolean", "null"]}
        if node.get("type") == "array":
            node["maxItems"] = min(node.get("maxItems", 3), 3)
        for value in node.values():
            _bounded(value)
    elif isinstance(node, list):
        for value in node:
            _bounded(value)


def _fuzz_document() -> dict[str, Any]:
    document = copy.deepcopy(openapi_document())
    for name in _REQUEST_ONLY:
        _bounded(document["components"]["schemas"][name])
    return document


SCHEMA = schemathesis.openapi.from_dict(_fuzz_document())
OPERATIONS = sorted(
    (op.path, op.method.upper()) for op in (r.ok() for r in SCHEMA.get_all_operations())
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases on every run: CI stays stable
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _takes_input(path: str, method: str) -> bool:
    spec = openapi_document()["paths"][path][method.lower()]
    return bool(spec.get("parameters") or spec.get("requestBody"))


def _auth_for(path: str, tenant_key: str) -> dict[str, str]:
    if path.startswith("/v1/"):
        return {"x-api-key": tenant_key}
    if path.startswith("/admin"):
        return dict(ADMIN)
    return {}


def _check_answer(case: Any, response: Any) -> None:
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert_error_shape(response.headers, response.json(), where)
    case.validate_response(response, checks=CHECKS)


def _setup_fuzzed_tenant(http: requests.Session, base: str, redis_url: str) -> tuple[str, str]:
    """A fresh database with tenant ``fuzzed``, its key and one queued batch: (key, batch id).
    (Fresh: a global policy fuzzed by an earlier operation must not refuse this one's calls.)"""
    with sync_redis.Redis.from_url(redis_url) as client:
        client.flushall()
    resp = http.put(f"{base}/admin/tenants/fuzzed", json={}, headers=ADMIN, timeout=10)
    assert resp.status_code in (200, 201), resp.text
    resp = http.post(f"{base}/admin/tenants/fuzzed/keys", headers=ADMIN, timeout=10)
    assert resp.status_code == 201, resp.text
    key = str(resp.json()["key"])
    resp = http.post(
        f"{base}/v1/messages/batches",
        json={"requests": [request_line("a"), request_line("b")]},
        headers={"x-api-key": key},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return key, str(resp.json()["id"])


# valid bodies, so that the answers 200 (JSON and event stream) are checked too
VALID_BODIES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/v1/messages", "POST"): [
        request_line("x")["params"],
        {**request_line("x")["params"], "stream": True},
    ],
    ("/v1/messages/count_tokens", "POST"): [
        {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
    ],
    ("/v1/messages/batches", "POST"): [{"requests": [request_line("a"), request_line("b")]}],
    # a JSON merge patch of tenant fuzzed's policy: merged, deleting, and invalid once merged
    ("/admin/tenants/{tenant}", "PATCH"): [
        {"weight": 2, "budgets": {"day": 1000}},
        {"rate": {"rpm": None}, "budgets": None},
        {"rate": {"rpm": 0}},
    ],
}


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_schemathesis_every_operation(
    live_api: LiveApi, redis_url: str, path: str, method: str
) -> None:
    """Positive and negative cases of each operation, with valid credentials; where the
    operation names a tenant or a batch, or takes a body, some cases use real ones (answers
    200 are then checked against the documented schemas too)."""
    operation = SCHEMA[path][method]
    with requests.Session() as http:
        key, batch_id = _setup_fuzzed_tenant(http, live_api.url, redis_url)
        auth = _auth_for(path, key)
        if _takes_input(path, method):
            spec = openapi_document()["paths"][path][method.lower()]
            names = {parameter["name"] for parameter in spec.get("parameters", [])}
            real = {"tenant": "fuzzed", "batch_id": batch_id}
            fixed = {name: value for name, value in real.items() if name in names}
            strategies = [
                operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
            ]
            if fixed:
                strategies.append(
                    operation.as_strategy(
                        generation_mode=GenerationMode.POSITIVE, path_parameters=fixed
                    )
                )
            kinds = list(spec.get("requestBody", {}).get("content", {}))
            strategies += [
                operation.as_strategy(body=body, media_type=kind)
                for body in VALID_BODIES.get((path, method), [])
                for kind in kinds
            ]
            strategy, examples = st.one_of(strategies), 30
        else:
            strategy, examples = operation.as_strategy(), 5

        @_fuzz_settings(examples)
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            _check_answer(
                case, case.call(base_url=live_api.url, session=http, headers=auth, timeout=30)
            )

        fuzz()


SECURED = [(p, m) for p, m in OPERATIONS if p.startswith(("/v1/", "/admin"))]


@pytest.mark.parametrize(("path", "method"), SECURED, ids=[f"{m} {p}" for p, m in SECURED])
def test_schemathesis_without_credentials(live_api: LiveApi, path: str, method: str) -> None:
    """No credentials, or wrong ones: 401 authentication_error, in Anthropic's shape."""
    operation = SCHEMA[path][method]
    wrong = (
        {"x-api-key": "sk-bgt-wrong"}
        if path.startswith("/v1/")
        else {"authorization": "Bearer wrong"}
    )
    with requests.Session() as http:

        @_fuzz_settings(4)
        @given(case=operation.as_strategy(), credentials=st.sampled_from([{}, wrong]))
        def probe(case: Any, credentials: dict[str, str]) -> None:
            case.headers = {
                k: v
                for k, v in (case.headers or {}).items()
                if k.lower() not in ("authorization", "x-api-key")
            }
            response = case.call(
                base_url=live_api.url, session=http, headers=credentials, timeout=30
            )
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code == 401, (
                f"{where}: {response.status_code} {response.text[:200]}"
            )
            body = response.json()
            assert_error_shape(response.headers, body, where)
            assert body["error"]["type"] == "authentication_error"

        probe()


async def test_admin_routes_answer_403_when_the_admin_api_is_disabled(
    redis: Redis, redis_url: str
) -> None:
    """Without BUDGETER_ADMIN_TOKEN every documented admin operation answers 403, whatever
    token is sent."""
    settings_ = Settings(redis_url=redis_url, upstream_url="http://127.0.0.1:9")
    async with TestClient(TestServer(create_app(settings_, redis=redis))) as client:
        for path, method in OPERATIONS:
            if not path.startswith("/admin"):
                continue
            url = path.replace("{tenant}", "acme").replace("{key_id}", "key_0")
            for headers in ({}, ADMIN, {"authorization": "Bearer "}):
                resp = await client.request(method, url, json={}, headers=headers)
                await expect_refused(resp, 403, "permission_error", f"{method} {url}")
    assert await redis.dbsize() == 0


# helpers for the in-process API (aiohttp test client) ----------------------------------------


@dataclass
class Api:
    client: TestClient
    raw: Redis  # bytes in, bytes out: DUMP values
    upstream_url: str
    attacker: dict[str, str]
    victim_batch: str

    async def snapshot(self) -> dict[bytes, tuple[bytes, bytes]]:
        """Every key of the database with its type and DUMP (serialised value)."""
        keys = sorted(await self.raw.keys("*"))
        async with self.raw.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.type(key)
                pipe.dump(key)
            values = await pipe.execute()
        return {key: (values[2 * i], values[2 * i + 1]) for i, key in enumerate(keys)}

    async def upstream_calls(self) -> dict[str, int]:
        async with self.client.session.get(f"{self.upstream_url}/mock/stats") as resp:
            return dict((await resp.json())["requests"])


@pytest.fixture
async def api(redis: Redis, redis_url: str) -> AsyncIterator[Api]:
    """The API in-process with a victim tenant whose batch is queued, and an attacker."""
    raw = Redis.from_url(redis_url)
    async with mock_upstream() as (upstream_url, _):
        settings_ = hostile_settings(redis_url, upstream_url)
        async with TestClient(TestServer(create_app(settings_, redis=redis))) as client:
            keys = {}
            for tenant in ("victim", "attacker"):
                resp = await client.put(
                    f"/admin/tenants/{tenant}", json={"budgets": {"day": 10**6}}, headers=ADMIN
                )
                assert resp.status == 201
                resp = await client.post(f"/admin/tenants/{tenant}/keys", headers=ADMIN)
                keys[tenant] = (await resp.json())["key"]
            resp = await client.post(
                "/v1/messages/batches",
                json={"requests": [request_line(f"v-{i}") for i in range(3)]},
                headers={"x-api-key": keys["victim"]},
            )
            assert resp.status == 200
            victim_batch = (await resp.json())["id"]
            yield Api(client, raw, upstream_url, {"x-api-key": keys["attacker"]}, victim_batch)
    await raw.aclose()


async def expect_refused(resp: Any, status: int, error_type: str, where: str) -> str:
    text = await resp.text()
    assert resp.status == status, f"{where}: {resp.status} {text[:300]}"
    body = json.loads(text)
    assert_error_shape(resp.headers, body, where)
    assert body["error"]["type"] == error_type, f"{where}: {body}"
    return str(body["error"]["message"])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def params_json(**override: str) -> str:
    """A /v1/messages body as JSON text, with some values replaced by raw JSON text."""
    fields = {
        "model": '"claude-test"',
        "max_tokens": "16",
        "messages": '[{"role": "user", "content": "hi"}]',
        **override,
    }
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


# hostile bodies: (name, params JSON bytes, fragment of the 400 message)
HOSTILE_PARAMS: list[tuple[str, bytes, str]] = [
    ("invalid utf-8", params_json(model='"claude-\xff"').encode("latin-1"), "UTF-8"),
    ("lone surrogate", params_json(model='"a\\ud800"').encode(), "surrogate"),
    ("NaN", params_json(temperature="NaN").encode(), "NaN"),
    ("Infinity", params_json(temperature="-Infinity").encode(), "Infinity"),
    ("float overflow", params_json(temperature="1e999").encode(), "out of range"),
    ("integer over 64 bits", params_json(max_tokens=str(10**30)).encode(), "out of range"),
    ("5000-digit integer", params_json(max_tokens="9" * 5000).encode(), "out of range"),
    ("max_tokens 0", params_json(max_tokens="0").encode(), "max_tokens"),
    ("max_tokens negative", params_json(max_tokens="-5").encode(), "max_tokens"),
    ("max_tokens huge", params_json(max_tokens=str(MAX_TOKENS_LIMIT + 1)).encode(), "max_tokens"),
    ("max_tokens 2**63-1", params_json(max_tokens=str(2**63 - 1)).encode(), "max_tokens"),
    ("max_tokens float", params_json(max_tokens="16.5").encode(), "max_tokens"),
    ("max_tokens 16.0", params_json(max_tokens="16.0").encode(), "max_tokens"),
    ("max_tokens string", params_json(max_tokens='"16"').encode(), "max_tokens"),
    ("max_tokens bool", params_json(max_tokens="true").encode(), "max_tokens"),
    ("max_tokens null", params_json(max_tokens="null").encode(), "max_tokens"),
    ("model number", params_json(model="5").encode(), "model"),
    ("messages empty", params_json(messages="[]").encode(), "messages"),
    ("role tool", params_json(messages='[{"role": "tool", "content": "x"}]').encode(), "role"),
    (
        f"nested {MAX_JSON_DEPTH + 1} deep",
        params_json(metadata=nested(MAX_JSON_DEPTH)).encode(),
        "nested deeper",
    ),
    ("nested 3000 deep", params_json(metadata=nested(3000)).encode(), "nested deeper"),
    ("100k nested lists", nested(100_000).encode(), "nested deeper"),
    ("bare list", b"[]", "Input should be"),
    ("bare string", b'"hello"', "Input should be"),
    ("null", b"null", "Input should be"),
    ("truncated", params_json()[:-3].encode(), "not valid JSON"),
    ("BOM", b"\xef\xbb\xbf" + params_json().encode(), "BOM"),
    ("NUL in string", params_json(model='"a\x00b"').encode(), "not valid JSON"),
]
HOSTILE_IDS = [
    "}",
    "{",
    ":",
    "*",
    " ",
    "a b",
    "a\nb",
    "acme\n",
    "\u00fcber",
    "\u65e5\u672c",
    "a" * 1000,
    "../victim",
    "{t:victim}",
    "victim}:queue",
    "budgeter:{t:victim}:jobs",
    "victim*",
    "\x00",
    "%00",
]
TENANT_ONLY = ["Victim", "-victim", "_victim", "a" * 64]  # fine as custom ids


# 3. hostile bodies, ids and sizes over HTTP: refused, and nothing queued is touched ---------


async def test_hostile_batch_bodies_are_refused_and_change_nothing(api: Api) -> None:
    client = api.client
    before = await api.snapshot()
    attacks: list[tuple[str, bytes, str]] = []
    for name, params, fragment in HOSTILE_PARAMS:
        if params.startswith(b"{"):
            line = b'{"custom_id": "x", "params": ' + params + b"}"
            attacks.append((f"batch with {name}", b'{"requests": [' + line + b"]}", fragment))
        attacks.append((f"batch body is {name}", params, ""))
    attacks += [
        (
            "unknown top-level field",
            json.dumps({"requests": [request_line("a")], "tenant": "victim"}).encode(),
            "tenant",
        ),
        (
            "unknown field in a request",
            json.dumps({"requests": [{**request_line("a"), "tenant": "victim"}]}).encode(),
            "tenant",
        ),
        (
            "duplicate custom_id",
            json.dumps({"requests": [request_line("v-0"), request_line("v-0")]}).encode(),
            "duplicate",
        ),
        ("no requests", b'{"requests": []}', "requests"),
        ("empty object", b"{}", "requests"),
        ("empty body", b"", "empty"),
    ]
    attacks += [
        (f"custom_id {cid!r}", json.dumps({"requests": [request_line(cid)]}).encode(), "custom_id")
        for cid in [*HOSTILE_IDS, "", "a" * 65]
    ]
    for name, body, fragment in attacks:
        resp = await client.post("/v1/messages/batches", data=body, headers=api.attacker)
        message = await expect_refused(resp, 400, "invalid_request_error", name)
        assert fragment in message, f"{name}: {message}"
        assert await api.snapshot() == before, f"{name} changed Redis"
    listed = await client.get("/v1/messages/batches", headers=api.attacker)
    assert (await listed.json())["data"] == []


async def test_oversized_bodies_are_refused_with_413(api: Api) -> None:
    before = await api.snapshot()
    big = b'{"requests": [' + b" " * (MAX_BODY_MB * 1024 * 1024 + 1) + b"]}"
    for method, path, headers in [
        ("POST", "/v1/messages/batches", api.attacker),
        ("POST", "/v1/messages", api.attacker),
        ("POST", "/v1/messages/count_tokens", api.attacker),
        ("PUT", "/admin/tenants/victim", ADMIN),
        ("PUT", "/admin/global-policy", ADMIN),
    ]:
        resp = await api.client.request(method, path, data=io.BytesIO(big), headers=headers)
        await expect_refused(resp, 413, "request_too_large", f"{method} {path}")
    assert await api.snapshot() == before
    assert await api.upstream_calls() == {"messages": 0, "count_tokens": 0}


async def test_hostile_tenant_ids_on_admin_routes(api: Api) -> None:
    before = await api.snapshot()
    for tenant in [*HOSTILE_IDS, *TENANT_ONLY]:
        quoted = quote(tenant, safe="")
        for method, path, body in [
            ("PUT", f"/admin/tenants/{quoted}", b"{}"),
            ("GET", f"/admin/tenants/{quoted}", None),
            ("DELETE", f"/admin/tenants/{quoted}", None),
            ("POST", f"/admin/tenants/{quoted}/keys", None),
            ("GET", f"/admin/tenants/{quoted}/keys", None),
            ("DELETE", f"/admin/tenants/{quoted}/keys/key_0", None),
            ("GET", f"/admin/tenants/{quoted}/usage", None),
        ]:
            resp = await api.client.request(method, path, data=body, headers=ADMIN)
            message = await expect_refused(resp, 400, "invalid_request_error", f"{method} {path}")
            assert "invalid tenant id" in message
    assert await api.snapshot() == before


async def test_hostile_policies_are_refused(api: Api) -> None:
    before = await api.snapshot()
    bodies = [
        b'{"weight": Infinity}',
        b'{"weight": NaN}',
        b'{"weight": 1e999}',
        b'{"weight": -1}',
        b'{"budgets": {"day": -1}}',
        b'{"budgets": {"week": 5}}',
        b'{"budgets": {"day": 1.5}}',
        b'{"budgets": {"day": 100000000000000000000000000000}}',
        b'{"rate": {"rpm": "many"}}',
        b'{"max_wait_seconds": NaN}',
        b'{"max_wait_seconds": 601}',
        b'{"fallback_models": {"m": "m"}}',
        b'{"fallback_models": {"a": "b", "b": "c"}}',
        b'{"fallback_models": {"a": 5}}',
        b'{"fallback_models": {"a\\u0000": "b"}}',
        b'{"fallback_models": {"a": "b"}, "allowed_models": ["a"]}',
        b'{"tenant": "victim"}',
        b'{"budgets": ' + nested(200).encode() + b"}",
        b"[]",
        b'{"weight": 1, "weight": "x"}',
        b"{\xff}",
    ]
    for body in bodies:
        for path in ("/admin/tenants/victim", "/admin/tenants/newcomer", "/admin/global-policy"):
            resp = await api.client.put(path, data=body, headers=ADMIN)
            await expect_refused(resp, 400, "invalid_request_error", f"PUT {path} {body[:60]!r}")
    assert await api.snapshot() == before
    # the victim's policy reads back as it was (an Infinity weight once broke every listing)
    listed = await api.client.get("/admin/tenants", headers=ADMIN)
    assert listed.status == 200
    assert [t["tenant"] for t in (await listed.json())["data"]] == ["attacker", "victim"]


async def test_hostile_parents_are_refused_and_change_nothing(api: Api) -> None:
    """A policy's ``parent`` (issue 17 item 1) through PUT and PATCH: itself, not a string,
    not a tenant id (braces, colons, control characters, 10 KB), a cycle, a chain deeper
    than 4, a tenant that does not exist. Each is a 400 in Anthropic's shape naming the
    parent and the problem; the tree, its tenants and the victim's queued batch stay."""
    client = api.client
    merge = {**ADMIN, "content-type": "application/merge-patch+json"}
    # org ─ team, and a chain d0 ─ d1 ─ d2 ─ d3 ─ d4 as deep as a tree goes
    for tenant, parent in [
        ("org", None),
        ("team", "org"),
        *((f"d{n}", f"d{n - 1}" if n else None) for n in range(5)),
    ]:
        resp = await client.put(f"/admin/tenants/{tenant}", json={"parent": parent}, headers=ADMIN)
        assert resp.status == 201, await resp.text()
    before = await api.snapshot()
    not_a_string = "parent: Input should be a valid string"
    not_an_id = "parent: Value error, invalid tenant id"
    everywhere: list[tuple[str, Any, str]] = [
        ("a number", 5, not_a_string),
        ("a float", 1.5, not_a_string),
        ("a boolean", True, not_a_string),
        ("a list", ["org"], not_a_string),
        ("an object", {"tenant": "org"}, not_a_string),
        ("empty", "", not_an_id),
        ("braces", "{t:victim}", not_an_id),
        ("a closing brace", "victim}", not_an_id),
        ("colons", "budgeter:{t:victim}:policy", not_an_id),
        ("a colon", "org:team", not_an_id),
        ("a NUL", "org\x00", not_an_id),
        ("a newline", "org\n", not_an_id),
        ("an escape sequence", "\x1b[31morg", not_an_id),
        ("10 KB", "a" * 10_240, not_an_id),
        ("upper case", "Org", not_an_id),
        ("missing", "ghost", "parent: tenant 'ghost' not found (create the parent first)"),
    ]
    attacks: dict[str, list[tuple[str, Any, str]]] = {
        tenant: [*everywhere, ("itself", tenant, f"tenant {tenant!r} cannot be its own parent")]
        for tenant in ("victim", "newcomer", "org", "d0")
    }
    too_deep = "would put {} 5 levels below the root"
    attacks["victim"].append(("too deep", "d4", too_deep.format("'victim'")))
    attacks["newcomer"].append(("too deep", "d4", too_deep.format("'newcomer'")))
    attacks["org"] += [
        ("a cycle of two", "team", "parent: 'team' would make a cycle: org → team → org"),
        # org is level 4 under d3, and its child team level 5
        ("its subtree too deep", "d3", "and the deepest of the 1 level(s) below it 5"),
    ]
    attacks["d0"].append(
        ("a cycle of five", "d4", "would make a cycle: d0 → d4 → d3 → d2 → d1 → d0")
    )
    tried = 0
    for tenant, cases in attacks.items():
        methods = ["PUT"] if tenant == "newcomer" else ["PUT", "PATCH"]  # (no policy: 404)
        for (name, parent, fragment), method in itertools.product(cases, methods):
            where = f"{method} {tenant} parent {name}"
            body = json.dumps({"budgets": {"day": 7}, "parent": parent})
            headers = ADMIN if method == "PUT" else merge
            resp = await client.request(
                method, f"/admin/tenants/{tenant}", data=body, headers=headers
            )
            message = await expect_refused(resp, 400, "invalid_request_error", where)
            assert fragment in message, f"{where}: {message[:300]}"
            assert len(message) < 400, f"{where}: the whole id echoed ({len(message)} chars)"
            assert await api.snapshot() == before, f"{where} changed Redis"
            tried += 1
    assert tried == 2 * sum(map(len, attacks.values())) - len(attacks["newcomer"])
    listed = await (await client.get("/admin/tenants", headers=ADMIN)).json()
    parents = {t["tenant"]: t["policy"]["parent"] for t in listed["data"]}
    assert parents == {
        "attacker": None,
        "victim": None,
        "org": None,
        "team": "org",
        **{f"d{n}": f"d{n - 1}" if n else None for n in range(5)},
    }
    assert all(t["policy"]["budgets"] != {"day": 7} for t in listed["data"])  # none applied


async def test_hostile_key_bodies_are_refused(api: Api) -> None:
    """A key's name and limits (issue 17 item 3): 400 naming the field, nothing written;
    an oversized body 413."""
    before = await api.snapshot()
    bodies = [
        b'{"limits": {"budgets": {"day": Infinity}}}',
        b'{"limits": {"usd_budgets": {"day": NaN}}}',
        b'{"limits": {"budgets": {"day": 100000000000000000000000000000}}}',
        b'{"limits": {"rate": {"rpm": "many"}}}',
        b'{"limits": {"max_concurrency": 0}}',
        b'{"limits": {"allowed_models": ["a\\u0000"]}}',
        b'{"limits": {"weight": 100}}',
        b'{"limits": {"parent": "attacker"}}',
        b'{"limits": {"budgets": ' + nested(200).encode() + b"}}",
        b'{"name": "' + b"n" * 101 + b'"}',
        b'{"name": "a\\u001bb"}',
        b'{"tenant": "attacker"}',
        b'{"limits": {}, "limits": []}',
        b"[]",
        b"{\xff}",
    ]
    for body in bodies:
        resp = await api.client.post("/admin/tenants/victim/keys", data=body, headers=ADMIN)
        await expect_refused(resp, 400, "invalid_request_error", f"POST keys {body[:60]!r}")
    big = b'{"name": "' + b"n" * (MAX_BODY_MB * 1024 * 1024 + 1) + b'"}'
    resp = await api.client.post("/admin/tenants/victim/keys", data=io.BytesIO(big), headers=ADMIN)
    await expect_refused(resp, 413, "request_too_large", "POST keys (oversized)")
    assert await api.snapshot() == before


async def test_hostile_batch_ids_and_pagination(api: Api) -> None:
    before = await api.snapshot()
    for batch_id in [*HOSTILE_IDS, api.victim_batch + "}", api.victim_batch]:
        quoted = quote(batch_id, safe="")
        for method, path in [
            ("GET", f"/v1/messages/batches/{quoted}"),
            ("POST", f"/v1/messages/batches/{quoted}/cancel"),
            ("GET", f"/v1/messages/batches/{quoted}/results"),
            ("DELETE", f"/v1/messages/batches/{quoted}"),
        ]:
            resp = await api.client.request(method, path, headers=api.attacker)
            await expect_refused(resp, 404, "not_found_error", f"{method} {path}")
        for param in ("before_id", "after_id"):
            resp = await api.client.get(
                "/v1/messages/batches", params={param: batch_id}, headers=api.attacker
            )
            await expect_refused(resp, 404, "not_found_error", f"{param}={batch_id!r}")
    for limit in ("0", "-1", "1001", "1e3", "ten", "99999999999999999999999", "", "\x00"):
        resp = await api.client.get(
            "/v1/messages/batches", params={"limit": limit}, headers=api.attacker
        )
        await expect_refused(resp, 400, "invalid_request_error", f"limit={limit!r}")
    assert await api.snapshot() == before


HOSTILE_BETAS = ["a b", "x;y", "{t:victim}", "../x", "a" * 200, ",".join(["b"] * 2 + ["c d"])]


async def test_hostile_betas_and_model_ids_are_refused(api: Api) -> None:
    """A malformed anthropic-beta is a 400 before anything is counted, sent or queued; a
    hostile model id or cursor on the Models API is a 404 (or a 400 for a bad limit)."""
    before = await api.snapshot()
    calls = await api.upstream_calls()
    count_body = params_json().replace('"max_tokens": 16, ', "")
    batch = json.dumps({"requests": [{"custom_id": "b", "params": json.loads(params_json())}]})
    for beta in [*HOSTILE_BETAS, ",".join(f"b{i}" for i in range(65))]:
        for path, body in [
            ("/v1/messages", params_json()),
            ("/v1/messages/count_tokens", count_body),
            ("/v1/messages/batches", batch),
        ]:
            headers = {**api.attacker, "anthropic-beta": beta}
            resp = await api.client.post(path, data=body.encode(), headers=headers)
            message = await expect_refused(resp, 400, "invalid_request_error", f"{path} {beta!r}")
            assert message.startswith("anthropic-beta: "), message
    for model_id in HOSTILE_IDS:
        path = f"/v1/models/{quote(model_id, safe='')}"
        resp = await api.client.get(path, headers=api.attacker)
        await expect_refused(resp, 404, "not_found_error", path)
        for param in ("before_id", "after_id"):
            resp = await api.client.get(
                "/v1/models", params={param: model_id}, headers=api.attacker
            )
            await expect_refused(resp, 404, "not_found_error", f"models {param}={model_id!r}")
    for limit in ("0", "1001", "ten", ""):
        resp = await api.client.get("/v1/models", params={"limit": limit}, headers=api.attacker)
        await expect_refused(resp, 400, "invalid_request_error", f"models limit={limit!r}")
    assert await api.snapshot() == before
    after = await api.upstream_calls()
    assert (after["messages"], after["count_tokens"]) == (calls["messages"], calls["count_tokens"])


async def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_credentials_that_are_not_utf8_are_refused_with_401(api: Api) -> None:
    before = await api.snapshot()
    port = api.client.server.port
    assert port is not None
    for path, header in [
        (b"/v1/messages/batches", b"x-api-key: sk-bgt-\xff\xfe"),
        (b"/v1/messages/batches", b"authorization: Bearer sk-bgt-\xff"),
        (b"/admin/tenants", b"authorization: Bearer \xff\xfe"),
        (b"/admin/tenants", b"authorization: Bearer admin-secret\xc3"),
    ]:
        status, body = await raw_http(
            port,
            b"GET "
            + path
            + b" HTTP/1.1\r\nHost: x\r\n"
            + header
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert status == 401, (path, header, body)
        payload = json.loads(body)
        assert payload["type"] == "error" and payload["error"]["type"] == "authentication_error"
    assert await api.snapshot() == before


# 4. the sync proxy: the same hostile bodies, refused before any upstream call -----------------


# count_tokens forwards a JSON object of known fields as it is: the upstream judges the values
UPSTREAM_JUDGES = {"model number", "messages empty", "role tool"}


async def test_sync_proxy_refuses_hostile_bodies(api: Api) -> None:
    before = await api.snapshot()
    forwarded = 0
    for name, body, fragment in HOSTILE_PARAMS:
        resp = await api.client.post("/v1/messages", data=body, headers=api.attacker)
        message = await expect_refused(resp, 400, "invalid_request_error", f"/v1/messages {name}")
        assert fragment in message, f"{name}: {message}"
        if name.startswith("max_tokens"):
            continue  # max_tokens is not a count_tokens field: refused as such below
        count_body = body.replace(b'"max_tokens": 16, ', b"")
        resp = await api.client.post(
            "/v1/messages/count_tokens", data=count_body, headers=api.attacker
        )
        await expect_refused(resp, 400, "invalid_request_error", f"count_tokens {name}")
        forwarded += name in UPSTREAM_JUDGES
    resp = await api.client.post(
        "/v1/messages/count_tokens", data=params_json().encode(), headers=api.attacker
    )
    message = await expect_refused(resp, 400, "invalid_request_error", "count_tokens extra field")
    assert "max_tokens" in message
    assert await api.snapshot() == before
    assert await api.upstream_calls() == {"messages": 0, "count_tokens": forwarded}


async def test_sync_proxy_passes_unknown_params_fields_through(api: Api) -> None:
    """Unknown fields of a Messages request are the upstream's to judge (the API grows):
    budgeter forwards them and answers whatever the upstream says, never a 5xx. The strict
    mock, as the real API, refuses a field it does not know: its verdict comes back."""
    body = params_json(future_option='{"nested": [1, 2, {"x": null}]}', metadata='{"user_id": "u"}')
    resp = await api.client.post("/v1/messages", data=body.encode(), headers=api.attacker)
    message = await expect_refused(resp, 400, "invalid_request_error", "future_option")
    assert message == "future_option: Extra inputs are not permitted"  # the upstream's words
    known = params_json(metadata='{"user_id": "u"}', temperature="0.5")
    resp = await api.client.post("/v1/messages", data=known.encode(), headers=api.attacker)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["type"] == "message"


# 2. fuzzed JSONL for `budgeter submit` --------------------------------------------------------

GOOD = json.dumps(request_line("good")).encode()


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)
INTS = st.lists(st.integers(), min_size=1, max_size=3)
DICTS = st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
# for each field of a request, values that are always wrong there
WRONG: dict[tuple[Any, ...], st.SearchStrategy[Any]] = {
    ("custom_id",): st.one_of(
        SCALARS,
        INTS,
        DICTS,
        st.sampled_from(["", " ", "bad id!", "a" * 65, "{t:victim}", "x}:queue", "\u00fc", "a\nb"]),
    ),
    ("params",): st.one_of(SCALARS, st.text(), INTS),
    ("params", "model"): st.one_of(SCALARS, st.just(""), INTS, DICTS),
    ("params", "max_tokens"): st.one_of(
        st.none(),
        st.booleans(),
        st.integers(max_value=0),
        st.integers(min_value=MAX_TOKENS_LIMIT + 1, max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
        INTS,
    ),
    ("params", "messages"): st.one_of(SCALARS, st.text(), INTS, DICTS, st.just([])),
    ("params", "messages", 0): st.one_of(SCALARS, st.text(), INTS, DICTS),
    ("params", "messages", 0, "role"): st.one_of(
        SCALARS, st.text().filter(lambda role: role not in ("user", "assistant", "system"))
    ),
    ("params", "messages", 0, "content"): st.one_of(SCALARS, INTS, DICTS),
}


def _mutant(where: tuple[Any, ...], wrong: Any) -> bytes:
    line: Any = request_line("mutant")
    node = line
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = wrong
    return json.dumps(line).encode()


def _bad_lines() -> st.SearchStrategy[bytes]:
    garbage = st.binary(min_size=1, max_size=80).filter(
        lambda b: b"\n" not in b and b"\r" not in b and bool(b.strip())
    )
    truncated = st.integers(min_value=1, max_value=len(GOOD) - 1).map(lambda n: GOOD[:n])
    invalid_utf8 = st.sampled_from(
        [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
    ).map(lambda bad: GOOD.replace(b'"hi"', b'"h' + bad + b'i"'))
    constants = st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "1e999", str(10**30), "9" * 5000]
    ).map(lambda c: GOOD.replace(b'"max_tokens": 16', b'"max_tokens": ' + c.encode()))
    deep = st.integers(min_value=MAX_JSON_DEPTH, max_value=5000).map(
        lambda d: GOOD.replace(b'"hi"', nested(d).encode())
    )
    not_objects = st.sampled_from([b"[]", b"null", b"1", b'"text"', b"true", b"[" + GOOD + b"]"])
    extra = st.sampled_from([b"tenant", b"batch_id", b"priority"]).map(
        lambda name: GOOD[:-1] + b', "' + name + b'": "victim"}'
    )
    surrogate = st.just(GOOD.replace(b'"hi"', b'"\\udc00"'))
    mutants = st.one_of(
        [st.builds(_mutant, st.just(where), wrong) for where, wrong in WRONG.items()]
    )
    return st.one_of(
        garbage, truncated, invalid_utf8, constants, deep, not_objects, extra, surrogate, mutants
    )


@st.composite
def hostile_files(draw: Callable[..., Any]) -> tuple[bytes, list[int]]:
    """A JSONL file of good lines and at least one bad one: (content, bad line numbers)."""
    good_count = draw(st.integers(min_value=0, max_value=3))
    lines = [(GOOD.replace(b'"good"', f'"good-{i}"'.encode()), False) for i in range(good_count)]
    for bad in draw(st.lists(_bad_lines(), min_size=1, max_size=3)):
        lines.insert(draw(st.integers(min_value=0, max_value=len(lines))), (bad, True))
    if good_count and draw(st.booleans()):  # a custom_id used twice: the later one is bad
        lines.insert(draw(st.integers(min_value=0, max_value=len(lines))), (lines[0][0], False))
    seen: set[bytes] = set()
    numbers = []
    for number, (line, bad) in enumerate(lines, start=1):
        if bad or line in seen:
            numbers.append(number)
        seen.add(line)
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    content = ending.join(line for line, _ in lines) + draw(st.sampled_from([b"", ending]))
    return content, numbers


@pytest.fixture
def cli_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sync_redis.Redis]:
    monkeypatch.setenv("BUDGETER_REDIS_URL", redis_url)
    client = sync_redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


def _dump_all(client: sync_redis.Redis) -> dict[bytes, bytes]:
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


def _one_line_errors(err: str) -> list[str]:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and all(line.startswith("budgeter: ") for line in lines), err
    return lines


def test_submit_fuzzed_jsonl_is_refused_whole(
    cli_env: sync_redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["tenants", "set", "victim", "--policy", "{}"]) == 0
    victim_file = tmp_path / "victim.jsonl"
    victim_file.write_bytes(
        b"\n".join(GOOD.replace(b'"good"', f'"v{i}"'.encode()) for i in range(3))
    )
    assert cli_main(["submit", "--tenant", "victim", str(victim_file)]) == 0
    assert cli_main(["tenants", "set", "attacker", "--policy", "{}"]) == 0
    capsys.readouterr()
    before = _dump_all(cli_env)
    path = tmp_path / "hostile.jsonl"

    @_fuzz_settings(60)
    @given(hostile=hostile_files())
    def submit(hostile: tuple[bytes, list[int]]) -> None:
        content, bad_numbers = hostile
        path.write_bytes(content)
        assert cli_main(["submit", "--tenant", "attacker", str(path)]) == 1
        lines = _one_line_errors(capsys.readouterr().err)
        assert (
            lines[-1] == f"budgeter: error: {len(bad_numbers)} bad line(s); nothing was submitted"
        )
        reported = [
            int(line.removeprefix(f"budgeter: {path}:").split(":")[0]) for line in lines[:-1]
        ]
        assert reported == bad_numbers
        assert _dump_all(cli_env) == before

    submit()


@pytest.mark.parametrize(
    ("content", "argv_extra", "fragment"),
    [
        (b"", [], "no requests in file"),
        (b"\n \r\n\t\n", [], "no requests in file"),
        (GOOD, ["--tenant", "Victim"], "invalid tenant id"),
        (GOOD, ["--tenant", "{t:victim}"], "invalid tenant id"),
        (GOOD, ["--tenant", "victim\n"], "invalid tenant id"),
        (GOOD, ["--tenant", "attacker", "--batch-id", "{t:victim}"], "--batch-id"),
        (GOOD, ["--tenant", "attacker", "--batch-id", "x" * 65], "--batch-id"),
        (GOOD, ["--tenant", "ghost"], "has no policy"),
    ],
)
def test_submit_bad_files_and_arguments_are_one_line(
    cli_env: sync_redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    argv_extra: list[str],
    fragment: str,
) -> None:
    assert cli_main(["tenants", "set", "attacker", "--policy", "{}"]) == 0
    capsys.readouterr()
    before = _dump_all(cli_env)
    path = tmp_path / "b.jsonl"
    path.write_bytes(content)
    argv = ["submit", *(argv_extra or ["--tenant", "attacker"]), str(path)]
    assert cli_main(argv) == 2
    lines = _one_line_errors(capsys.readouterr().err)
    assert len(lines) == 1 and fragment in lines[0], lines
    assert _dump_all(cli_env) == before
    assert cli_main(["submit", "--tenant", "attacker", str(tmp_path)]) == 2  # a directory
    assert "cannot read" in _one_line_errors(capsys.readouterr().err)[0]


@pytest.mark.parametrize(
    "policy",
    ['{"weight": Infinity}', '{"weight": 1e999}', '{"weight": NaN}', "{\udcff}", "[]"],
)
def test_tenants_set_refuses_non_json_policies(
    cli_env: sync_redis.Redis, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    assert cli_main(["tenants", "set", "acme", "--policy", policy]) == 2
    lines = _one_line_errors(capsys.readouterr().err)
    assert len(lines) == 1 and "invalid policy" in lines[0], lines
    assert cli_env.dbsize() == 0
