"""Usage along the organisation tree: a tenant's own totals per period, each direct
child's, each API key's, and the rollup of its whole subtree.

A tenant's *totals* come from its own records: the usage hash settle.lua writes
(``<period>:<period id>:<model>:<kind>``, for ``day``, ``month`` and ``total``) and the
reservations in flight (``resv``: input + max_tokens, and the dollars reserved). The
rollup reads the same records of every descendant (breadth first, nearest first, at most
``max_descendants`` of them; ``capped`` says when some were left out) and sums them.

Every request is charged in its tenant's scope and in each ancestor's
(budgeter/admission/admission.py), so a tenant's records already hold its descendants'
usage: :data:`COUNTERS_INCLUDE_DESCENDANTS` is True, and in the rollup each tenant
contributes its records minus its direct children's, so the sum counts every request once
and equals the tenant's own totals (a check of the two ways of counting).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from budgeter.domain.periods import period_of
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.credentials import KeyStore
from budgeter.tenants.key_usage import read_key_totals
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import (
    ChildUsage,
    KeyUsage,
    PeriodTotals,
    Rollup,
    UsageAnswer,
    tenant_usage,
)

COUNTERS_INCLUDE_DESCENDANTS = True
"""Whether a tenant's usage records already hold its descendants' usage (see the module)."""
MAX_DESCENDANTS = 1000
"""How many descendants one rollup reads at most."""
TOTAL_PERIODS = ("day", "month", "total")
"""The periods settle.lua records usage for."""
READ_CHUNK = 100
"""Tenants read per pipeline."""
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")
KEYS_NOTE = (
    "each key's usage is what was charged to it (budgeter/tenants/key_usage.py); the "
    "tenant's totals hold every key's and its descendants'"
)

_Sums = dict[str, list[float]]  # period -> [requests, used, reserved, usd_used, usd_reserved]


def _empty() -> _Sums:
    return {period: [0.0] * 5 for period in TOTAL_PERIODS}


def _sums_of(usage: Mapping[str, str], reservations: Iterable[str], now_ms: int) -> _Sums:
    """One tenant's records summed per period of ``TOTAL_PERIODS`` (the current ones)."""
    wanted = {period: period_of(period, now_ms)[0] for period in TOTAL_PERIODS}
    sums = _empty()
    for field, value in usage.items():
        period, pid, rest = field.split(":", 2)
        kind = rest.rpartition(":")[2]
        if wanted.get(period) != pid:
            continue
        row = sums[period]
        if kind == "requests":
            row[0] += int(value)
        elif kind in TOKEN_KINDS:
            row[1] += int(value)
        elif kind == "usd":
            row[3] += float(value)
    for raw in reservations:
        try:
            resv = json.loads(raw)
            tokens, at_ms, usd = int(resv["i"]) + int(resv["o"]), int(resv["t"]), resv.get("u")
        except (ValueError, KeyError, TypeError):
            continue
        for period, pid in wanted.items():
            if period_of(period, at_ms)[0] == pid:
                sums[period][2] += tokens
                sums[period][4] += float(usd or 0)
    return sums


def _add(into: _Sums, other: _Sums, sign: int = 1) -> None:
    for period, row in other.items():
        target = into[period]
        for i, value in enumerate(row):
            target[i] += sign * value


def _totals(sums: _Sums, now_ms: int) -> list[PeriodTotals]:
    return [
        PeriodTotals(
            period=period,
            period_id=period_of(period, now_ms)[0],
            requests=int(row[0]),
            used=int(row[1]),
            reserved=int(row[2]),
            usd_used=round(max(0.0, row[3]), 6),
            usd_reserved=round(max(0.0, row[4]), 6),
        )
        for period, row in sums.items()
    ]


