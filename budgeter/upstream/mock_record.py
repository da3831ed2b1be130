"""What the mock upstream received: the last requests under ``/v1/``, for tests to assert on.

Each record holds the method, path, query, headers (credentials replaced by a fingerprint:
``sha256:`` and the first 12 hex digits of the SHA-256 of the value, so a test can tell
which key arrived without the mock ever returning one), the betas, the JSON body and the
status answered. ``GET /mock/requests`` returns them oldest first (``?path=/v1/messages``
keeps one route); ``DELETE /mock/requests`` forgets them. In process:
``app[RECORDER_KEY].records``.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from budgeter.upstream.mock_validation import parse_betas

DEFAULT_LIMIT = 256
_SECRET_HEADERS = frozenset({"x-api-key", "authorization"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fingerprint(secret: str) -> str:
    """How a recorded credential is shown: ``sha256:`` + 12 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def _shown(name: str, value: str) -> str:
    if name not in _SECRET_HEADERS:
        return value
    scheme, _, token = value.partition(" ")
    if name == "authorization" and token:
        return f"{scheme} {fingerprint(token.strip())}"
    return fingerprint(value)


@dataclass
class Received:
    seq: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    betas: list[str]
    raw_body: bytes
    status: int | None = None

    def as_json(self) -> dict[str, object]:
        try:
            body: object = json.loads(self.raw_body) if self.raw_body else None
        except ValueError:
            body = self.raw_body.decode("utf-8", "replace")
        return {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "betas": self.betas,
            "body": body,
            "status": self.status,
        }


@dataclass
class Recorder:
    limit: int = DEFAULT_LIMIT
    records: deque[Received] = field(default_factory=deque)
    seq: int = 0

    async def record(self, request: web.Request) -> Received:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            name = name.lower()
            shown = _shown(name, value)
            headers[name] = f"{headers[name]}, {shown}" if name in headers else shown
        self.seq += 1
        entry = Received(
            seq=self.seq,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            betas=parse_betas(request.headers.getall("anthropic-beta", [])),
            raw_body=await request.read() if request.can_read_body else b"",
        )
        self.records.append(entry)
        while len(self.records) > self.limit:
            self.records.popleft()
        return entry


RECORDER_KEY = web.AppKey("mock_recorder", Recorder)


@web.middleware
async def record_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    entry = await request.app[RECORDER_KEY].record(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        entry.status = exc.status
        raise
    entry.status = response.status
    return response


async def _handle_list(request: web.Request) -> web.Response:
    path = request.query.get("path")
    records = request.app[RECORDER_KEY].records
    return web.json_response(
        {"requests": [r.as_json() for r in records if path is None or r.path == path]}
    )


async def _handle_clear(request: web.Request) -> web.Response:
    request.app[RECORDER_KEY].records.clear()
    return web.json_response({"cleared": True})


def install_recorder(app: web.Application, limit: int = DEFAULT_LIMIT) -> Recorder:
    """Record every ``/v1/`` request ``app`` receives and serve ``/mock/requests``."""
    recorder = Recorder(limit=limit)
    app[RECORDER_KEY] = recorder
    app.middlewares.append(record_middleware)
    app.router.add_get("/mock/requests", _handle_list)
    app.router.add_delete("/mock/requests", _handle_clear)
    return recorder
