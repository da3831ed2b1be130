"""The proxy's wait for admission, exactly (issue 21: the DEFER-wait loop of ``_admit`` was
the proxy's last mutmut survivors): a DEFER with a time sleeps until then, one that waits
for settles re-asks every ``SETTLE_WAIT_POLL_S``, no wait goes past the tenant's
``max_wait_seconds`` (none without a policy), and only an ADMIT records its wait.

The decisions are scripted (``reserve_with_fallback`` replaced) and the clock and sleep
are ProxyDeps' injected ones: a sleep moves the clock by what it was asked, so every
figure is exact and nothing here waits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.admission.decision import Decision
from budgeter.api import proxy
from budgeter.api.passthrough import BetaGate
from budgeter.api.proxy import SETTLE_WAIT_POLL_S, ProxyDeps, _admit
from budgeter.domain.policy import TenantPolicy
from budgeter.metrics import Metrics
from budgeter.queue.jobqueue import JobQueue
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import UpstreamClient
from budgeter.upstream.token_counter import TokenCounter

NOW = 1_700_000_000_000
START = 100.0  # the injected monotonic clock at the first reservation


@dataclass
class Script:
    """Scripted decisions, a clock that only sleeps move, and what was slept."""

    decisions: list[Decision]
    now: float = START
    slept: list[float] = field(default_factory=list)
    asked: int = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def reserve(self, *_: Any, model: str, **__: Any) -> tuple[Decision, str]:
        decision = self.decisions[min(self.asked, len(self.decisions) - 1)]
        self.asked += 1
        return decision, model


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def deps_for(redis: Redis, session: aiohttp.ClientSession, script: Script) -> ProxyDeps:
    upstream = UpstreamClient(session, "http://127.0.0.1:9", "unused")
    tenants = TenantStore(redis)
    return ProxyDeps(
        redis=redis,
        upstream=upstream,
        counter=TokenCounter(redis, upstream, ttl_s=0),
        admission=Admission(redis),
        queue=JobQueue(redis),
        tenants=tenants,
        metrics=Metrics(),
        prefix="budgeter",
        hold_ms=90_000,
        betas=BetaGate(None, tenants),
        clock=script.clock,
        sleep=script.sleep,
    )


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Script]:
    script = Script([])
    monkeypatch.setattr(proxy, "reserve_with_fallback", script.reserve)
    yield script


def wait_recorded(deps: ProxyDeps, tenant: str) -> tuple[float, float]:
    """The admission-wait histogram's (count, sum) for ``tenant``."""
    registry = deps.metrics.registry
    labels = {"tenant": tenant}
    count = registry.get_sample_value("budgeter_admission_wait_seconds_count", labels)
    total = registry.get_sample_value("budgeter_admission_wait_seconds_sum", labels)
    return count or 0.0, total or 0.0


async def admit(deps: ProxyDeps, tenant: str) -> Decision:
    decision, served = await _admit(deps, tenant, "r1", 10, {"max_tokens": 5}, "m")
    assert served == "m"
    return decision


async def test_a_defer_with_a_time_sleeps_until_then_and_the_admit_records_its_wait(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    await TenantStore(redis).put("aw", TenantPolicy(max_wait_seconds=10))
    scripted.decisions = [
        Decision("DEFER", NOW + 2_500, "rate:rpm", NOW),
        Decision("ADMIT", 0, "", NOW + 2_500),
    ]
    deps = deps_for(redis, session, scripted)
    decision = await admit(deps, "aw")
    assert decision.kind == "ADMIT"
    assert scripted.slept == [2.5]
    assert scripted.asked == 2
    assert wait_recorded(deps, "aw") == (1.0, 2.5)


async def test_a_defer_due_now_sleeps_a_millisecond_not_more(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    await TenantStore(redis).put("aw", TenantPolicy(max_wait_seconds=10))
    scripted.decisions = [Decision("DEFER", NOW, "rate:rpm", NOW), Decision("ADMIT", 0, "", NOW)]
    deps = deps_for(redis, session, scripted)
    assert (await admit(deps, "aw")).kind == "ADMIT"
    assert scripted.slept == [0.001]


async def test_a_defer_for_settles_re_asks_every_poll_interval(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    await TenantStore(redis).put("aw", TenantPolicy(max_wait_seconds=10))
    scripted.decisions = [
        Decision("DEFER", 0, "concurrency", NOW),
        Decision("DEFER", 0, "concurrency", NOW),
        Decision("ADMIT", 0, "", NOW),
    ]
    deps = deps_for(redis, session, scripted)
    assert (await admit(deps, "aw")).kind == "ADMIT"
    assert scripted.slept == [SETTLE_WAIT_POLL_S, SETTLE_WAIT_POLL_S]
    assert wait_recorded(deps, "aw") == (1.0, 2 * SETTLE_WAIT_POLL_S)


async def test_a_wait_that_ends_exactly_at_max_wait_is_taken_and_a_longer_one_is_not(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    await TenantStore(redis).put("aw", TenantPolicy(max_wait_seconds=2.5))
    scripted.decisions = [
        Decision("DEFER", NOW + 2_500, "rate:rpm", NOW),  # ends at exactly max_wait: waited
        Decision("DEFER", NOW + 2_501, "rate:rpm", NOW + 2_500),  # 1 ms past it: given up
    ]
    deps = deps_for(redis, session, scripted)
    decision = await admit(deps, "aw")
    assert (decision.kind, decision.until_ms) == ("DEFER", NOW + 2_501)
    assert scripted.slept == [2.5]
    assert wait_recorded(deps, "aw") == (0.0, 0.0)  # a DEFER answered: no admission wait


async def test_without_a_policy_a_defer_is_answered_at_once(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    scripted.decisions = [Decision("DEFER", NOW + 500, "rate:rpm", NOW)]
    deps = deps_for(redis, session, scripted)
    assert (await admit(deps, "nopolicy")).kind == "DEFER"
    assert scripted.slept == []
    assert scripted.asked == 1


async def test_an_admit_at_once_records_a_wait_of_zero_and_a_reject_none(
    redis: Redis, session: aiohttp.ClientSession, scripted: Script
) -> None:
    await TenantStore(redis).put("aw", TenantPolicy(max_wait_seconds=10))
    deps = deps_for(redis, session, scripted)
    scripted.decisions = [Decision("ADMIT", 0, "", NOW)]
    assert (await admit(deps, "aw")).kind == "ADMIT"
    assert wait_recorded(deps, "aw") == (1.0, 0.0)
    scripted.decisions, scripted.asked = [Decision("REJECT", 0, "exhausted:daily", NOW)], 0
    assert (await admit(deps, "aw")).kind == "REJECT"
    assert wait_recorded(deps, "aw") == (1.0, 0.0)
    assert scripted.slept == []
