"""Atomic token admission: reserve, settle, reap.

``admission/reserve.lua`` checks and reserves every budget, bucket and the concurrency limit of a
tenant at once and answers ADMIT, DEFER(until) or REJECT(reason); ``admission/settle.lua`` replaces
a reservation by the real usage exactly once, and the reaper charges or releases
reservations whose worker died.

Both scripts decide many requests per call: the decisions asked for by concurrent
coroutines for one tenant while the event loop runs one round go to Redis as one script
call (``BatchedScript``), each decided in turn exactly as if it had been called alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from budgeter.admission.global_limits import GlobalLimits
from budgeter.admission.reasons import Reason, parse_reason
from budgeter.domain.pricing import GENAI_PRICES_VERSION, ModelPrice, PriceTable
from budgeter.store.durability import NotReplicated
from budgeter.store.keys import GlobalModelKeys, TenantKeys, notify_pending_key
from budgeter.store.scripts import BatchedScript, register
from budgeter.store.types import RedisClient

if TYPE_CHECKING:
    from budgeter.metrics import Metrics
    from budgeter.settings import Settings

DecisionKind = Literal["ADMIT", "DEFER", "REJECT"]


ReplyItem = str | bytes | int
"""One element of a script's reply, as redis-py decodes it."""


def _text(value: ReplyItem) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of admission/reserve.lua."""

    kind: DecisionKind
    until_ms: int
    reason: str
    now_ms: int
    detail: str = ""

    @classmethod
    def from_reply(cls, reply: Sequence[ReplyItem]) -> Decision:
        if not reply[2] and reply[0] in ("ADMIT", b"ADMIT"):  # the common answer, at once
            return cls("ADMIT", 0, "", int(reply[3]))
        kind = _text(reply[0])
        if kind not in ("ADMIT", "DEFER", "REJECT"):
            raise ValueError(f"unexpected admission/reserve.lua reply {reply!r}")
        return cls(
            cast(DecisionKind, kind), int(reply[1]), _text(reply[2]), int(reply[3]), _text(reply[4])
        )

    @property
    def waits_for_settle(self) -> bool:
        """DEFER with no time: it may fit once in-flight reservations settle."""
        return self.kind == "DEFER" and self.until_ms == 0

    @property
    def waits_for_reset(self) -> bool:
        """DEFER on an exhausted budget of the tenant (its policy says on_exhausted 'wait'):
        it fits no sooner than the period's reset."""
        reason = self.parsed_reason
        return (
            self.kind == "DEFER"
            and reason is not None
            and reason.kind == "exhausted"
            and not reason.account
        )

    @property
    def parsed_reason(self) -> Reason | None:
        """The typed reason (None for ADMIT or a reason outside the vocabulary)."""
        try:
            return parse_reason(self.reason) if self.reason else None
        except ValueError:
            return None

    def describe(self, model: str | None = None) -> str:
        """A sentence for error messages: which limit, and when it resets."""
        if self.kind == "ADMIT":
            return "admitted"
        reason = self.parsed_reason
        if reason is None:
            return self.reason
        owner = "the upstream account's " if reason.account else "the "
        if reason.limit is not None:
            return _LIMIT_SENTENCES[reason.kind](self, owner, reason.limit.label(model))
        return _SENTENCES[reason.kind](self, model)

    def _when(self, words: str) -> str:
        return f"{words}{format_ms(self.until_ms)}" if self.until_ms else ""

    def _too_large(self, owner: str, label: str) -> str:
        cost, _, limit = self.detail.partition("/")
        unit = "" if "USD" in label else (" request" if label.startswith("rpm ") else " tokens")
        return f"request needs {cost}{unit} but {owner}{label} is {limit}"

    def _exhausted(self, owner: str, label: str) -> str:
        if self.kind == "DEFER":
            return f"{owner}{label} exhausted; waiting for its reset{self._when(' until ')}"
        used, _, limit = self.detail.partition("/")
        return f"{owner}{label} exhausted ({used} of {limit} used){self._when('; it resets at ')}"

    def _rate(self, owner: str, label: str) -> str:
        return f"{owner}{label} reached{self._when('; fits again at ')}"

    @staticmethod
    def _inflight(owner: str, label: str) -> str:
        return f"{owner}{label} is held by in-flight requests; waiting for them to settle"

    def _paused(self, model: str | None) -> str:
        which = f"model {model}" if model else "this model"
        return f"the upstream rate-limited {which} (429); paused{self._when(' until ')}"

    def _model_not_allowed(self, model: str | None) -> str:
        return f"model {model or self.detail!r} is not in this tenant's allowed_models"

    def _unpriced_model(self, model: str | None) -> str:
        return (
            f"model {model or self.detail!r} has no price (genai-prices "
            f"{GENAI_PRICES_VERSION} does not know it): a usd budget cannot admit it "
            "until BUDGETER_PRICES prices it"
        )


