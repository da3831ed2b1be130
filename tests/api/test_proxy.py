"""The synchronous proxy with the official anthropic SDK (2.x in-process, 1.x in a
subprocess) against a real Redis and the real mock upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.api.app import create_app
from budgeter.api.proxy import PROXY
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.mock import create_app as create_mock

SDK1_PATH = Path(
    os.environ.get("SDK1_PATH", Path(__file__).resolve().parents[2] / ".venv" / "sdk1")
)
ADMIN = {"authorization": "Bearer admin-secret"}
UPSTREAM_KEY = "upstream-secret-key"


@dataclass
class Proxy:
    url: str
    upstream_url: str
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    clients: list[anthropic.AsyncAnthropic] = field(default_factory=list)
    app: web.Application | None = None

    async def settled(self) -> None:
        """Wait for the settles of the answers sent (each runs right after its answer)."""
        assert self.app is not None
        await self.app[PROXY].settles.drain()

    async def tenant(self, name: str, policy: dict[str, Any]) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{self.url}/admin/tenants/{name}", json=policy, headers=ADMIN):
                pass
            async with http.post(f"{self.url}/admin/tenants/{name}/keys", headers=ADMIN) as r:
                return str((await r.json())["key"])

    def client(self, key: str | None, **kwargs: Any) -> anthropic.AsyncAnthropic:
        options = {"max_retries": 0, **kwargs}
        made = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, **options)
        self.clients.append(made)
        return made

    async def mock_stats(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.upstream_url}/mock/stats") as r,
        ):
            return dict(await r.json())


@pytest.fixture
async def proxy(redis: Redis, redis_url: str) -> AsyncIterator[Proxy]:
    seen: list[dict[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            seen.append({k.lower(): v for k, v in request.headers.items()})
        return await handler(request)

    mock = create_mock(MockConfig(api_key=UPSTREAM_KEY, latency_ms=50))
    mock.middlewares.append(record)
    async with serve_app(mock, "127.0.0.1", 0) as mock_port:
        upstream_url = f"http://127.0.0.1:{mock_port}"
        settings = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",  # type: ignore[arg-type]
            upstream_url=upstream_url,
            upstream_api_key=UPSTREAM_KEY,  # type: ignore[arg-type]
        )
        app = create_app(settings, redis=redis)
        async with serve_app(app, "127.0.0.1", 0) as port:
            found = Proxy(f"http://127.0.0.1:{port}", upstream_url, seen, app=app)
            try:
                yield found
            finally:
                for made in found.clients:
                    await made.close()


def ask(n: int = 0, max_tokens: int = 64) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Explain budgets, take {n}."}],
    }


async def budget(redis: Redis, tenant: str) -> dict[str, str]:
    return dict(await redis.hgetall(f"budgeter:{{t:{tenant}}}:budget"))


async def test_create_settles_the_reported_usage_and_sends_rate_limit_headers(
    proxy: Proxy, redis: Redis
) -> None:
    key = await proxy.tenant("px", {"budgets": {"day": 100_000}, "rate": {"rpm": 50, "otpm": 9000}})
    client = proxy.client(key)
    raw = await client.messages.with_raw_response.create(**ask())
    message = await raw.parse()
    assert message.type == "message" and message.content[0].type == "text"
    h = raw.headers
    assert h["anthropic-ratelimit-requests-limit"] == "50"
    assert h["anthropic-ratelimit-requests-remaining"] == "49"
    assert h["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert h["anthropic-ratelimit-output-tokens-limit"] == "9000"
    assert h["anthropic-ratelimit-tokens-limit"] == "9000"
    assert h["request-id"].startswith("req_")
    used = message.usage.input_tokens + message.usage.output_tokens
    await proxy.settled()  # right after the answer
    state = await budget(redis, "px")
    assert (int(state["day:used"]), state["day:reserved"]) == (used, "0")
    stats = await proxy.mock_stats()
    assert (stats["input_tokens"], stats["output_tokens"]) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    # towards the upstream: the upstream key, version 2023-06-01, never the tenant key
    assert proxy.seen_headers
    for headers in proxy.seen_headers:
        assert headers["x-api-key"] == UPSTREAM_KEY
        assert headers["anthropic-version"] == "2023-06-01"
        assert "authorization" not in headers
        assert key not in json.dumps(headers)


async def test_stream_to_the_final_message_settles_at_message_stop(
    proxy: Proxy, redis: Redis
) -> None:
    key = await proxy.tenant("st", {"budgets": {"day": 100_000}})
    client = proxy.client(None, auth_token=key)  # Authorization: Bearer
    async with client.messages.stream(**ask(1)) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == final.content[0].text  # type: ignore[union-attr]
    state = await budget(redis, "st")
    assert int(state["day:used"]) == final.usage.input_tokens + final.usage.output_tokens
    assert state["day:reserved"] == "0"
    assert await redis.hlen("budgeter:{t:st}:resv") == 0


async def test_count_tokens_matches_the_upstream(proxy: Proxy) -> None:
    key = await proxy.tenant("ct", {})
    counted = await proxy.client(key).messages.count_tokens(
        model="claude-sonnet-4-6", messages=ask()["messages"]
    )
    message = await proxy.client(key).messages.create(**ask())
    assert counted.input_tokens == message.usage.input_tokens


async def test_spent_window_answers_rate_limit_error_with_usable_retry_after(proxy: Proxy) -> None:
    key = await proxy.tenant("rl", {"rate": {"rpm": 2}})
    client = proxy.client(key)
    await client.messages.create(**ask())
    await client.messages.create(**ask())
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(**ask())
    response = info.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_exhausted_budget_is_final_and_not_retried_by_the_sdk(proxy: Proxy) -> None:
    key = await proxy.tenant("bx", {"budgets": {"day": 300}})
    await proxy.client(key).messages.create(**ask(max_tokens=200))
    before = (await proxy.mock_stats())["requests"]["messages"]
    retrying = proxy.client(key, max_retries=3)
    with pytest.raises(anthropic.RateLimitError) as info:
        await retrying.messages.create(**ask(max_tokens=200))
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.body["error"]["type"] == "budget_exhausted_error"  # type: ignore[index]
    assert "day token budget exhausted" in info.value.message
    assert (await proxy.mock_stats())["requests"]["messages"] == before


async def test_defer_waits_up_to_max_wait_for_in_flight_work(proxy: Proxy, redis: Redis) -> None:
    from budgeter.admission.admission import Admission, Usage

    admission = Admission(redis)
    # without max_wait: a call that only waits for in-flight work gets 429 at once
    impatient = await proxy.tenant("mw0", {"max_concurrency": 1})
    assert (await admission.reserve("mw0", "held", 10, 10)).kind == "ADMIT"
    with pytest.raises(anthropic.RateLimitError) as info:
        await proxy.client(impatient).messages.create(**ask(1))
    assert info.value.response.headers["retry-after"] == "1"
    # with max_wait: the call waits, and goes through once the in-flight work settles
    patient = await proxy.tenant("mw", {"max_concurrency": 1, "max_wait_seconds": 30})
    assert (await admission.reserve("mw", "held", 10, 10)).kind == "ADMIT"
    call = asyncio.create_task(proxy.client(patient).messages.create(**ask(2)))
    await asyncio.sleep(0.3)
    assert not call.done()
    await admission.settle("mw", "held", Usage(10, 5))
    assert (await asyncio.wait_for(call, 30)).type == "message"


async def test_client_leaving_mid_stream_is_charged_what_was_generated(
    proxy: Proxy, redis: Redis
) -> None:
    key = await proxy.tenant("gone", {"budgets": {"day": 100_000}})
    body = {**ask(3, max_tokens=200), "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": key}) as resp,
    ):
        assert resp.status == 200
        await resp.content.readline()  # event: message_start
    async with asyncio.timeout(30):
        while await redis.hlen("budgeter:{t:gone}:resv"):  # noqa: ASYNC110 - a bounded poll (inside a timeout) of state another task or process changes
            await asyncio.sleep(0.05)
    state = await budget(redis, "gone")
    assert int(state["day:used"]) > 0 and state["day:reserved"] == "0"


async def test_upstream_errors_reach_the_caller_in_anthropic_shape(
    proxy: Proxy, redis: Redis
) -> None:
    key = await proxy.tenant("ue", {"budgets": {"day": 100_000}})
    client = proxy.client(key)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(**ask(), system=5)  # type: ignore[arg-type]
    assert info.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="m", max_tokens=0, messages=[])
    state = await budget(redis, "ue")
    assert state.get("day:reserved", "0") == "0"


SDK1_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import anthropic
    assert anthropic.__version__.startswith("1."), anthropic.__version__
    base, key = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    ask = {"model": "claude-sonnet-4-6", "max_tokens": 32,
           "messages": [{"role": "user", "content": "hello from sdk 1"}]}
    message = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    counted = client.messages.count_tokens(model=ask["model"], messages=ask["messages"])
    try:
        client.messages.create(**ask)
        limited = None
    except anthropic.RateLimitError as exc:
        limited = exc.response.headers.get("retry-after")
    print(json.dumps({"version": anthropic.__version__, "text": message.content[0].text,
                      "stream_usage": final.usage.output_tokens, "counted": counted.input_tokens,
                      "input": message.usage.input_tokens, "retry_after": limited}))
    """
)


async def test_sdk1_create_stream_count_and_rate_limit(proxy: Proxy, tmp_path: Path) -> None:
    assert (SDK1_PATH / "anthropic").is_dir(), f"anthropic 1.x missing at {SDK1_PATH}"
    key = await proxy.tenant("v1", {"rate": {"rpm": 2}})
    script = tmp_path / "sdk1_proxy.py"
    script.write_text(SDK1_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        proxy.url,
        key,
        env={**os.environ, "PYTHONPATH": str(SDK1_PATH)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["version"].startswith("1.") and result["text"]
    assert result["counted"] == result["input"] and result["stream_usage"] >= 1
    assert 1 <= int(result["retry_after"]) <= 60
