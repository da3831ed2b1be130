"""Fallback instead of refusal through a real worker (issue 17 item 6): a team whose
division's budget for the big model runs out gets its remaining batch jobs served as the
team's fallback model; each result's message names the model that served; the division's
budget for the big model holds; the decisions are counted with reason ``fallback``."""

from __future__ import annotations

from collections import Counter

from redis.asyncio import Redis

from budgeter.admission.fallback import FALLBACK_REASON
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import running_worker

OPUS, SONNET = "claude-opus-4-5", "claude-sonnet-4-5"
DIVISION_OPUS_DAY = 400  # a few jobs' worth (each ~20 input + 64 max_tokens)


async def test_an_ancestors_model_budget_sends_the_rest_of_a_batch_to_the_fallback(
    redis: Redis,
) -> None:
    tenants = TenantStore(redis)
    await tenants.put(
        "division-f", TenantPolicy(models={OPUS: {"budgets": {"day": DIVISION_OPUS_DAY}}})
    )
    await tenants.put("team-f", TenantPolicy(parent="division-f", fallback_models={OPUS: SONNET}))
    store = BatchStore(redis)
    async with running_worker(redis, concurrency=1) as (worker, _url):
        batch_id = await store.create("team-f", requests_for("f", 12, model=OPUS))
        await wait_ended(store, [batch_id])
        decisions = {
            (sample.labels["decision"], sample.labels["reason"]): sample.value
            for family in worker.metrics.decisions.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["tenant"] == "team-f"
        }
    lines = [line async for line in store.results(batch_id)]
    assert {line["result"]["type"] for line in lines} == {"succeeded"}  # none refused
    served = Counter(line["result"]["message"]["model"] for line in lines)
    assert served[OPUS] > 0 and served[SONNET] > 0, served
    assert sum(served.values()) == 12
    assert decisions.get(("ADMIT", FALLBACK_REASON), 0) == served[SONNET], decisions

    usage = await redis.hgetall(TenantKeys.of("budgeter", "division-f").budget)
    opus_used = sum(
        int(v) for k, v in usage.items() if str(k).startswith(f"m:{OPUS}:") and "used" in str(k)
    )
    assert 0 < opus_used <= DIVISION_OPUS_DAY, usage