_LIMIT_SENTENCES: dict[str, Callable[[Decision, str, str], str]] = {
    "too_large": Decision._too_large,
    "exhausted": Decision._exhausted,
    "rate": Decision._rate,
    "inflight": lambda _decision, owner, label: Decision._inflight(owner, label),
}
_SENTENCES: dict[str, Callable[[Decision, str | None], str]] = {
    "concurrency": lambda _d, _m: "max_concurrency reached; waiting for in-flight requests",
    "paused": Decision._paused,
    "model_not_allowed": Decision._model_not_allowed,
    "unpriced_model": Decision._unpriced_model,
    "unknown_tenant": lambda _d, _m: "tenant has no policy",
}


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

    def record(self, metrics: Metrics, tenant: str, model: str, reserved: int) -> None:
        """Count this usage in ``metrics``."""
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
    """The answer of admission/settle.lua."""

    settled: int
    waiting_settle: bool
    charged_full: int
    released: int
    actual_tokens: int
    reserved_tokens: int
    events: int = 0  # notification events the settle appended to the outbox

    @classmethod
    def from_reply(cls, reply: Sequence[ReplyItem]) -> SettleResult:
        settled, waiting, full, released, actual, reserved, events = (int(x) for x in reply)
        return cls(settled, bool(waiting), full, released, actual, reserved, events)


Scope = TenantKeys | GlobalModelKeys
"""An admission scope: a tenant's keys or one model's of the upstream account."""


def reserve_keys(keys: Scope) -> tuple[str, ...]:
    return (
        keys.policy,
        keys.buckets,
        keys.budget,
        keys.resv,
        keys.resv_deadline,
        keys.state,
        keys.recent,
        keys.resv_sent,
    )


def settle_keys(keys: Scope) -> tuple[str, ...]:
    return (
        keys.buckets,
        keys.budget,
        keys.resv,
        keys.resv_deadline,
        keys.resv_sent,
        keys.usage,
        keys.state,
        keys.outbox,
    )


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