async def read_sums(
    redis: RedisClient, tenants: list[str], *, prefix: str, now_ms: int
) -> dict[str, _Sums]:
    """Each tenant's own records summed per period (pipelines of ``READ_CHUNK``)."""
    out: dict[str, _Sums] = {}
    for start in range(0, len(tenants), READ_CHUNK):
        chunk = tenants[start : start + READ_CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for tenant in chunk:
                keys = TenantKeys.of(prefix, tenant)
                pipe.hgetall(keys.usage)
                pipe.hvals(keys.resv)
            replies = await pipe.execute()
        for n, tenant in enumerate(chunk):
            usage, resv = replies[2 * n], replies[2 * n + 1]
            out[tenant] = _sums_of(dict(usage), [str(r) for r in resv], now_ms)
    return out


def subtree(below: Mapping[str, list[str]], tenant: str, cap: int) -> tuple[list[str], int]:
    """(``tenant`` and its first ``cap`` descendants breadth first, how many descendants
    there are in all)."""
    members, level, seen, count = [tenant], [tenant], {tenant}, 0
    while level:
        following: list[str] = []
        for node in level:
            for child in below.get(node, ()):
                if child in seen:
                    continue
                seen.add(child)
                count += 1
                following.append(child)
                if len(members) - 1 < cap:
                    members.append(child)
        level = following
    return members, count


def _rollup(
    below: Mapping[str, list[str]], sums: Mapping[str, _Sums], members: Iterable[str]
) -> _Sums:
    """The members' records summed (each counted once, see the module)."""
    total = _empty()
    for member in members:
        _add(total, sums[member])
        if COUNTERS_INCLUDE_DESCENDANTS:
            for child in below.get(member, ()):
                if child in sums:
                    _add(total, sums[child], -1)
    return total


async def usage_report(
    redis: RedisClient,
    tenant: str,
    *,
    prefix: str = "budgeter",
    now_ms: int,
    max_descendants: int = MAX_DESCENDANTS,
) -> UsageAnswer | None:
    """:func:`~budgeter.tenants.usage.tenant_usage` with the tree fields: ``parent``,
    ``totals``, ``children``, ``keys`` and ``rollup``. None when the tenant has no policy."""
    report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
    if report is None:
        return None
    parents = await TenantStore(redis, prefix=prefix).parents()
    below: dict[str, list[str]] = {}
    for child, parent in sorted(parents.items()):
        if parent is not None:
            below.setdefault(parent, []).append(child)
    members, descendants = subtree(below, tenant, max(0, max_descendants))
    sums = await read_sums(redis, members, prefix=prefix, now_ms=now_ms)
    children = []
    for child in below.get(tenant, ()):
        if child not in sums:
            continue  # left out by the cap
        child_members, child_below = subtree(below, child, len(members))
        read = [m for m in child_members if m in sums]
        children.append(
            ChildUsage(
                tenant=child,
                descendants=child_below,
                totals=_totals(sums[child], now_ms),
                rollup=_totals(_rollup(below, sums, read), now_ms),
            )
        )
    stored_keys = await KeyStore(redis, prefix=prefix).list_keys(tenant)
    per_key = await read_key_totals(
        redis, tenant, [str(k["id"]) for k in stored_keys], prefix=prefix, now_ms=now_ms
    )
    keys = [
        KeyUsage(
            id=str(key["id"]),
            name=key.get("name"),
            hint=str(key.get("hint", "")),
            created_at_ms=int(key["created_at_ms"]),
            last_used_at_ms=key.get("last_used_at_ms"),
            usage=per_key.get(str(key["id"])),
        )
        for key in stored_keys
    ]
    return report.model_copy(
        update={
            "parent": parents.get(tenant),
            "totals": _totals(sums[tenant], now_ms),
            "children": children,
            "keys": keys,
            "keys_note": KEYS_NOTE if keys else None,
            "rollup": Rollup(
                tenants=len(members),
                descendants=descendants,
                capped=len(members) - 1 < descendants,
                counters_include_descendants=COUNTERS_INCLUDE_DESCENDANTS,
                totals=_totals(_rollup(below, sums, members), now_ms),
            ),
        }
    )
