"""Notification delivery (issue 18, item 4) against a real Redis and a real receiver
process on loopback that fails its first attempts: every event arrives, signed, at least
once with a stable id; a failed attempt is retried after its backoff; a dead process's
events are claimed by another; an event older than the give-up age is dropped and counted
``failed``; a receiver that hangs never blocks the others."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from budgeter.metrics import Metrics
from budgeter.notify.delivery import Delivery, DeliveryConfig, backoff_ms
from budgeter.notify.events import BadEventError, Event, format_fields, parse_fields
from budgeter.notify.outbox import Outbox
from budgeter.notify.signing import BadSignatureError, sign, verify

SECRET = "whsec-test-0123456789"


def test_an_event_round_trips_through_its_outbox_fields() -> None:
    fields = format_fields("budget.threshold", {"budget": "day", "threshold": 0.8})
    event = parse_fields("acme", "1764662400000-0", fields)
    assert event == Event(
        "acme", "1764662400000-0", "budget.threshold", {"budget": "day", "threshold": 0.8}
    )
    assert event.id == "evt_acme_1764662400000-0"
    assert event.body()["created_at"] == "2025-12-02T08:00:00.000Z"
    assert "80 %" in event.text()
    with pytest.raises(BadEventError):
        format_fields("nope", {})
    assert parse_fields("acme", "1-0", {"type": "later.kind", "data": "[1]"}).type == "unknown"


def test_signatures_verify_and_refuse_tampering_and_replays() -> None:
    header = sign(SECRET, b'{"a":1}', 1000)
    verify(SECRET, header, b'{"a":1}', now=1100)
    with pytest.raises(BadSignatureError, match="does not match"):
        verify(SECRET, header, b'{"a":2}', now=1100)
    with pytest.raises(BadSignatureError, match="does not match"):
        verify("other-secret", header, b'{"a":1}', now=1100)
    with pytest.raises(BadSignatureError, match="s old"):
        verify(SECRET, header, b'{"a":1}', now=5000)
    with pytest.raises(BadSignatureError, match="no t="):
        verify(SECRET, "v1=abc", b"", now=0)


def test_backoff_doubles_up_to_its_cap() -> None:
    config = DeliveryConfig("http://x", retry_base_s=5, retry_max_s=60)
    assert [backoff_ms(n, config) for n in (1, 2, 3, 4, 5, 9)] == [
        5000,
        10000,
        20000,
        40000,
        60000,
        60000,
    ]


@contextlib.asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[str]:
    """An in-process receiver on a free loopback port: its /hook URL."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


def received(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def deliver_until(delivery: Delivery, done: Any, *, timeout_s: float = 30) -> None:
    """Delivery passes until ``done()`` (bounded: the backoffs here are tens of ms)."""
    async with asyncio.timeout(timeout_s):
        while not done():
            await delivery.deliver_once()
            await asyncio.sleep(0.02)


async def test_every_event_arrives_signed_at_least_once_after_failures(
    redis: Redis, receiver: tuple[str, Path]
) -> None:
    url, log = receiver
    outbox = Outbox(redis)
    for n in range(3):
        await outbox.emit("acme", "batch.ended", {"batch_id": f"b{n}"})
    metrics = Metrics()
    config = DeliveryConfig(url, SECRET, retry_base_s=0.05, retry_max_s=0.2)
    async with aiohttp.ClientSession() as session:
        delivery = Delivery(redis, session, config, metrics=metrics, consumer="w1")

        def delivered() -> set[str]:
            return {r["event_id"] for r in received(log) if r["status"] == 200}

        await deliver_until(delivery, lambda: len(delivered()) == 3)
    records = received(log)
    assert [r["status"] for r in records[:2]] == [500, 500]
    for record in records:
        verify(SECRET, record["signature"], record["body"].encode(), now=int(time.time()))
        assert json.loads(record["body"])["id"] == record["event_id"]
    bodies = {json.loads(r["body"])["data"]["batch_id"] for r in records if r["status"] == 200}
    assert bodies == {"b0", "b1", "b2"}
    counts = {
        s.labels["result"]: s.value
        for m in metrics.registry.collect()
        if m.name == "budgeter_webhook_events"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert counts["delivered"] == 3 and counts["retried"] == 2 and counts["failed"] == 0
    assert await redis.xlen("budgeter:{t:acme}:outbox") == 0  # delivered entries deleted
    assert await outbox.hinted() == []


async def test_a_dead_processs_events_are_claimed_by_another(
    redis: Redis, receiver: tuple[str, Path]
) -> None:
    url, log = receiver
    outbox = Outbox(redis)
    await outbox.emit("acme", "job.dead_lettered", {"custom_id": "c1"})
    taken = await outbox.read_new("acme", "dead-worker")  # read, then the process died
    assert [e.type for e in taken] == ["job.dead_lettered"]
    config = DeliveryConfig(url, SECRET, retry_base_s=0.05, retry_max_s=0.2)
    async with aiohttp.ClientSession() as session:
        delivery = Delivery(redis, session, config, consumer="w2")
        await deliver_until(delivery, lambda: any(r["status"] == 200 for r in received(log)))
    ids = {r["event_id"] for r in received(log)}
    assert ids == {taken[0].id}  # the same id on every attempt: de-duplicable


async def test_an_event_past_the_give_up_age_is_dropped_and_counted(redis: Redis) -> None:
    outbox = Outbox(redis)
    await outbox.emit("acme", "test", {})
    metrics = Metrics()
    config = DeliveryConfig("http://127.0.0.1:9/never", give_up_s=60)
    async with aiohttp.ClientSession() as session:
        later = Delivery(redis, session, config, metrics=metrics, clock=lambda: time.time() + 120)
        assert await later.deliver_once() == 1
    failed = metrics.webhook_events.labels("failed")._value.get()  # type: ignore[attr-defined]
    assert failed == 1
    assert await redis.xlen("budgeter:{t:acme}:outbox") == 0


async def test_a_hanging_receiver_delays_only_its_own_events(redis: Redis) -> None:
    hang = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response()

    try:
        async with serving(slow) as url:
            outbox = Outbox(redis)
            await outbox.emit("acme", "test", {})
            config = DeliveryConfig(url, timeout_s=0.2)
            async with aiohttp.ClientSession() as session:
                delivery = Delivery(redis, session, config)
                async with asyncio.timeout(10):  # the attempt times out; the pass returns
                    assert await delivery.deliver_once() == 1
            assert len(await outbox.pending("acme")) == 1  # kept for a retry
            hang.set()
    finally:
        hang.set()


async def test_slack_format_posts_text(redis: Redis) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response()

    async with serving(hook) as url:
        await Outbox(redis).emit("acme", "budget.exhausted", {"budget": "day"})
        async with aiohttp.ClientSession() as session:
            delivery = Delivery(redis, session, DeliveryConfig(url, format="slack"))
            assert await delivery.deliver_once() == 1
    assert got == [{"text": "budgeter: tenant acme exhausted its day"}]
