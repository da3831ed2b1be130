"""A stream whose request was sent but which got no answer before the timeout may have
been generated and billed: it is charged in full, as a non-streamed call is (before, a
stream that failed before its first byte was always released)."""

from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from tests.api.test_proxy import ask
from tests.api.test_proxy_charges import COUNTED, scripted_proxy, wait_settled


async def test_a_stream_timed_out_after_it_was_sent_is_charged_in_full(
    redis: Redis, redis_url: str
) -> None:
    async with scripted_proxy(redis, redis_url, timeout_s=0.3) as scripted:
        key = await scripted.tenant("late", {"budgets": {"day": 100_000}})
        scripted.script.mode = "hang"
        body = {**ask(), "stream": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{scripted.url}/v1/messages", json=body, headers={"x-api-key": key}) as resp,
        ):
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "timeout_error"
        state = await wait_settled(redis, "late")
        assert (int(state["day:used"]), state["day:reserved"]) == (COUNTED + 64, "0")
        assert scripted.script.calls == 1  # never sent twice
