"""admission/recent.py: the 'recent' list entries reserve.lua writes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.admission.recent import RecentDecision, format_recent, parse_recent
from budgeter.domain.policy import TenantPolicy
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z

entries = st.fixed_dictionaries(
    {
        "at_ms": st.integers(0, 2**53),
        "decision": st.sampled_from(["ADMIT", "DEFER", "REJECT"]),
        "reason": st.sampled_from(["", "rate:itpm", "exhausted:model:usd:day", "paused"]),
        "tokens": st.integers(0, 2**53),
    }
)


@given(entries)
def test_parse_inverts_format(entry: RecentDecision) -> None:
    assert parse_recent(format_recent(entry)) == entry


async def test_what_reserve_lua_writes(redis: Redis) -> None:
    await TenantStore(redis).put("acme", TenantPolicy.model_validate({"rate": {"rpm": 1}}))
    adm = Admission(redis)
    first = await adm.reserve("acme", "r1", 10, 20, now_ms=NOW)
    second = await adm.reserve("acme", "r2", 10, 20, now_ms=NOW)
    assert (first.kind, second.kind) == ("ADMIT", "DEFER")
    written = await redis.lrange(adm.keys("acme").recent, 0, -1)
    parsed = [parse_recent(str(text)) for text in written]
    assert parsed == [
        {"at_ms": NOW, "decision": "DEFER", "reason": "rate:rpm", "tokens": 30},
        {"at_ms": NOW, "decision": "ADMIT", "reason": "", "tokens": 30},
    ]
    assert [format_recent(entry) for entry in parsed] == written
