"""Issue 19 item 6: network partitions between real processes and Redis, made by
:class:`tests.tcp_relay.TcpRelay` (in this test's event loop) between a process and a real
redis-server on loopback.

- A worker cut off from Redis longer than its lease while its upstream call is in flight
  (``budgeter mock-upstream`` answers after a delay): the job is reclaimed and served by a
  second worker; once the partition heals the stale worker stores no second result, its
  reservation was charged in full by the reaper (the upstream served the request twice:
  charged twice, never zero) and the batch counts are exact.
- The API cut off from Redis answers 503 ``overloaded_error`` with ``retry-after``, and
  answers 200 again once Redis is reachable: behind a partition that resets connections,
  and behind a silent one that holds the bytes (within ``BUDGETER_API_REDIS_DEADLINE_SECONDS``
  instead of the client's 60 s socket timeout and its retries); ``/v1/messages`` then
  answers 503 before it calls the upstream.
Nothing waits on speed: conditions are polled under generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.client import make_redis
from budgeter.store.embedded import EmbeddedRedis
from budgeter.store.keys import TenantKeys
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.store import TenantStore
from tests.helpers import listen_args, read_port, requests_for
from tests.tcp_relay import TcpRelay

MAX_TOKENS = 256
ADMIN_TOKEN = "partition-admin-token"


async def _spawn(
    logs: Path, name: str, env: dict[str, str], *args: str
) -> tuple[asyncio.subprocess.Process, int]:
    port_file = logs / f"{name}.port"
    with (logs / f"{name}.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "budgeter",
            *args,
            *listen_args(port_file),
            env=env,
            stdout=log,
            stderr=log,
        )
    return proc, await read_port(port_file, proc)


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


async def _json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _until(check: Any, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - a bounded poll of state other processes change
            await asyncio.sleep(0.05)


def _env(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "BUDGETER_REDIS_URL": url,
        "BUDGETER_LEASE_SECONDS": "2",
        "BUDGETER_RESERVATION_GRACE_SECONDS": "1",
        "BUDGETER_MAINTENANCE_SECONDS": "0.3",
        "BUDGETER_DRAIN_SECONDS": "30",
        "BUDGETER_LOG_LEVEL": "ERROR",
        "BUDGETER_ADMIN_TOKEN": ADMIN_TOKEN,
    }


@pytest.mark.timeout(300)
async def test_a_worker_cut_off_past_its_lease_serves_nothing_twice_and_is_charged(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    await asyncio.to_thread(server.start)
    logs = tmp_path / "logs"
    logs.mkdir()
    redis: Any = make_redis(server.url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with TcpRelay("127.0.0.1", int(server.port or 0)) as relay:
            mock_proc, mock_port = await _spawn(logs, "mock", _env(server.url), "mock-upstream")
            procs.append(mock_proc)
            mock = f"http://127.0.0.1:{mock_port}"
            async with aiohttp.ClientSession() as http:
                # long enough for the partition to outlast the lease while the call runs
                async with http.post(f"{mock}/mock/config", json={"latency_ms": 4000}) as resp:
                    assert resp.status == 200
                await TenantStore(redis).put("acme", TenantPolicy(budgets={"total": 10**6}))
                store = BatchStore(redis)
                batch_id = await store.create("acme", requests_for("p", 1, max_tokens=MAX_TOKENS))
                stale_env = {**_env(relay.url), "BUDGETER_UPSTREAM_URL": mock}
                stale, _ = await _spawn(logs, "stale", stale_env, "worker", "--concurrency", "1")
                procs.append(stale)

                async def in_flight() -> bool:
                    stats = await _json(http, f"{mock}/mock/stats")
                    return bool(stats["requests"]["messages"] == 1)

                await _until(in_flight)
                await relay.pause()  # the stale worker's upstream call runs on
                keys = TenantKeys.of("budgeter", "acme")
                healthy_env = {**_env(server.url), "BUDGETER_UPSTREAM_URL": mock}
                healthy, _ = await _spawn(
                    logs, "healthy", healthy_env, "worker", "--concurrency", "1"
                )
                procs.append(healthy)

                async def served_again() -> bool:
                    status = await store.status(batch_id)
                    return status.succeeded == 1 and await redis.hlen(keys.resv) == 0

                await _until(served_again, timeout_s=120)  # reclaimed, served, reaped
                stats = await _json(http, f"{mock}/mock/stats")
                assert stats["messages_served"] == 2, stats  # the stale call ended too
                assert stale.returncode is None
                await relay.resume()  # healed: the stale worker's settle and ack go on
                assert await _stop(stale) == 0  # it drains what it held, then exits
                assert await _stop(healthy) == 0

            status = await store.status(batch_id)
            assert (status.total, status.succeeded, status.processing) == (1, 1, 0)
            assert status.errored == status.canceled == status.expired == 0
            lines = [line async for line in store.results(batch_id)]
            assert [line["custom_id"] for line in lines] == ["p-0"]  # no second result
            assert await redis.hget(keys.jstate, f"{batch_id}:p-0") in (None, "succeeded")
            assert await redis.zcard(keys.leases) == 0 and await redis.llen(keys.queue) == 0
            assert await redis.hlen(keys.resv) == await redis.hlen(keys.resv_sent) == 0
            budget = await redis.hgetall(keys.budget)
            used = int(budget["total:used"])
            one_input = stats["input_tokens"] // 2
            one_call = (stats["input_tokens"] + stats["output_tokens"]) // 2
            # the reaper charged the stale reservation in full (input + max_tokens), the
            # healthy worker's settle its actual: twice, never zero, and not three times
            assert used == one_input + MAX_TOKENS + one_call, (used, stats)
    finally:
        for proc in procs:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await _stop(proc)
        await redis.aclose()
        await asyncio.to_thread(server.stop)


@pytest.mark.timeout(180)
async def test_the_api_cut_off_from_redis_answers_503_with_retry_after_and_recovers(
    tmp_path: Path,
) -> None:
    """The partition resets every connection and refuses new ones (for one that holds
    the bytes, see the next test)."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    await asyncio.to_thread(server.start)
    logs = tmp_path / "logs"
    logs.mkdir()
    api: asyncio.subprocess.Process | None = None
    try:
        async with TcpRelay("127.0.0.1", int(server.port or 0)) as relay:
            api, port = await _spawn(logs, "api", _env(relay.url), "api")
            url = f"http://127.0.0.1:{port}/admin/tenants"
            headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
            async with aiohttp.ClientSession(headers=headers) as http:

                async def answers(status: int) -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(url) as resp:
                            return resp.status == status
                    return False

                await _until(lambda: answers(200))
                await relay.pause(drop=True)  # every connection cut, new ones refused
                async with asyncio.timeout(120), http.get(url) as resp:
                    body = await resp.json()
                    assert resp.status == 503, body
                    assert int(resp.headers["retry-after"]) > 0
                    assert body["error"]["type"] == "overloaded_error"
                await relay.resume()
                await _until(lambda: answers(200), timeout_s=120)
            assert await _stop(api) == 0
    finally:
        if api is not None and api.returncode is None:
            with contextlib.suppress(TimeoutError):
                await _stop(api)
        await asyncio.to_thread(server.stop)


