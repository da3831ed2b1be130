"""``anthropic-ratelimit-*`` headers computed from a tenant's GCRA buckets.

A bucket of ``limit`` per minute stores its theoretical arrival time (TAT): it holds
``(TAT - now)`` ms of debt, i.e. ``(TAT - now) / (60000 / limit)`` units in use. Remaining
is the rest of the limit; reset is the moment the bucket is full again (RFC 3339).
"""

from __future__ import annotations

import math

from budgeter.admission.admission import format_ms
from budgeter.domain.policy_fields import LimitField, format_field
from budgeter.store.keys import TenantKeys
from budgeter.store.server_time import server_time_ms
from budgeter.store.types import RedisClient

_NAMES = {"rpm": "requests", "itpm": "input-tokens", "otpm": "output-tokens"}


def bucket_state(limit: int, tat_ms: float | None, now_ms: int) -> tuple[int, int]:
    """(remaining, reset ms) of a bucket."""
    debt_ms = max(0.0, (tat_ms or now_ms) - now_ms)
    in_use = math.ceil(debt_ms / (60_000 / limit) - 1e-9)
    return max(0, limit - in_use), now_ms + math.ceil(debt_ms)


def ratelimit_headers(policy: dict[str, str], tats: dict[str, str], now_ms: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    tokens: list[tuple[int, int, int]] = []  # (remaining, limit, reset) of token buckets
    for kind, name in _NAMES.items():
        raw_limit = policy.get(format_field(LimitField("rate", kind)))
        if raw_limit is None:
            continue
        limit = int(raw_limit)
        tat = tats.get(kind)
        remaining, reset = bucket_state(limit, float(tat) if tat else None, now_ms)
        headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
        headers[f"anthropic-ratelimit-{name}-reset"] = format_ms(reset)
        if kind != "rpm":
            tokens.append((remaining, limit, reset))
    if tokens:  # the most restrictive token limit in effect
        remaining, limit, reset = min(tokens)
        headers["anthropic-ratelimit-tokens-limit"] = str(limit)
        headers["anthropic-ratelimit-tokens-remaining"] = str(remaining)
        headers["anthropic-ratelimit-tokens-reset"] = format_ms(reset)
    return headers


async def tenant_ratelimit_headers(
    redis: RedisClient, keys: TenantKeys, *, now_ms: int | None = None
) -> dict[str, str]:
    """Read policy and buckets in one round trip and build the headers. ``now_ms`` is the
    Redis time of a decision just taken; without it Redis TIME is asked separately (a
    keyless command cannot join a pipeline on Redis Cluster)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.policy)
        pipe.hgetall(keys.buckets)
        policy, tats = await pipe.execute()
    if now_ms is None:
        now_ms = await server_time_ms(redis)
    return ratelimit_headers(policy, tats, now_ms)
