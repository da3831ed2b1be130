"""admission/pause.lua through GlobalLimits.pause (issue 21): a pause lasts its length from
Redis time, is kept where both the global view and the model's state read it, and a
shorter pause never shortens a longer one."""

from __future__ import annotations

from redis.asyncio import Redis

from budgeter.admission.global_limits import GlobalLimits
from budgeter.store.keys import global_pauses_key


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_pause_lasts_its_length_and_is_never_shortened(redis: Redis) -> None:
    limits = GlobalLimits(redis, refresh_s=0)
    before = await server_ms(redis)
    until = await limits.pause("claude-test", 30)
    after = await server_ms(redis)
    assert before + 30_000 <= until <= after + 30_000
    stored = int(await redis.hget(global_pauses_key("budgeter"), "claude-test") or 0)
    assert stored == until
    state = await redis.hget(limits.keys("claude-test").state, "paused_until")
    assert state is not None and abs(int(state) - until) <= after - before + 1
    assert await limits.pause("claude-test", 5) == until  # shorter: the longer one holds
    assert int(await redis.hget(global_pauses_key("budgeter"), "claude-test") or 0) == until
    longer = await limits.pause("claude-test", 60)
    assert longer > until
    assert int(await redis.hget(global_pauses_key("budgeter"), "claude-test") or 0) == longer
