"""The proxy answers before it settles (issue 20): the client has its answer while the
reservation is still held; the settle runs right after, and the API's shutdown waits for
it; a process that dies between the answer and the settle leaves the reservation to the
reaper, which charges it in full. Real redis-server, the real mock upstream, the API app
in-process on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.admission.admission import SettleResult, Usage
from budgeter.api.app import create_app
from budgeter.api.proxy import PROXY, ProxyDeps
from budgeter.api.settles import PendingSettles
from budgeter.metrics import Metrics
from budgeter.serving import serve_app
from budgeter.settings import Settings
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.mock import MockConfig
from budgeter.upstream.mock import create_app as create_mock
from budgeter.upstream.token_counter import TokenCounter
from budgeter.worker.worker import Worker, WorkerConfig
from tests.api.test_proxy import ADMIN, UPSTREAM_KEY, ask, budget

MAX_TOKENS = 64


@dataclass
class Api:
    url: str
    upstream_url: str
    app: web.Application
    stack: AsyncExitStack
    shutting_down: asyncio.Event  # set by the app's on_shutdown

    @property
    def deps(self) -> ProxyDeps:
        return self.app[PROXY]

    async def mock_stats(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.upstream_url}/mock/stats") as r,
        ):
            return dict(await r.json())

    async def tenant(self, name: str) -> str:
        async with aiohttp.ClientSession() as http:
            policy = {"budgets": {"day": 100_000}, "rate": {"rpm": 50}}
            async with http.put(f"{self.url}/admin/tenants/{name}", json=policy, headers=ADMIN):
                pass
            async with http.post(f"{self.url}/admin/tenants/{name}/keys", headers=ADMIN) as r:
                return str((await r.json())["key"])


@pytest.fixture
async def api(redis: Redis, redis_url: str) -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        mock = create_mock(MockConfig(api_key=UPSTREAM_KEY))
        mock_port = await stack.enter_async_context(serve_app(mock, "127.0.0.1", 0))
        settings = Settings(
            redis_url=redis_url,
            admin_token="admin-secret",
            upstream_url=f"http://127.0.0.1:{mock_port}",
            upstream_api_key=UPSTREAM_KEY,
        )
        app = create_app(settings, redis=redis)
        shutting_down = asyncio.Event()

        async def on_shutdown(_app: web.Application) -> None:
            shutting_down.set()

        app.on_shutdown.append(on_shutdown)
        port = await stack.enter_async_context(serve_app(app, "127.0.0.1", 0))
        url = f"http://127.0.0.1:{port}"
        yield Api(url, f"http://127.0.0.1:{mock_port}", app, stack, shutting_down)


class GatedSettle:
    """Stands in for ``Admission.settle``: reached (an event), then held until opened."""

    def __init__(self, deps: ProxyDeps) -> None:
        self.real = deps.admission.settle
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, tenant: str, rid: str, usage: Usage) -> SettleResult:
        self.reached.set()
        await self.gate.wait()
        return await self.real(tenant, rid, usage)


class DiesAfterAnswering(PendingSettles):
    """The process dies right after each answer: the settle never runs."""

    def start(self, settle: Coroutine[Any, Any, None], *, reservation: str) -> None:  # noqa: ARG002 - the interface's
        settle.close()


async def post(url: str, key: str, n: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/messages", json=ask(n, MAX_TOKENS), headers={"x-api-key": key}
        ) as resp,
    ):
        return resp.status, dict(await resp.json()), dict(resp.headers)


async def test_the_client_has_its_answer_before_the_settle_runs(
    api: Api, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await api.tenant("early")
    gated = GatedSettle(api.deps)
    monkeypatch.setattr(api.deps.admission, "settle", gated)
    status, message, headers = await post(api.url, key, 1)
    # answered, with the rate-limit headers of the decision and the request id
    assert status == 200 and message["type"] == "message"
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert headers["request-id"].startswith("req_")
    await gated.reached.wait()  # the settle started after the answer, and is held
    state = await budget(redis, "early")
    reserved = message["usage"]["input_tokens"] + MAX_TOKENS
    assert (int(state.get("day:used", 0)), int(state["day:reserved"])) == (0, reserved)
    # a second call is answered too while the first settle is still held
    status, second, _ = await post(api.url, key, 2)
    assert status == 200 and len(api.deps.settles) == 2
    gated.gate.set()
    await api.deps.settles.drain()
    used = sum(m["usage"]["input_tokens"] + m["usage"]["output_tokens"] for m in (message, second))
    state = await budget(redis, "early")
    assert (int(state["day:used"]), state["day:reserved"]) == (used, "0")
    assert await redis.hlen("budgeter:{t:early}:resv") == 0


async def test_the_shutdown_waits_for_the_settles_of_answers_sent(
    api: Api, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await api.tenant("stopping")
    gated = GatedSettle(api.deps)
    monkeypatch.setattr(api.deps.admission, "settle", gated)
    settles = api.deps.settles
    draining = asyncio.Event()
    real_drain = settles.drain

    async def drain() -> None:
        draining.set()
        await real_drain()

    monkeypatch.setattr(settles, "drain", drain)
    status, message, _ = await post(api.url, key, 3)
    assert status == 200
    await gated.reached.wait()
    stopping = asyncio.ensure_future(api.stack.aclose())  # the API (and the mock) stop
    async with asyncio.timeout(30):
        await draining.wait()  # the shutdown waits for the held settle: Redis still open
    assert api.shutting_down.is_set() and not stopping.done() and len(settles) == 1
    gated.gate.set()
    await stopping
    assert len(settles) == 0
    state = await budget(redis, "stopping")
    used = message["usage"]["input_tokens"] + message["usage"]["output_tokens"]
    assert (int(state["day:used"]), state["day:reserved"]) == (used, "0")


async def test_a_process_dead_after_answering_leaves_the_reservation_to_the_reaper(
    api: Api, redis: Redis
) -> None:
    key = await api.tenant("dead")
    api.deps.settles = DiesAfterAnswering()
    status, message, _ = await post(api.url, key, 4)
    assert status == 200 and message["usage"]["output_tokens"] > 0
    reserved = message["usage"]["input_tokens"] + MAX_TOKENS
    state = await budget(redis, "dead")
    assert (int(state.get("day:used", 0)), int(state["day:reserved"])) == (0, reserved)
    [rid] = await redis.hkeys("budgeter:{t:dead}:resv")  # held, by its sync: id
    deadline = await redis.zscore("budgeter:{t:dead}:resv_deadline", rid)
    assert deadline is not None
    # the reaper: a worker's maintenance round, on an injected clock
    async with aiohttp.ClientSession() as session:
        upstream = UpstreamClient(session, api.upstream_url, UPSTREAM_KEY)
        metrics = Metrics()
        worker = Worker(
            redis=redis,
            upstream=upstream,
            config=WorkerConfig(),
            metrics=metrics,
            counter=TokenCounter(redis, upstream, ttl_s=0),
        )
        await worker.maintain(now_ms=int(deadline) - 1)
        assert await redis.hlen("budgeter:{t:dead}:resv") == 1  # the process might settle
        await worker.maintain(now_ms=int(deadline) + 1)
    reaped = metrics.registry.get_sample_value(
        "budgeter_reaped_reservations_total", {"tenant": "dead", "action": "charged"}
    )
    assert reaped == 1
    # the upstream may have served it (it did): charged in full, input + max_tokens
    state = await budget(redis, "dead")
    assert (int(state["day:used"]), state["day:reserved"]) == (reserved, "0")
    assert await redis.hlen("budgeter:{t:dead}:resv") == 0
    assert str(rid).startswith("sync:")


async def test_a_client_gone_before_the_answer_is_still_settled_at_its_usage(
    api: Api, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = await api.tenant("left")
    prepare = web.Response.prepare
    failed: list[bool] = []

    async def gone(response: web.Response, request: web.Request) -> Any:
        if request.app is api.app and request.path == "/v1/messages" and not failed:
            # the answer's first write finds the client's connection closed
            failed.append(True)
            raise ConnectionResetError("Cannot write to closing transport")
        return await prepare(response, request)

    monkeypatch.setattr(web.Response, "prepare", gone)
    with caplog.at_level(logging.INFO):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{api.url}/v1/messages", json=ask(5), headers={"x-api-key": key}) as r,
        ):
            assert r.status == 499 and failed  # (the connection lives on here: 499 seen)
        await api.deps.settles.drain()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    left = [r for r in caplog.records if r.getMessage() == "client left before the answer"]
    assert len(left) == 1 and left[0].levelno == logging.INFO
    assert left[0].__dict__["tenant"] == "left"
    assert str(left[0].__dict__["reservation"]).startswith("sync:req_")
    state = await budget(redis, "left")
    stats = await api.mock_stats()
    served = stats["input_tokens"] + stats["output_tokens"]
    assert (int(state["day:used"]), state["day:reserved"]) == (served, "0")  # not in full


# PendingSettles on its own ---------------------------------------------------------------


async def test_drain_waits_for_settles_started_meanwhile() -> None:
    settles = PendingSettles()
    done: list[str] = []
    gate = asyncio.Event()

    async def second() -> None:
        done.append("second")

    async def first() -> None:
        await gate.wait()
        settles.start(second(), reservation="r2")  # started while the drain waits
        done.append("first")

    settles.start(first(), reservation="r1")
    assert len(settles) == 1
    draining = asyncio.ensure_future(settles.drain())
    gate.set()
    await draining
    assert done == ["first", "second"] and len(settles) == 0


async def test_a_failed_settle_is_logged_by_its_type_only(caplog: pytest.LogCaptureFixture) -> None:
    settles = PendingSettles()

    async def broken() -> None:
        raise ConnectionError("redis://user:secret@host")

    with caplog.at_level(logging.WARNING, logger="budgeter.proxy"):
        settles.start(broken(), reservation="sync:req_1")
        await settles.drain()
    [record] = caplog.records
    assert "ConnectionError" in record.getMessage() and "secret" not in record.getMessage()
    assert getattr(record, "reservation", None) == "sync:req_1"
    assert len(settles) == 0