@pytest.mark.timeout(300)
async def test_the_api_behind_a_silent_partition_answers_503_within_its_deadline(
    tmp_path: Path,
) -> None:
    """``relay.pause()``: every byte held, no reset, new connections accepted and held too.
    The API's Redis deadline (2 s here) answers 503 where the client's 60 s socket timeout
    and its retries gave no answer within 120 s; 60 s is the generous outer bound. The
    proxy answers 503 at its reservation and never calls the upstream unreserved."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    await asyncio.to_thread(server.start)
    logs = tmp_path / "logs"
    logs.mkdir()
    redis: Any = make_redis(server.url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        await TenantStore(redis).put("acme", TenantPolicy(budgets={"total": 10**9}))
        _, key = await KeyStore(redis).create("acme")
        async with TcpRelay("127.0.0.1", int(server.port or 0)) as relay:
            mock_proc, mock_port = await _spawn(logs, "mock", _env(server.url), "mock-upstream")
            procs.append(mock_proc)
            mock = f"http://127.0.0.1:{mock_port}"
            env = {
                **_env(relay.url),
                "BUDGETER_UPSTREAM_URL": mock,
                "BUDGETER_API_REDIS_DEADLINE_SECONDS": "2",
            }
            api, port = await _spawn(logs, "api", env, "api")
            procs.append(api)
            base = f"http://127.0.0.1:{port}"
            admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
            tenant = {"x-api-key": key, "anthropic-version": "2023-06-01"}
            message = {
                "model": "claude-test",
                "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "hello"}],
            }
            batch = {"requests": [{"custom_id": "r-0", "params": message}]}
            calls: dict[str, tuple[str, str, dict[str, str], Any]] = {
                "admin": ("GET", f"{base}/admin/tenants", admin, None),
                "proxy": ("POST", f"{base}/v1/messages", tenant, message),
                "batch": ("POST", f"{base}/v1/messages/batches", tenant, batch),
            }
            async with aiohttp.ClientSession() as http:

                async def answers(name: str, status: int) -> bool:
                    method, url, headers, body = calls[name]
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.request(method, url, headers=headers, json=body) as resp:
                            return resp.status == status
                    return False

                for name in ("admin", "proxy"):
                    await _until(functools.partial(answers, name, 200))
                served = (await _json(http, f"{mock}/mock/stats"))["requests"]["messages"]
                await relay.pause()  # silent: bytes held both ways, no reset
                for name, (method, url, headers, body) in calls.items():
                    async with (
                        asyncio.timeout(60),
                        http.request(method, url, headers=headers, json=body) as resp,
                    ):
                        answer = await resp.json()
                        assert resp.status == 503, (name, answer)
                        assert int(resp.headers["retry-after"]) > 0, name
                        assert answer["error"]["type"] == "overloaded_error", (name, answer)
                stats = await _json(http, f"{mock}/mock/stats")
                assert stats["requests"]["messages"] == served  # never called unreserved
                await relay.resume()
                for name in ("admin", "proxy"):
                    await _until(functools.partial(answers, name, 200), timeout_s=120)
                stats = await _json(http, f"{mock}/mock/stats")
                assert stats["requests"]["messages"] > served
            assert await _stop(api) == 0
    finally:
        for proc in procs:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await _stop(proc)
        await redis.aclose()
        await asyncio.to_thread(server.stop)
