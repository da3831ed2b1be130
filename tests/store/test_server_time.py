"""store/server_time.py: Redis TIME in ms, computed exactly as the Lua scripts do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from budgeter.store.server_time import server_time_ms, time_reply_ms

# lib/periods.lua's server_now on a TIME reply given as arguments
LUA_NOW = "return tonumber(ARGV[1]) * 1000 + math.floor(tonumber(ARGV[2]) / 1000)"


@given(st.integers(0, 2**40), st.integers(0, 999_999))
def test_reply_to_ms(seconds: int, micros: int) -> None:
    assert time_reply_ms((seconds, micros)) == seconds * 1000 + micros // 1000
    assert time_reply_ms([str(seconds), str(micros)]) == time_reply_ms([seconds, micros])


async def test_the_same_ms_as_lua(redis: Redis) -> None:
    for seconds, micros in [(0, 0), (1_764_201_600, 999_999), (1_764_201_600, 1_000), (7, 999)]:
        lua = await redis.eval(LUA_NOW, 0, seconds, micros)
        assert time_reply_ms((seconds, micros)) == int(lua)


async def test_server_time_ms_is_the_servers_clock(redis: Redis) -> None:
    before = time_reply_ms(await redis.time())
    now = await server_time_ms(redis)
    after = time_reply_ms(await redis.time())
    assert before <= now <= after
