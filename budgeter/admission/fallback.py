"""Fallback instead of refusal, by opt-in (issue 17 item 6).

A tenant policy's ``fallback_models`` (``{"claude-opus-4-5": "claude-sonnet-4-5"}``) lets a
request refused ONLY because a budget cannot hold it be admitted once as the fallback
model. A budget refusal is a reason of kind ``exhausted`` (a REJECT, or the DEFER of
``on_exhausted: wait``) or ``too_large:budget:...``, of tokens or USD, of the tenant's own
policy, of one of its models (``m:<model>:``) or of an ancestor (``parent:<id>:``). Rates,
concurrency, in-flight budgets, allowed_models, an API key's limits and the upstream
account's (``global:``) never fall back.

The second reservation uses the same id and the same input token count: a refused
reservation holds nothing (reserve.lua reserves nothing on a refusal, and a chain's later
refusal releases what the earlier scopes held), so the id is free again. When the fallback
is refused too, the original refusal is the answer. An admitted fallback answers ADMIT with
reason ``fallback`` (counted so in budgeter_admission_decisions_total) and its ``detail``
the reason that refused the model asked for.

The tenant's ``fallback_models`` are read only after a budget refusal, from its policy,
at most once a ``POLICY_CACHE_SECONDS`` per tenant and process (:class:`FallbackModels`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from budgeter.admission.admission import Admission, Decision
from budgeter.tenants.store import TenantStore

FALLBACK_REASON = "fallback"
FALLBACK_HEADER = "budgeter-fallback-model"  # the proxy's answer: the model that served
POLICY_CACHE_SECONDS = 1.0  # a policy's fallback_models are re-read at most this often

Fallbacks = Mapping[str, str] | Callable[[], Awaitable[Mapping[str, str]]]
"""The tenant's fallback_models, or a coroutine function answering them (called only
after a budget refusal)."""


def is_budget_refusal(decision: Decision) -> bool:
    """True when ``decision`` refuses only because a budget cannot hold the request."""
    if decision.kind == "ADMIT":
        return False
    if decision.kind == "DEFER" and not decision.waits_for_reset:
        return False
    reason = decision.parsed_reason
    return (
        reason is not None
        and reason.kind in ("exhausted", "too_large")
        and reason.limit is not None
        and reason.limit.budget
        and not reason.account
        and not reason.key
    )


async def reserve_with_fallback(
    admission: Admission,
    tenant: str,
    rid: str,
    input_tokens: int,
    max_tokens: int,
    *,
    model: str,
    fallback_models: Fallbacks,
    hold_ms: int = 90_000,
    now_ms: int | None = None,
    sent_at_once: bool = False,
    key: str | None = None,
    meta: Mapping[str, object] | None = None,
) -> tuple[Decision, str]:
    """:meth:`Admission.reserve`, then once as ``fallback_models[model]`` when the first
    answer is a budget refusal. Answers the decision and the model that will be served."""

    async def once(as_model: str) -> Decision:
        return await admission.reserve(
            tenant,
            rid,
            input_tokens,
            max_tokens,
            model=as_model,
            hold_ms=hold_ms,
            now_ms=now_ms,
            sent_at_once=sent_at_once,
            key=key,
            meta=meta,
        )

    decision = await once(model)
    if not is_budget_refusal(decision):
        return decision, model
    fallbacks = fallback_models if isinstance(fallback_models, Mapping) else await fallback_models()
    fallback = fallbacks.get(model)
    if not fallback or fallback == model:
        return decision, model
    second = await once(fallback)
    if second.kind != "ADMIT":
        return decision, model
    return replace(second, reason=FALLBACK_REASON, detail=decision.reason), fallback


def as_served(params: dict[str, Any], served: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The params to call the upstream with (``params`` themselves unless ``served`` is a
    fallback) and budgeter's answer headers (``budgeter-fallback-model`` then)."""
    if params["model"] == served:
        return params, {}
    return {**params, "model": served}, {FALLBACK_HEADER: served}


class FallbackModels:
    """The tenants' ``fallback_models``, read from their policies (``TenantStore.get``) at
    most once a ``POLICY_CACHE_SECONDS`` per tenant."""

    def __init__(
        self, tenants: TenantStore, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tenants = tenants
        self._clock = clock
        self._cached: dict[str, tuple[dict[str, str], float]] = {}

    async def of(self, tenant: str) -> dict[str, str]:
        now = self._clock()
        cached = self._cached.get(tenant)
        if cached is not None and cached[1] > now:
            return cached[0]
        policy = await self.tenants.get(tenant)
        found = dict(policy.fallback_models) if policy is not None else {}
        if len(self._cached) > 10_000:
            self._cached.clear()
        self._cached[tenant] = (found, now + POLICY_CACHE_SECONDS)
        return found

    def lookup(self, tenant: str) -> Callable[[], Awaitable[Mapping[str, str]]]:
        """The lazy ``fallback_models`` argument of :func:`reserve_with_fallback`."""

        async def read() -> Mapping[str, str]:
            return await self.of(tenant)

        return read


_BY_STORE: weakref.WeakKeyDictionary[TenantStore, FallbackModels] = weakref.WeakKeyDictionary()


def fallback_models_of(tenants: TenantStore) -> FallbackModels:
    """The one :class:`FallbackModels` of a process's ``TenantStore`` (worker, proxy)."""
    found = _BY_STORE.get(tenants)
    if found is None:
        found = _BY_STORE[tenants] = FallbackModels(tenants)
    return found
