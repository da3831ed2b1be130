"""Hierarchical fair share (issue 17, item 4): weights are shares among siblings
(sched/pick.lua with lib/hfq.lua), against a real Redis. The clock is passed in."""

from __future__ import annotations

from collections import Counter

from redis.asyncio import Redis

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000
LEASE = 30_000


def jobs(n: int) -> list[NewJob]:
    return [NewJob(f"r{i}", {"model": "m", "max_tokens": 8, "messages": []}) for i in range(n)]


async def two_orgs(redis: Redis, big: int = 10) -> JobQueue:
    store = TenantStore(redis)
    await store.put("orga", TenantPolicy(weight=1))
    await store.put("orgb", TenantPolicy(weight=1))
    for i in range(big):
        await store.put(f"a{i}", TenantPolicy(weight=1, parent="orga"))
    await store.put("b0", TenantPolicy(weight=1, parent="orgb"))
    queue = JobQueue(redis)
    for i in range(big):
        await queue.submit(f"a{i}", f"ba{i}", jobs(200))
    await queue.submit("b0", "bb0", jobs(2000))
    return queue


async def served(
    queue: JobQueue, picks: int, *, sizes: dict[str, int] | None = None
) -> Counter[str]:
    """Tokens served per tenant over ``picks`` picks of 10 slots (jobs of ``sizes`` tokens,
    1000 by default, reported back to the scheduler)."""
    tokens: Counter[str] = Counter()
    report: dict[str, tuple[int, int]] = {}
    for _ in range(picks):
        got = await queue.pick_many(10, lease_ms=LEASE, now_ms=NOW, served=report)
        report = {}
        for job in got.jobs:
            size = (sizes or {}).get(job.tenant, 1000)
            tokens[job.tenant] += size
            t, n = report.get(job.tenant, (0, 0))
            report[job.tenant] = (t + size, n + 1)
    return tokens


def org_a(tokens: Counter[str]) -> int:
    return sum(v for t, v in tokens.items() if t.startswith("a"))


async def test_two_orgs_split_fifty_fifty_and_ten_equal_shares_inside(redis: Redis) -> None:
    queue = await two_orgs(redis)
    tokens = await served(queue, 100)
    total = sum(tokens.values())
    assert abs(org_a(tokens) / total - 0.5) <= 0.05
    for i in range(10):
        assert abs(tokens[f"a{i}"] / org_a(tokens) - 0.1) <= 0.05 * 0.1


async def test_the_split_is_of_tokens_not_jobs(redis: Redis) -> None:
    queue = await two_orgs(redis)
    await served(queue, 20, sizes={"b0": 4000})  # the scheduler learns b0's job size
    tokens = await served(queue, 100, sizes={"b0": 4000})
    assert abs(org_a(tokens) / sum(tokens.values()) - 0.5) <= 0.05


async def test_a_reparent_takes_effect(redis: Redis) -> None:
    queue = await two_orgs(redis)
    await served(queue, 20)
    store = TenantStore(redis)  # half of orga moves under orgb: 5 against 6
    for i in range(5):
        await store.put(f"a{i}", TenantPolicy(weight=1, parent="orgb"))
    tokens = await served(queue, 110)
    total = sum(tokens.values())
    assert abs(sum(tokens[f"a{i}"] for i in range(5, 10)) / total - 0.5) <= 0.05
    for moved in [*(f"a{i}" for i in range(5)), "b0"]:  # six equal shares of orgb's half
        assert abs(tokens[moved] / total - 1 / 12) <= 0.05 / 12


async def test_without_parents_weights_are_flat(redis: Redis) -> None:
    store = TenantStore(redis)
    for t in ("x", "y", "z"):
        await store.put(t, TenantPolicy(weight=2 if t == "x" else 1))
    queue = JobQueue(redis)
    for t in ("x", "y", "z"):
        await queue.submit(t, f"b{t}", jobs(500))
    assert await redis.hlen(queue.sched.parent) == 0
    tokens = await served(queue, 40)
    assert tokens["x"] == 2 * tokens["y"] == 2 * tokens["z"]
    assert await redis.hlen(queue.sched.hfq + "|v") == 0  # the flat path: no level advanced


async def test_a_parents_own_work_counts_as_one_child_of_weight_one(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("org", TenantPolicy(weight=1))
    await store.put("kid", TenantPolicy(weight=3, parent="org"))
    queue = JobQueue(redis)
    await queue.submit("org", "bo", jobs(500))
    await queue.submit("kid", "bk", jobs(500))
    tokens = await served(queue, 40)
    assert tokens["kid"] == 3 * tokens["org"]


async def test_every_level_keeps_its_virtual_time_and_clock(redis: Redis) -> None:
    queue = await two_orgs(redis, big=1)
    got = await queue.pick_many(1, lease_ms=LEASE, now_ms=NOW)
    tenant = got.jobs[0].tenant
    org = "orga" if tenant == "a0" else "orgb"
    times = {k: float(v) for k, v in (await redis.hgetall(queue.sched.hfq + "|v")).items()}
    for node, member in (("", org), (org, tenant), (tenant, tenant)):
        assert times[f"{node}|{member}"] == await redis.zscore(f"{queue.sched.hfq}:{node}", member)
        assert times[f"{node}|"] == 0.0  # the level's clock: the time before the pick


async def test_drained_tenants_leave_and_the_rest_share(redis: Redis) -> None:
    store = TenantStore(redis)
    await store.put("org", TenantPolicy(weight=1))
    for kid in ("k1", "k2", "k3"):
        await store.put(kid, TenantPolicy(weight=1, parent="org"))
    queue = JobQueue(redis)
    await queue.submit("k1", "b1", jobs(3))
    await queue.submit("k2", "b2", jobs(50))
    await queue.submit("k3", "b3", jobs(50))
    tokens = await served(queue, 9)  # k1 drains after 3; then 45 left for k2 and k3
    assert tokens["k1"] == 3000 and tokens["k2"] + tokens["k3"] >= 85_000
    assert abs(tokens["k2"] - tokens["k3"]) <= 1000
    tokens += await served(queue, 3)  # everything drains: the tree empties, no error
    assert tokens == {"k1": 3000, "k2": 50_000, "k3": 50_000}
    assert await redis.zcard(queue.sched.hfq + ":") <= 1
    assert (await queue.pick_many(5, lease_ms=LEASE, now_ms=NOW)).jobs == []


async def test_a_parked_tenant_comes_back_under_its_parent_and_probes(redis: Redis) -> None:
    queue = await two_orgs(redis)
    got = await queue.pick_many(20, lease_ms=LEASE, now_ms=NOW)
    b0 = next(job for job in got.jobs if job.tenant == "b0")
    await queue.defer(b0, NOW + 1_000)
    while_parked = await served(queue, 10)
    assert "b0" not in while_parked
    tokens: Counter[str] = Counter()
    for _ in range(60):
        picked = await queue.pick_many(10, lease_ms=LEASE, now_ms=NOW + 1_000)
        for job in picked.jobs:
            tokens[job.tenant] += 1000
            if job.probe:
                await queue.end_probe(job.tenant, decided=True)
    assert tokens["b0"] >= 0.4 * sum(tokens.values())