class Admission:
    """The admission scripts bound to one Redis client (plain or cluster).

    With ``global_limits``, a tenant's ADMIT is followed by a reservation against the
    upstream account's limits of the model, in the model's own scope; when those refuse,
    the tenant's reservation is released and their answer (reason ``global:...``) is the
    decision. Settling settles both. ``prices`` price ``usd_budgets``: a
    :class:`PriceTable`, or a mapping of model -> price that overrides genai-prices' table
    (the default: that table alone).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "budgeter",
        global_limits: GlobalLimits | None = None,
        prices: PriceTable | Mapping[str, ModelPrice] | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.global_limits = global_limits
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self._reserve = BatchedScript(redis, "admission/reserve.lua", width=5)
        self._settle = BatchedScript(redis, "admission/settle.lua", width=7)
        self._reap = self._settle.script
        self._mark_sent = register(redis, "admission/mark_sent.lua")
        self._held_globally: dict[str, str] = {}  # reservation id -> model
        # per-call work done once: a tenant's key names, a model's price argument
        self._key_names: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._price_args: dict[str, str] = {}
        self._price_day = 0  # the UTC day (since the epoch) the price arguments are of

    def keys(self, tenant: str) -> TenantKeys:
        return TenantKeys.of(self.prefix, tenant)

    def _names(self, tenant: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(reserve keys, settle keys) of ``tenant``, remembered (at most 10,000 tenants)."""
        names = self._key_names.get(tenant)
        if names is None:
            if len(self._key_names) >= 10_000:
                self._key_names.clear()
            keys = self.keys(tenant)
            names = self._key_names[tenant] = (reserve_keys(keys), settle_keys(keys))
        return names

    def price_arg(self, model: str, now_ms: int | None = None) -> str:
        """The model's price argument on the UTC day of ``now_ms`` (default: now)."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        day = ms // 86_400_000
        if day != self._price_day or len(self._price_args) >= 1_000:
            self._price_args.clear()
            self._price_day = day
        arg = self._price_args.get(model)
        if arg is None:
            price = self.prices.price(model, dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date())
            arg = self._price_args[model] = "" if price is None else price.lua_arg()
        return arg

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
        sent_at_once: bool = False,
    ) -> Decision:
        """``sent_at_once``: the caller calls the upstream right after an ADMIT, so the
        reservation is marked sent in the same call (one round trip fewer than
        :meth:`mark_sent`; a crash in between is charged in full, never under-counted)."""
        limits = self.global_limits
        if limits is not None:
            paused = await limits.paused_until_ms(model)
            if paused:
                return Decision("DEFER", paused, "global:paused", int(limits.wall() * 1000))
        prices = self.price_arg(model, now_ms)
        now = _now_arg(now_ms)
        item = [reservation_id, int(input_tokens), int(max_tokens), int(hold_ms), model]
        try:
            reply = await self._reserve(
                self._names(tenant)[0], (now, ""), [*item, "1" if sent_at_once else "", prices]
            )
        except NotReplicated:
            await self._release_unreplicated(tenant, reservation_id, None, now_ms)
            raise
        decision = Decision.from_reply(reply)
        if decision.kind != "ADMIT" or limits is None:
            return decision
        policy = await limits.limits_json(model)
        if not policy:
            return decision
        await limits.remember(model)
        # the account's scope: its policy passed in, always marked sent (reaped in full)
        try:
            reply = await self._reserve(
                reserve_keys(limits.keys(model)), (now, policy), [*item, "1", prices]
            )
        except NotReplicated:
            await self._release_unreplicated(tenant, reservation_id, model, now_ms)
            raise
        account = Decision.from_reply(reply)
        if account.kind == "ADMIT":
            self._held_globally[reservation_id] = model
            return decision
        await self._settle_scope(self._names(tenant)[1], "release", reservation_id, now_ms=now_ms)
        return Decision(
            account.kind,
            account.until_ms,
            f"global:{account.reason}",
            account.now_ms,
            account.detail,
        )

    async def _release_unreplicated(
        self, tenant: str, reservation_id: str, model: str | None, now_ms: int | None
    ) -> None:
        """A reservation the master made but too few replicas acknowledged (see
        budgeter/store/durability.py): the caller gets the error and never calls the
        upstream on it, so it is released here (a failover would have lost it anyway); if
        even that fails, it stays marked sent and the reaper charges it in full."""
        scopes = [self._names(tenant)[1]]
        if model is not None and self.global_limits is not None:
            scopes.append(settle_keys(self.global_limits.keys(model)))
        for names in scopes:
            with contextlib.suppress(Exception):
                await self._settle_scope(names, "release", reservation_id, now_ms=now_ms)

    async def mark_sent(self, tenant: str, reservation_id: str) -> bool:
        """Record that the upstream may now be called: a crash from here on charges in full.

        False when the reservation is gone (the reaper released it): the caller must not
        call the upstream, only release what it still holds (:meth:`release`)."""
        keys = self.keys(tenant)
        marked = await self._mark_sent(keys=[keys.resv, keys.resv_sent], args=[reservation_id])
        return bool(marked)

    async def _settle_scope(
        self,
        names: tuple[str, ...],
        mode: str,
        reservation_id: str,
        *usage: int,
        now_ms: int | None,
    ) -> SettleResult:
        """Settle in one scope (``names``: its settle_keys)."""
        amounts = list(usage) if usage else [0, 0, 0, 0]
        reply = await self._settle(names, (_now_arg(now_ms),), [mode, reservation_id, *amounts])
        return SettleResult.from_reply(reply)

    async def _settle_both(
        self, tenant: str, mode: str, reservation_id: str, *usage: int, now_ms: int | None
    ) -> SettleResult:
        result = await self._settle_scope(
            self._names(tenant)[1], mode, reservation_id, *usage, now_ms=now_ms
        )
        await self._hint(tenant, result)
        model = self._held_globally.get(reservation_id)
        if model is not None and self.global_limits is not None:
            names = settle_keys(self.global_limits.keys(model))
            await self._settle_scope(names, mode, reservation_id, *usage, now_ms=now_ms)
        self._held_globally.pop(reservation_id, None)  # only once settled: a retry settles it
        return result

    async def settle(
        self, tenant: str, reservation_id: str, usage: Usage, *, now_ms: int | None = None
    ) -> SettleResult:
        return await self._settle_both(
            tenant,
            "usage",
            reservation_id,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
            now_ms=now_ms,
        )

    async def charge_full(
        self, tenant: str, reservation_id: str, *, now_ms: int | None = None
    ) -> SettleResult:
        return await self._settle_both(tenant, "full", reservation_id, now_ms=now_ms)

    async def release(
        self, tenant: str, reservation_id: str, *, now_ms: int | None = None
    ) -> SettleResult:
        return await self._settle_both(tenant, "release", reservation_id, now_ms=now_ms)

    async def reap(
        self, tenant: str, *, limit: int = 1000, now_ms: int | None = None
    ) -> SettleResult:
        """Settle every reservation past its deadline: sent -> charged in full, else released."""
        reply = await self._reap(
            keys=settle_keys(self.keys(tenant)), args=[_now_arg(now_ms), "reap", int(limit)]
        )
        result = SettleResult.from_reply(reply)
        await self._hint(tenant, result)
        return result

    async def _hint(self, tenant: str, result: SettleResult) -> None:
        """A settle that appended notification events names the tenant for delivery
        (budgeter.notify.outbox; a lost hint is found by the delivery's sweep)."""
        if result.events:
            await self.redis.sadd(notify_pending_key(self.prefix), tenant)

    async def reap_global(self, *, limit: int = 1000, now_ms: int | None = None) -> int:
        """Reap the account scopes' reservations whose process died (all charged in full:
        they are marked sent when made). Returns how many were reaped."""
        if self.global_limits is None:
            return 0
        reaped = 0
        for model in await self.global_limits.models():
            reply = await self._reap(
                keys=settle_keys(self.global_limits.keys(model)),
                args=[_now_arg(now_ms), "reap", int(limit)],
            )
            reaped += SettleResult.from_reply(reply).settled
        return reaped


def admission_from_settings(redis: RedisClient, settings: Settings) -> Admission:
    """The admission every process builds from its settings: the account's global limits
    (policy and upstream pauses shared through Redis) and the price table."""
    return Admission(
        redis,
        prefix=settings.key_prefix,
        global_limits=GlobalLimits(redis, prefix=settings.key_prefix),
        prices=PriceTable(settings.prices),
    )
