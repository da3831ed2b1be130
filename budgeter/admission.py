"""Atomic token admission: reserve, settle, reap. One Lua call per decision.

``reserve.lua`` checks and reserves every budget, bucket and the concurrency limit of a
tenant at once and answers ADMIT, DEFER(until) or REJECT(reason); ``settle.lua`` replaces
a reservation by the real usage exactly once, and the reaper charges or releases
reservations whose worker died.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from budgeter.keys import TenantKeys
from budgeter.scripts import register

DecisionKind = Literal["ADMIT", "DEFER", "REJECT"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of reserve.lua."""

    kind: DecisionKind
    until_ms: int
    reason: str
    now_ms: int
    detail: str = ""

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Decision:
        kind = _text(reply[0])
        if kind not in ("ADMIT", "DEFER", "REJECT"):
            raise ValueError(f"unexpected reserve.lua reply {reply!r}")
        return cls(kind, int(reply[1]), _text(reply[2]), int(reply[3]), _text(reply[4]))  # type: ignore[arg-type]

    @property
    def waits_for_settle(self) -> bool:
        """DEFER with no time: it may fit once in-flight reservations settle."""
        return self.kind == "DEFER" and self.until_ms == 0

    def describe(self) -> str:
        """A sentence for error messages: which limit, and when it resets."""
        if self.kind == "ADMIT":
            return "admitted"
        what, _, rest = self.reason.partition(":")
        when = f" until {format_ms(self.until_ms)}" if self.until_ms else ""
        if what == "too_large":
            scope, _, name = rest.partition(":")
            label = f"{name} token budget" if scope == "budget" else f"{name} rate limit"
            return f"request needs {self.detail.replace('/', ' tokens but the ')} is the {label}"
        if what == "exhausted":
            used, _, limit = self.detail.partition("/")
            resets = f"; it resets at {format_ms(self.until_ms)}" if self.until_ms else ""
            if self.kind == "DEFER":
                return f"{rest} token budget exhausted; waiting for its reset{when}"
            return f"{rest} token budget exhausted ({used} of {limit} tokens used){resets}"
        if what == "rate":
            return f"{rest} rate limit reached; fits again{when}"
        if what == "inflight":
            return f"{rest} token budget is held by in-flight requests; waiting for them to settle"
        if what == "concurrency":
            return "max_concurrency reached; waiting for in-flight requests"
        if what == "unknown_tenant":
            return "tenant has no policy"
        return self.reason


def format_ms(ms: int, *, precise: bool = False) -> str:
    """RFC 3339 in UTC with a Z (milliseconds when ``precise``)."""
    return (
        dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
        .isoformat(timespec="milliseconds" if precise else "seconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """What the upstream reported for one message."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Usage:
        usage = message.get("usage") or {}
        return cls(
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            int(usage.get("cache_creation_input_tokens") or 0),
            int(usage.get("cache_read_input_tokens") or 0),
        )

    def record(self, metrics: Any, tenant: str, model: str, reserved: int) -> None:
        """Count this usage in ``metrics`` (a budgeter.metrics.Metrics)."""
        metrics.record_settled(
            tenant,
            model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_creation=self.cache_creation_input_tokens,
            cache_read=self.cache_read_input_tokens,
            reserved=reserved,
        )

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The answer of settle.lua."""

    settled: int
    waiting_settle: bool
    charged_full: int
    released: int
    actual_tokens: int
    reserved_tokens: int

    @classmethod
    def from_reply(cls, reply: list[Any]) -> SettleResult:
        settled, waiting, full, released, actual, reserved = (int(x) for x in reply)
        return cls(settled, bool(waiting), full, released, actual, reserved)


def reserve_keys(keys: TenantKeys) -> list[str]:
    return [
        keys.policy,
        keys.buckets,
        keys.budget,
        keys.resv,
        keys.resv_deadline,
        keys.state,
        keys.recent,
    ]


def settle_keys(keys: TenantKeys) -> list[str]:
    return [
        keys.buckets,
        keys.budget,
        keys.resv,
        keys.resv_deadline,
        keys.resv_sent,
        keys.usage,
        keys.state,
    ]


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


class Admission:
    """The admission scripts bound to one Redis client (plain or cluster)."""

    def __init__(self, redis: Any, *, prefix: str = "budgeter") -> None:
        self.redis = redis
        self.prefix = prefix
        self._reserve = register(redis, "reserve.lua")
        self._settle = register(redis, "settle.lua")

    def keys(self, tenant: str) -> TenantKeys:
        return TenantKeys.of(self.prefix, tenant)

    async def reserve(
        self,
        tenant: str,
        reservation_id: str,
        input_tokens: int,
        max_tokens: int,
        *,
        model: str = "unknown",
        hold_ms: int = 90_000,
        now_ms: int | None = None,
    ) -> Decision:
        reply = await self._reserve(
            keys=reserve_keys(self.keys(tenant)),
            args=[
                reservation_id,
                int(input_tokens),
                int(max_tokens),
                _now_arg(now_ms),
                int(hold_ms),
                model,
            ],
        )
        return Decision.from_reply(reply)

    async def mark_sent(self, tenant: str, reservation_id: str) -> None:
        """Record that the upstream may now be called: a crash from here on charges in full."""
        await self.redis.hset(self.keys(tenant).resv_sent, reservation_id, "1")

    async def settle(
        self, tenant: str, reservation_id: str, usage: Usage, *, now_ms: int | None = None
    ) -> SettleResult:
        reply = await self._settle(
            keys=settle_keys(self.keys(tenant)),
            args=[
                "usage",
                _now_arg(now_ms),
                reservation_id,
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens,
            ],
        )
        return SettleResult.from_reply(reply)

    async def charge_full(
        self, tenant: str, reservation_id: str, *, now_ms: int | None = None
    ) -> SettleResult:
        reply = await self._settle(
            keys=settle_keys(self.keys(tenant)), args=["full", _now_arg(now_ms), reservation_id]
        )
        return SettleResult.from_reply(reply)

    async def release(
        self, tenant: str, reservation_id: str, *, now_ms: int | None = None
    ) -> SettleResult:
        reply = await self._settle(
            keys=settle_keys(self.keys(tenant)),
            args=["release", _now_arg(now_ms), reservation_id],
        )
        return SettleResult.from_reply(reply)

    async def reap(
        self, tenant: str, *, limit: int = 1000, now_ms: int | None = None
    ) -> SettleResult:
        """Settle every reservation past its deadline: sent -> charged in full, else released."""
        reply = await self._settle(
            keys=settle_keys(self.keys(tenant)), args=["reap", _now_arg(now_ms), int(limit)]
        )
        return SettleResult.from_reply(reply)
