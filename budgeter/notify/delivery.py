"""Delivering the outbox to ``BUDGETER_WEBHOOK_URL``: each event POSTed as JSON (or
Slack's ``{"text": ...}``), signed (budgeter/notify/signing.py), with its id in
``budgeter-event-id`` for de-duplication. At least once: an event is acknowledged only
after a 2xx; a failed one stays pending and is retried after a backoff that doubles from
``retry_base_s`` up to ``retry_max_s`` for ``give_up_s`` (24 h), then counted ``failed``
and dropped. A process that died with events in hand leaves them pending; any other
claims them once their backoff has passed.

Runs apart from admission and settling (a task of the worker process, bounded in flight):
a receiver that hangs or answers garbage only delays its own events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from budgeter.domain import jsonio
from budgeter.metrics import Metrics
from budgeter.notify.events import Event
from budgeter.notify.outbox import Outbox, Pending
from budgeter.notify.signing import HEADER, sign
from budgeter.store.types import RedisClient

log = logging.getLogger("budgeter.notify")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    url: str
    secret: str | None = None
    format: str = "json"  # or "slack"
    timeout_s: float = 10.0
    retry_base_s: float = 5.0
    retry_max_s: float = 3600.0
    give_up_s: float = 86_400.0
    max_in_flight: int = 16
    poll_s: float = 1.0
    sweep_s: float = 60.0


def backoff_ms(deliveries: int, config: DeliveryConfig) -> int:
    """How long an event delivered ``deliveries`` times waits before the next attempt."""
    return int(min(config.retry_base_s * 2 ** max(deliveries - 1, 0), config.retry_max_s) * 1000)


class Delivery:
    def __init__(
        self,
        redis: RedisClient,
        session: aiohttp.ClientSession,
        config: DeliveryConfig,
        *,
        metrics: Metrics | None = None,
        prefix: str = "budgeter",
        tenants: Callable[[], Awaitable[list[str]]] | None = None,
        clock: Callable[[], float] = time.time,
        consumer: str | None = None,
    ) -> None:
        self.outbox = Outbox(redis, prefix=prefix)
        self.session = session
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.consumer = consumer or f"{socket.gethostname()}:{id(self):x}"
        self._tenants = tenants
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._last_sweep = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``; a Redis error is logged and the loop goes on."""
        while not stop.is_set():
            try:
                await self.deliver_once()
            except Exception as exc:  # Redis away: the outage log says so; try again
                log.warning("notification delivery paused: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.poll_s)

    async def deliver_once(self) -> int:
        """One pass over the hinted tenants (every known tenant once per sweep): new
        events, then the pending ones whose backoff has passed. Returns events tried."""
        tenants = set(await self.outbox.hinted())
        now = self.clock()
        if self._tenants is not None and now - self._last_sweep >= self.config.sweep_s:
            tenants |= set(await self._tenants())
            self._last_sweep = now
        tried = 0
        for tenant in sorted(tenants):
            tried += await self._tenant(tenant)
        return tried

    async def _tenant(self, tenant: str) -> int:
        events = await self.outbox.read_new(tenant, self.consumer)
        due = [p for p in await self.outbox.pending(tenant) if self._due(p, events)]
        for _ in due:
            self._count("retried")
        ids = [p.stream_id for p in due]
        min_idle = min((backoff_ms(p.deliveries, self.config) for p in due), default=0)
        events += await self.outbox.claim(tenant, self.consumer, ids, min_idle_ms=min_idle)
        await asyncio.gather(*(self._one(event) for event in events))
        await self.outbox.settle_hint(tenant)
        return len(events)

    def _due(self, pending: Pending, fresh: list[Event]) -> bool:
        if any(e.stream_id == pending.stream_id for e in fresh):
            return False  # just read: tried now
        return pending.idle_ms >= backoff_ms(pending.deliveries, self.config)

    async def _one(self, event: Event) -> None:
        too_old = (self.clock() * 1000 - event.created_ms) / 1000 > self.config.give_up_s
        if too_old:
            log.warning(
                "notification given up after %.0f h: %s", self.config.give_up_s / 3600, event.id
            )
            await self.outbox.ack(event.tenant, event.stream_id)
            self._count("failed")
            return
        async with self._slots:
            delivered = await self._post(event)
        if delivered:
            await self.outbox.ack(event.tenant, event.stream_id)
            self._count("delivered")

    async def _post(self, event: Event) -> bool:
        payload = {"text": event.text()} if self.config.format == "slack" else event.body()
        body = jsonio.dumps(payload)
        headers = {"content-type": "application/json", "budgeter-event-id": event.id}
        if self.config.secret:
            headers[HEADER] = sign(self.config.secret, body, int(self.clock()))
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.session.post(
                self.config.url, data=body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return True
                reason = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
        log.info("notification not delivered (%s), will retry: %s", reason, event.id)
        return False

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_events.labels(result).inc()
