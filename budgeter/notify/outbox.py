"""The durable outbox of notification events: one Redis Stream per tenant
(``{t:<tenant>}:outbox``, the tenant's slot) with one consumer group, ``delivery``, that
every delivering process joins under its own consumer name. An entry read and not
acknowledged stays pending, so the events of a process that died are claimed by another
(``XPENDING`` + ``XCLAIM`` once their backoff has passed). A hint set
(``{notify}:pending``) names the tenants with new entries; a periodic sweep of every known
tenant catches a hint lost in a race."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import ResponseError

from budgeter.domain.messages import JsonValue
from budgeter.notify.events import Event, format_fields, parse_fields
from budgeter.store.keys import TenantKeys, notify_pending_key
from budgeter.store.types import RedisClient

GROUP = "delivery"
MAX_ENTRIES = 10_000  # per tenant's outbox: the oldest, long delivered, are trimmed


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Pending:
    """An entry read by some consumer and not acknowledged yet."""

    stream_id: str
    consumer: str
    idle_ms: int
    deliveries: int


class Outbox:
    def __init__(self, redis: RedisClient, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self.hints = notify_pending_key(prefix)
        self._grouped: set[str] = set()

    def key(self, tenant: str) -> str:
        return TenantKeys.of(self.prefix, tenant).outbox

    async def emit(self, tenant: str, event_type: str, data: dict[str, JsonValue]) -> str:
        """Append an event (for events Python detects; scripts append the same fields)."""
        fields = format_fields(event_type, data)
        entry_id = await self.redis.xadd(
            self.key(tenant),
            fields,  # type: ignore[arg-type]
            maxlen=MAX_ENTRIES,
            approximate=True,
        )
        await self.hint(tenant)
        return _text(entry_id)

    async def hint(self, tenant: str) -> None:
        await self.redis.sadd(self.hints, tenant)

    async def hinted(self) -> list[str]:
        return sorted(_text(t) for t in await self.redis.smembers(self.hints))

    async def _group(self, tenant: str) -> None:
        key = self.key(tenant)
        if key in self._grouped:
            return
        try:
            await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped.add(key)

    async def read_new(self, tenant: str, consumer: str, *, count: int = 100) -> list[Event]:
        """Entries no consumer has read yet; they become pending for ``consumer``."""
        await self._group(tenant)
        key = self.key(tenant)
        reply: object = await self.redis.xreadgroup(GROUP, consumer, {key: ">"}, count=count)
        if isinstance(reply, dict):  # RESP3: {stream: [entries]}
            reply = list(reply.items())
        streams = reply if isinstance(reply, list) else []
        return self._events(tenant, streams[0][1] if streams else [])

    async def pending(self, tenant: str, *, count: int = 100) -> list[Pending]:
        await self._group(tenant)
        rows = await self.redis.xpending_range(
            self.key(tenant), GROUP, min="-", max="+", count=count
        )
        return [
            Pending(
                str(row["message_id"]),
                str(row["consumer"]),
                int(row["time_since_delivered"]),
                int(row["times_delivered"]),
            )
            for row in rows
        ]

    async def claim(
        self, tenant: str, consumer: str, stream_ids: Sequence[str], *, min_idle_ms: int
    ) -> list[Event]:
        """Take over pending entries idle at least ``min_idle_ms`` (another consumer's that
        died, or this one's own to retry); each claim counts as a delivery."""
        if not stream_ids:
            return []
        reply: object = await self.redis.xclaim(
            self.key(tenant), GROUP, consumer, min_idle_ms, list(stream_ids)
        )
        return self._events(tenant, reply)

    async def ack(self, tenant: str, stream_id: str) -> None:
        """Delivered (or given up): never delivered again; the entry itself is deleted."""
        key = self.key(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, GROUP, stream_id)
            pipe.xdel(key, stream_id)
            await pipe.execute()

    async def settle_hint(self, tenant: str) -> None:
        """Drop the tenant's hint once nothing is left to deliver: no entry pending and
        none unread (a hint written meanwhile may be lost here: the sweep finds it)."""
        key = self.key(tenant)
        summary = await self.redis.xpending(key, GROUP)
        if int(summary["pending"]) or await self._unread(key):
            return
        await self.redis.srem(self.hints, tenant)

    async def _unread(self, key: str) -> bool:
        info = await self.redis.xinfo_stream(key)
        groups = await self.redis.xinfo_groups(key)
        delivered = next(
            (_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == GROUP), "0-0"
        )
        last = _text(info["last-generated-id"])
        return _stream_id(last) > _stream_id(delivered) and int(info["length"]) > 0

    def _events(self, tenant: str, entries: object) -> list[Event]:
        """Events of a reply's ``[(id, {field: value}), ...]`` (entries deleted meanwhile,
        ``(id, None)``, are left out)."""
        events = []
        for entry in entries if isinstance(entries, list | tuple) else []:
            raw_id, raw_fields = entry
            if not isinstance(raw_fields, dict):
                continue
            fields = {_text(k): _text(v) for k, v in raw_fields.items()}
            events.append(parse_fields(tenant, _text(raw_id), fields))
        return events
