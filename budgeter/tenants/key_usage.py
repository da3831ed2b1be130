"""Each API key's usage, for ``GET /admin/tenants/{t}/keys`` and ``budgeter keys list``:
read from the per-key fields settle.lua adds to the tenant's usage hash (their format's
home is budgeter/ledger/entry.py, ``parse_key_usage_field``) and from the tenant's
reservations in flight whose ledger meta names the key (``"x": {"k": <key id>}``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from budgeter.domain.periods import period_of
from budgeter.ledger.entry import parse_key_usage_field
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.usage import PeriodTotals

if TYPE_CHECKING:
    from budgeter.api.schemas import KeyList
    from budgeter.tenants.credentials import KeyStore

PERIODS = ("day", "month", "total")  # the periods settle.lua records usage for
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")

_Row = list[float]  # requests, used, reserved, usd_used, usd_reserved


def key_totals(
    usage: Mapping[str, str],
    reservations: Iterable[str],
    key_ids: Iterable[str],
    now_ms: int,
) -> dict[str, list[PeriodTotals]]:
    """key id -> its totals for the current day, month and total (every key of
    ``key_ids``, zeros when nothing was charged to it)."""
    wanted = {period: period_of(period, now_ms)[0] for period in PERIODS}
    rows: dict[str, dict[str, _Row]] = {
        key: {period: [0.0] * 5 for period in PERIODS} for key in key_ids
    }
    for field, value in usage.items():
        parsed = parse_key_usage_field(field)
        if (
            parsed is None
            or parsed.key not in rows
            or wanted.get(parsed.period) != parsed.period_id
        ):
            continue
        row = rows[parsed.key][parsed.period]
        if parsed.kind == "requests":
            row[0] += int(value)
        elif parsed.kind in TOKEN_KINDS:
            row[1] += int(value)
        else:
            row[3] += float(value)
    for raw in reservations:
        try:
            resv = json.loads(raw)
            key = resv.get("x", {}).get("k")
            tokens, at_ms, usd = int(resv["i"]) + int(resv["o"]), int(resv["t"]), resv.get("u")
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if key not in rows:
            continue
        for period, pid in wanted.items():
            if period_of(period, at_ms)[0] == pid:
                rows[key][period][2] += tokens
                rows[key][period][4] += float(usd or 0)
    return {
        key: [
            PeriodTotals(
                period=period,
                period_id=wanted[period],
                requests=int(row[0]),
                used=int(row[1]),
                reserved=int(row[2]),
                usd_used=round(max(0.0, row[3]), 6),
                usd_reserved=round(max(0.0, row[4]), 6),
            )
            for period, row in periods.items()
        ]
        for key, periods in rows.items()
    }


async def read_key_totals(
    redis: RedisClient, tenant: str, key_ids: list[str], *, prefix: str, now_ms: int
) -> dict[str, list[PeriodTotals]]:
    """:func:`key_totals` of the tenant's records (one pipeline, the tenant's slot)."""
    if not key_ids:
        return {}
    keys = TenantKeys.of(prefix, tenant)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.usage)
        pipe.hvals(keys.resv)
        usage, resv = await pipe.execute()
    text = {_text(k): _text(v) for k, v in dict(usage).items()}
    return key_totals(text, [_text(r) for r in resv], key_ids, now_ms)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def key_list(store: KeyStore, tenant: str, *, now_ms: int) -> KeyList:
    """The tenant's keys (never a key nor its hash) with each one's limits and usage."""
    from budgeter.api.schemas import KeyInfo, KeyList

    stored = await store.list_keys(tenant)
    usage = await read_key_totals(
        store.redis, tenant, [str(k["id"]) for k in stored], prefix=store.prefix, now_ms=now_ms
    )
    return KeyList(
        data=[KeyInfo.model_validate(k | {"usage": usage.get(str(k["id"]))}) for k in stored]
    )
