"""A budgeter API in front of the real (strict) mock upstream, both on loopback, with the
mock's recorder to read what reached the upstream, and a ``request-id`` on every answer of
the mock (as the real API sends)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
from aiohttp import web
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.mock import create_app as create_mock
from budgeter.upstream.mock_record import RECORDER_KEY, Received

ADMIN = {"authorization": "Bearer admin-secret"}
UPSTREAM_KEY = "upstream-secret-key"


@dataclass
class Stack:
    url: str
    upstream_url: str
    mock: web.Application
    clients: list[anthropic.AsyncAnthropic] = field(default_factory=list)

    async def tenant(self, name: str, policy: dict[str, Any] | None = None) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.put(
                f"{self.url}/admin/tenants/{name}", json=policy or {}, headers=ADMIN
            ) as r:
                assert r.status in (200, 201), await r.text()
            async with http.post(f"{self.url}/admin/tenants/{name}/keys", headers=ADMIN) as r:
                return str((await r.json())["key"])

    def client(self, key: str) -> anthropic.AsyncAnthropic:
        made = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0)
        self.clients.append(made)
        return made

    def received(self, path: str | None = None) -> list[Received]:
        """What the upstream received (under /v1/), oldest first."""
        return [r for r in self.mock[RECORDER_KEY].records if path is None or r.path == path]

    def forget(self) -> None:
        self.mock[RECORDER_KEY].records.clear()


def upstream_ids(app: web.Application) -> None:
    """The mock answers every request with a ``request-id`` (req_up_1, req_up_2, ...)."""
    counter = itertools.count(1)

    async def add(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["request-id"] = f"req_up_{next(counter)}"

    app.on_response_prepare.append(add)


@asynccontextmanager
async def passthrough_stack(
    redis: Redis, redis_url: str, *, mock: web.Application | None = None, **settings: Any
) -> AsyncIterator[Stack]:
    upstream = mock if mock is not None else create_mock(MockConfig(api_key=UPSTREAM_KEY))
    upstream_ids(upstream)
    async with serve_app(upstream, "127.0.0.1", 0) as mock_port:
        upstream_url = f"http://127.0.0.1:{mock_port}"
        config = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",
            upstream_url=upstream_url,
            upstream_api_key=UPSTREAM_KEY,
            **settings,
        )
        async with serve_app(create_app(config, redis=redis), "127.0.0.1", 0) as port:
            stack = Stack(f"http://127.0.0.1:{port}", upstream_url, upstream)
            try:
                yield stack
            finally:
                for made in stack.clients:
                    await made.close()
