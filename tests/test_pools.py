"""Connection pools sized for high concurrency: callers wait for a free Redis connection
instead of failing, and the upstream session allows the configured calls in flight."""

from __future__ import annotations

import asyncio

from budgeter.redis_client import make_redis
from budgeter.serving import upstream_session
from budgeter.settings import Settings


async def test_more_concurrent_commands_than_connections_wait_instead_of_failing(
    redis_url: str,
) -> None:
    client = make_redis(redis_url, max_connections=4)
    try:
        # each BLPOP holds its connection for 50 ms: 40 of them need to queue for 4
        replies = await asyncio.gather(
            *(client.blpop([f"pool-test-{i}"], timeout=0.05) for i in range(40))
        )
        assert replies == [None] * 40
        pool = client.connection_pool
        assert pool.max_connections == 4
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
    finally:
        await client.aclose()


async def test_the_upstream_session_allows_the_configured_calls_in_flight() -> None:
    settings = Settings(upstream_max_connections=2500)
    async with upstream_session(settings) as session:
        assert session.connector is not None
        assert session.connector.limit == 2500
        assert session.connector.limit_per_host == 2500
