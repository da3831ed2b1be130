"""The scopes of admission and the Redis keys each script call is given: a tenant's, an
API key's limits (``KeyScopeKeys``, in its tenant's slot), an ancestor tenant's, and one
model's of the upstream account. A request's chain after its tenant's own scope is a
sequence of :class:`ChainScope`."""

from __future__ import annotations

from dataclasses import dataclass

from budgeter.admission.reasons import KEY_PREFIX, scope_prefix
from budgeter.store.keys import GlobalModelKeys, KeyScopeKeys, TenantKeys

Scope = TenantKeys | KeyScopeKeys | GlobalModelKeys
"""An admission scope: a tenant's keys, an API key's, or one model's of the upstream account."""


@dataclass(frozen=True, slots=True)
class ChainScope:
    """A scope a request reserves in after its tenant's: an API key's limits or an ancestor."""

    keys: TenantKeys | KeyScopeKeys
    policy: str  # reserve.lua's ARGV[2]: '' (an ancestor: no policy = unknown), '-' (a key)
    prefix: str  # what names it in a refusal's reason

    @classmethod
    def ancestor(cls, prefix: str, tenant: str) -> ChainScope:
        return cls(TenantKeys.of(prefix, tenant), "", scope_prefix(tenant))

    @classmethod
    def api_key(cls, prefix: str, tenant: str, key: str) -> ChainScope:
        return cls(KeyScopeKeys(prefix, tenant, key), "-", KEY_PREFIX)


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


def settle_keys(keys: Scope, *, ledger: bool = False) -> tuple[str, ...]:
    """settle.lua's KEYS; ``ledger``: the tenant's own scope, which also passes its ledger
    stream (KEYS[9]) and its per-minute rollups (KEYS[10]), so they are written once per
    request (never by a key's, an ancestor's or the account's scope)."""
    names = (
        keys.buckets,
        keys.budget,
        keys.resv,
        keys.resv_deadline,
        keys.resv_sent,
        keys.usage,
        keys.state,
        keys.outbox,
    )
    if ledger and isinstance(keys, TenantKeys):
        return (*names, keys.ledger, keys.minutes)
    return names
