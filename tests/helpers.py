"""Shared test helpers: a mock upstream served on loopback, waiting for batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from budgeter.domain.messages import BatchRequest
from budgeter.queue.batches import BatchStore
from budgeter.serving import serve_app
from budgeter.upstream.mock import MockConfig, create_app


@asynccontextmanager
async def mock_upstream(
    config: MockConfig | None = None,
) -> AsyncIterator[tuple[str, web.Application]]:
    app = create_app(config or MockConfig())
    async with serve_app(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}", app


def requests_for(
    prefix: str, count: int, *, max_tokens: int = 64, model: str = "claude-test"
) -> list[BatchRequest]:
    return [
        BatchRequest.model_validate(
            {
                "custom_id": f"{prefix}-{i}",
                "params": {
                    "model": model,
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"question {i} from {prefix}"}],
                },
            }
        )
        for i in range(count)
    ]


async def wait_ended(store: BatchStore, batch_ids: list[str], *, timeout_s: float = 60) -> None:
    """Wait (bounded) until every batch has ended; the timeout only guards a hang."""
    async with asyncio.timeout(timeout_s):
        while True:
            statuses = [await store.status(b) for b in batch_ids]
            if all(s.ended for s in statuses):
                return
            await asyncio.sleep(0.05)


async def wait_http(url: str, timeout_s: float = 30) -> None:
    """Wait (bounded) until ``url`` answers 200: a process started by a test is serving."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
