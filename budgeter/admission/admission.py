"""Atomic token admission: reserve, settle, reap.

``admission/reserve.lua`` checks and reserves every budget, bucket and the concurrency limit of a
tenant at once and answers ADMIT, DEFER(until) or REJECT(reason); ``admission/settle.lua`` replaces
a reservation by the real usage exactly once, and the reaper charges or releases
reservations whose worker died.

Along the organisation tree a request is reserved scope by scope, in a fixed order: its
tenant's, its API key's limits (when the key has any), each ancestor's nearest first, then
the upstream account's. When a scope refuses, the scopes already reserved are released and
the rest are only checked (reserve.lua's check-only item), so that the answer is the
latest DEFER of them all, or a REJECT naming the scope (``parent:<id>:...``, ``key:...``,
``global:...``). Settle, charge-full and release settle every scope the reservation was
made in; each scope's reaper reaps its own (they were made with the same sent flag).

Both scripts decide many requests per call: the decisions asked for by concurrent
coroutines for one tenant while the event loop runs one round go to Redis as one script
call (``BatchedScript``), each decided in turn exactly as if it had been called alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from budgeter.admission.decision import (
    Decision,
    DecisionKind,
    ReplyItem,
    SettleResult,
    Usage,
    format_ms,
    text_of,
)
from budgeter.admission.global_limits import GlobalLimits
from budgeter.admission.reasons import KEY_PREFIX
from budgeter.admission.scopes import ChainScope, Scope, reserve_keys, settle_keys
from budgeter.admission.tree_view import TreeView
from budgeter.domain.jsonio import dumps_str
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.ledger.entry import DEFAULT_RETENTION_DAYS, meta_of_reservation, retention_ms
from budgeter.store.durability import NotReplicated
from budgeter.store.keys import KeyScopeKeys, TenantKeys, notify_pending_key
from budgeter.store.scripts import BatchedScript, register
from budgeter.store.types import RedisClient

if TYPE_CHECKING:
    from budgeter.settings import Settings

__all__ = [  # the answers live in budgeter/admission/decision.py; callers import them here too
    "Admission",
    "ChainScope",
    "Decision",
    "DecisionKind",
    "ReplyItem",
    "Scope",
    "SettleResult",
    "Usage",
    "admission_from_settings",
    "format_ms",
    "reserve_keys",
    "settle_keys",
]


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


class Admission:
    """The admission scripts bound to one Redis client (plain or cluster).

    With ``global_limits``, a tenant's ADMIT is followed by a reservation against the
    upstream account's limits of the model, in the model's own scope; when those refuse,
    the tenant's reservation is released and their answer (reason ``global:...``) is the
    decision. Settling settles both. ``prices`` price ``usd_budgets``: a
    :class:`PriceTable`, or a mapping of model -> price that overrides genai-prices' table
    (the default: that table alone). ``tree``: the view of the organisation tree whose
    ancestors' scopes a request reserves in too (default: one refreshed every second).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "budgeter",
        global_limits: GlobalLimits | None = None,
        prices: PriceTable | Mapping[str, ModelPrice] | None = None,
        tree: TreeView | None = None,
        ledger_retention_days: float = DEFAULT_RETENTION_DAYS,
    ) -> None:
        self.redis = redis
        self.ledger_retention_ms = retention_ms(ledger_retention_days)
        self.prefix = prefix
        self.global_limits = global_limits
        self.tree = tree if tree is not None else TreeView(redis, prefix=prefix)
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self._reserve = BatchedScript(redis, "admission/reserve.lua", width=5)
        self._settle = BatchedScript(redis, "admission/settle.lua", width=7)
        self._reap = self._settle.script
        self._mark_sent = register(redis, "admission/mark_sent.lua")
        self._held_globally: dict[str, str] = {}  # reservation id -> model
        self._chains: dict[str, tuple[ChainScope, ...]] = {}  # reservation id -> its scopes
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
            names = self._key_names[tenant] = (reserve_keys(keys), settle_keys(keys, ledger=True))
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

    async def chain(self, tenant: str, key: str | None = None) -> tuple[ChainScope, ...]:
        """The scopes after ``tenant``'s own a request reserves in: the API key's limits
        (``key``: its id, given when the key has limits), then each ancestor, nearest first."""
        scopes: list[ChainScope] = []
        if key:
            scopes.append(ChainScope.api_key(self.prefix, tenant, key))
        ancestors = await self.tree.ancestors(tenant)
        scopes.extend(ChainScope.ancestor(self.prefix, a) for a in ancestors)
        return tuple(scopes)

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
        key: str | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> Decision:
        """``sent_at_once``: the caller calls the upstream right after an ADMIT, so the
        reservation is marked sent in the same call (one round trip fewer than
        :meth:`mark_sent`; a crash in between is charged in full, never under-counted).
        ``key``: the id of the API key the request came with, when that key has limits.
        ``meta``: what the tenant's reservation records for its ledger entry (``"x"``;
        the ancestors are added as ``"a"``)."""
        limits = self.global_limits
        if limits is not None:
            paused = await limits.paused_until_ms(model)
            if paused:
                return Decision("DEFER", paused, "global:paused", int(limits.wall() * 1000))
        chain = await self.chain(tenant, key)
        prices = self.price_arg(model, now_ms)
        now = _now_arg(now_ms)
        item: list[str | int] = [
            reservation_id, int(input_tokens), int(max_tokens), int(hold_ms), model
        ]  # fmt: skip
        sent = "1" if sent_at_once else ""
        ancestors = [s.keys.tenant for s in chain if s.prefix != KEY_PREFIX]
        record = dict(meta or {})
        if ancestors:
            record["a"] = ancestors
        # the key's limits are one more scope in the tenant's own call (KEYS[9..16])
        held = chain[:1] if chain and chain[0].prefix == KEY_PREFIX else ()
        names = self._names(tenant)[0]
        if held:
            names = (*names, *reserve_keys(held[0].keys))
        try:
            reply = await self._reserve(
                names, (now, ""), [*item, sent, prices, dumps_str(record) if record else ""]
            )
        except NotReplicated:
            await self._release_unreplicated(tenant, reservation_id, held, None, now_ms)
            raise
        decision = Decision.from_reply(reply)
        if decision.kind == "ADMIT" and held:
            self._chains[reservation_id] = held
        if len(chain) > len(held) and decision.kind != "REJECT":
            decision = await self._reserve_chain(
                tenant, chain[len(held) :], decision, [*item, sent, prices], now, now_ms, held
            )
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
            await self._release_unreplicated(tenant, reservation_id, chain, model, now_ms)
            raise
        account = Decision.from_reply(reply)
        if account.kind == "ADMIT":
            self._held_globally[reservation_id] = model
            return decision
        await self._roll_back(tenant, reservation_id, self._chains.pop(reservation_id, ()), now_ms)
        return account.named("global:")

    async def _reserve_chain(
        self,
        tenant: str,
        chain: tuple[ChainScope, ...],
        decision: Decision,
        item: list[str | int],
        now: str,
        now_ms: int | None,
        held: tuple[ChainScope, ...] = (),
    ) -> Decision:
        """Reserve in each scope of ``chain`` after the tenant's ``decision`` (ADMIT or
        DEFER; ``held``: the key's scope, reserved in the tenant's call). After a refusal
        the remaining scopes are only checked: the answer is the latest DEFER, or the first
        REJECT; the scopes reserved so far (``held`` too) are released."""
        rid = str(item[0])
        reserved = list(held) if decision.kind == "ADMIT" else []
        refusal = None if decision.kind == "ADMIT" else decision
        next_ms = decision.until_ms  # an ADMIT's: the latest next request of the chain
        for scope in chain:
            checking = refusal is not None
            try:
                reply = await self._reserve(
                    reserve_keys(scope.keys),
                    (now, scope.policy),
                    [*item, "", "1" if checking else ""],
                )
            except NotReplicated:
                await self._release_unreplicated(tenant, rid, (*reserved, scope), None, now_ms)
                raise
            answer = Decision.from_reply(reply)
            if answer.kind == "ADMIT":
                if not checking:
                    reserved.append(scope)
                    next_ms = max(next_ms, answer.until_ms)
                continue
            if refusal is None or answer.kind == "REJECT" or answer.until_ms > refusal.until_ms:
                refusal = answer.named(scope.prefix)
            if answer.kind == "REJECT":
                break
        if refusal is None:
            self._chains[rid] = tuple(reserved)
            return replace(decision, until_ms=next_ms) if next_ms else decision
        if decision.kind == "ADMIT":
            await self._roll_back(tenant, rid, tuple(reserved), now_ms)
        return refusal

    async def _roll_back(
        self, tenant: str, reservation_id: str, chain: Sequence[ChainScope], now_ms: int | None
    ) -> None:
        """Release a reservation a later scope refused: in the scopes of ``chain`` already
        reserved, newest first, then the tenant's (no ledger entry: nothing was asked of
        the upstream, and the request is answered by the refusal)."""
        for scope in reversed(chain):
            await self._settle_scope(
                settle_keys(scope.keys), "release", reservation_id, now_ms=now_ms
            )
        await self._settle_scope(
            settle_keys(self.keys(tenant)), "release", reservation_id, now_ms=now_ms
        )

    async def _release_unreplicated(
        self,
        tenant: str,
        reservation_id: str,
        chain: Sequence[ChainScope],
        model: str | None,
        now_ms: int | None,
    ) -> None:
        """A reservation the master made but too few replicas acknowledged (see
        budgeter/store/durability.py): the caller gets the error and never calls the
        upstream on it, so it is released here, in every scope it may have been made in (a
        failover would have lost it anyway); if even that fails, it stays marked sent and
        the reapers charge it in full."""
        scopes = [self._names(tenant)[1], *(settle_keys(s.keys) for s in chain)]
        if model is not None and self.global_limits is not None:
            scopes.append(settle_keys(self.global_limits.keys(model)))
        self._chains.pop(reservation_id, None)
        for names in scopes:
            with contextlib.suppress(Exception):
                await self._settle_scope(names, "release", reservation_id, now_ms=now_ms)

    async def mark_sent(self, tenant: str, reservation_id: str) -> bool:
        """Record that the upstream may now be called: a crash from here on charges in full.

        The chain's scopes are marked first and the tenant's last, so that a crash between
        leaves them charged at least as much as the tenant. False when the tenant's
        reservation is gone (the reaper released it): the caller must not call the
        upstream, only release what it still holds (:meth:`release`)."""
        for scope in self._chains.get(reservation_id, ()):
            await self._mark_sent(
                keys=[scope.keys.resv, scope.keys.resv_sent], args=[reservation_id]
            )
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
        head: tuple[str | int, ...] = (_now_arg(now_ms),)
        if len(names) > 8:  # the tenant's own scope: its ledger's retention too
            head = (*head, self.ledger_retention_ms)
        reply = await self._settle(names, head, [mode, reservation_id, *amounts])
        return SettleResult.from_reply(reply)

    async def _settle_both(
        self, tenant: str, mode: str, reservation_id: str, *usage: int, now_ms: int | None
    ) -> SettleResult:
        """Settle in every scope of the reservation: the tenant's (its answer is the
        result), its chain's (as made, else the chain as it is now), the account's."""
        chain = self._chains.get(reservation_id)
        if chain is None:  # made by another process, or before a restart, or no chain
            chain = await self.chain(tenant)
            recorded = await self._recorded_chain(tenant, reservation_id) if chain else None
            if recorded is not None:  # the chain it was made with (no read: a flat tenant)
                chain = recorded
        result = await self._settle_scope(
            self._names(tenant)[1], mode, reservation_id, *usage, now_ms=now_ms
        )
        await self._hint(tenant, result)
        waiting: list[str] = []
        for scope in chain:
            done = await self._settle_scope(
                settle_keys(scope.keys), mode, reservation_id, *usage, now_ms=now_ms
            )
            if done.waiting_settle and isinstance(scope.keys, TenantKeys):
                waiting.append(scope.keys.tenant)
        model = self._held_globally.get(reservation_id)
        if model is not None and self.global_limits is not None:
            names = settle_keys(self.global_limits.keys(model))
            await self._settle_scope(names, mode, reservation_id, *usage, now_ms=now_ms)
        self._held_globally.pop(reservation_id, None)  # only once settled: a retry settles it
        self._chains.pop(reservation_id, None)
        if waiting:
            result = replace(result, waiting_ancestors=tuple(waiting))
        return result

    async def _recorded_chain(
        self, tenant: str, reservation_id: str
    ) -> tuple[ChainScope, ...] | None:
        """The scopes the tenant's reservation recorded when it was made (its ledger meta:
        the API key ``k``, the ancestors ``a``), so that a re-parent since does not move
        it; None when the tenant holds no such reservation (settled already: a retry
        settles the chain as it is now)."""
        record = await self.redis.hget(self.keys(tenant).resv, reservation_id)
        if record is None:
            return None
        meta = meta_of_reservation(record)
        scopes = [ChainScope.api_key(self.prefix, tenant, meta.k)] if meta.k else []
        scopes.extend(ChainScope.ancestor(self.prefix, a) for a in meta.a)
        return tuple(scopes)

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
        keys = self.keys(tenant)
        reply = await self._reap(
            keys=settle_keys(keys, ledger=True),
            args=[_now_arg(now_ms), "reap", int(limit), self.ledger_retention_ms],
        )
        result = SettleResult.from_reply(reply)
        await self._hint(tenant, result)
        for key_id in await self.redis.smembers(keys.limited_keys):  # the keys' scopes too
            scope = KeyScopeKeys(self.prefix, tenant, text_of(key_id))
            await self._reap(keys=settle_keys(scope), args=[_now_arg(now_ms), "reap", int(limit)])
        return result

    async def to_wake(self, tenant: str, result: SettleResult, limit: int = 100) -> list[str]:
        """The tenants whose parked work may fit now that ``result`` settled: ``tenant``
        when a DEFER of its own waited, and the tenants below each ancestor where one
        waited (at most ``limit``; the rest look again after their fallback wait)."""
        wake = [tenant] if result.waiting_settle else []
        if not result.waiting_ancestors:
            return wake
        parents = await self.tree.parents()
        below: dict[str, list[str]] = {}
        for child, parent in parents.items():
            if parent is not None:
                below.setdefault(parent, []).append(child)
        todo = list(result.waiting_ancestors)
        seen = {tenant, *todo}
        while todo and len(wake) < limit:
            for child in sorted(below.get(todo.pop(0), [])):
                if child not in seen:
                    seen.add(child)
                    wake.append(child)
                    todo.append(child)
        return wake[:limit]

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
        tree=TreeView(redis, prefix=settings.key_prefix),
        ledger_retention_days=settings.ledger_retention_days,
    )
