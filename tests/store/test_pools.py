"""Connection pools sized for high concurrency: callers wait for a free Redis connection
instead of failing, and the upstream session allows the configured calls in flight."""

from __future__ import annotations

import asyncio
from typing import Any

from budgeter.serving import upstream_session
from budgeter.settings import Settings
from budgeter.store.client import make_redis


async def test_more_concurrent_commands_than_connections_wait_instead_of_failing(
    redis_url: str,
) -> None:
    client = make_redis(redis_url, max_connections=4)
    try:
        # each BLPOP holds its connection for 50 ms: 40 of them need to queue for 4
        replies = await asyncio.gather(
            *(client.blpop([f"pool-test-{i}"], timeout=0.05) for i in range(40))
        )
        assert replies == [None] * 40
        pool = client.connection_pool
        assert pool.max_connections == 4
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
    finally:
        await client.aclose()


async def test_the_upstream_session_allows_the_configured_calls_in_flight() -> None:
    settings = Settings(upstream_max_connections=2500)
    async with upstream_session(settings) as session:
        assert session.connector is not None
        assert session.connector.limit == 2500
        assert session.connector.limit_per_host == 2500


def count_calls(owner: Any, name: str) -> list[int]:
    """Wrap ``owner.<name>`` so that its calls are counted (in the one-item list returned)."""
    real = getattr(owner, name)
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(owner, name, counting)
    return calls


async def test_concurrent_script_calls_share_pipelines_and_keep_their_own_answers(
    redis: Any,
) -> None:
    from redis.exceptions import ResponseError

    from budgeter.store.scripts import PipelinedScript

    script = PipelinedScript(redis, redis.register_script("return tonumber(ARGV[1]) * 2"))
    pipelines = count_calls(redis, "pipeline")
    await script(keys=[], args=[0])  # loads it (a lone call goes on its own)
    answers = await asyncio.gather(*(script(keys=[], args=[i]) for i in range(200)))
    assert answers == [2 * i for i in range(200)]
    assert 1 <= pipelines[0] <= 3  # 200 calls, a few round trips
    # after a SCRIPT FLUSH (a Redis restart), every call still gets its answer
    await redis.script_flush()
    answers = await asyncio.gather(*(script(keys=[], args=[i]) for i in range(20)))
    assert answers == [2 * i for i in range(20)]
    # an error is its caller's alone
    results = await asyncio.gather(
        script(keys=[], args=[1]), script(keys=[], args=["x"]), return_exceptions=True
    )
    assert results[0] == 2 and isinstance(results[1], ResponseError)


async def test_concurrent_decisions_of_a_tenant_share_one_script_call_and_one_pipeline(
    redis: Any,
) -> None:
    """40 coroutines reserving for one tenant and 40 for another, in the same event-loop
    round: one admission/reserve.lua call per tenant, both in one pipeline, every answer its own;
    then 80 settles the same way, and the counters are those of 80 separate calls. A
    group of 48 or more goes in two halves, one round apart (the two overlap with Redis)."""
    from budgeter.admission.admission import Admission, Usage
    from budgeter.domain.policy import TenantPolicy
    from budgeter.tenants.store import TenantStore

    for tenant in ("ta", "tb"):
        await TenantStore(redis).put(tenant, TenantPolicy(budgets={"day": 10**9}))
    admission = Admission(redis)
    script_calls = count_calls(admission._reserve.script, "submit")
    pipelines = count_calls(redis, "pipeline")
    asks = [(t, f"{t}-{i}") for t in ("ta", "tb") for i in range(40)]
    decisions = await asyncio.gather(
        *(admission.reserve(t, rid, 100, 10, model="m", now_ms=10**12) for t, rid in asks)
    )
    assert [d.kind for d in decisions] == ["ADMIT"] * 80
    assert (script_calls[0], pipelines[0]) == (2, 1)
    results = await asyncio.gather(
        *(admission.settle(t, rid, Usage(100, 5), now_ms=10**12) for t, rid in asks)
    )
    assert [r.settled for r in results] == [1] * 80
    assert sum(r.waiting_settle for r in results) == 0
    for tenant in ("ta", "tb"):
        budget = await redis.hgetall(f"budgeter:{{t:{tenant}}}:budget")
        assert (budget["day:used"], budget["day:reserved"]) == ("4200", "0")
    script_calls[0] = pipelines[0] = 0
    decisions = await asyncio.gather(
        *(admission.reserve("ta", f"big-{i}", 1, 1, model="m", now_ms=10**12) for i in range(60))
    )
    assert [d.kind for d in decisions] == ["ADMIT"] * 60
    assert (script_calls[0], pipelines[0]) == (2, 2)  # 30 now, 30 a round later
