"""Row — hierarchical fair share (issue 17, item 4), on the scheduler itself.

1. Two organisations of equal weight, one with 10 backlogged tenants and one with 1:
   tokens leased by ``JobQueue.pick_many`` (sched/pick.lua with lib/hfq.lua; every job
   1,000 tokens, reported back as a worker does) split 50/50.
2. Inside the big organisation: 10 equal shares.
3. Time per ``JobQueue.pick`` with 10,000 backlogged tenants in a tree (100 organisations
   of 99 tenants, 2 levels below the root) vs 1 tenant (no tree), and vs 10 tenants in a
   tree of the same shape (1 organisation of 9), in alternating blocks of the same run;
   beside each, Redis commands per pick (INFO commandstats, the commands scripts run
   included).

The 10,000 tenants' policies and tree are written in bulk (:func:`bulk_put`, the keys
``TenantStore.put`` writes): put checks each new tenant against the whole tree it reads
first, which for 10,000 tenants one by one takes minutes.

    .venv/bin/python bench/bench_tree_fairness.py [--quick] [--tenants 10000]
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench_queue_scale import gather_chunked, params, pick_block
from common import Options, Row, redis_server, run_standalone

from budgeter.domain.policy import TenantPolicy
from budgeter.queue.jobqueue import JobQueue, NewJob
from budgeter.store.keys import SchedKeys, TenantKeys, tree_parents_key, tree_version_key
from budgeter.store.scripts import register
from budgeter.tenants.store import TenantStore

BULK = 500  # tenants per pipeline (and per tree_set.lua call) of bulk_put


async def split(redis: Any, picks: int) -> Counter[str]:
    store = TenantStore(redis, prefix="split")
    queue = JobQueue(redis, prefix="split")
    await store.put("orga", TenantPolicy())
    await store.put("orgb", TenantPolicy())
    names = [*(f"a{i}" for i in range(10)), "b0"]
    for name in names:
        await store.put(name, TenantPolicy(parent="orga" if name[0] == "a" else "orgb"))
        count = picks * 10 if name == "b0" else picks
        await queue.submit(name, "b", [NewJob(f"c{j}", params(j)) for j in range(count)])
    tokens: Counter[str] = Counter()
    report: dict[str, tuple[int, int]] = {}
    for _ in range(picks):
        got = await queue.pick_many(10, lease_ms=600_000, served=report)
        report = {}
        for job in got.jobs:
            tokens[job.tenant] += 1000
            t, n = report.get(job.tenant, (0, 0))
            report[job.tenant] = (t + 1000, n + 1)
    return tokens


async def bulk_put(redis: Any, prefix: str, policies: dict[str, TenantPolicy]) -> None:
    """What ``TenantStore.put`` writes for each tenant (its tree entry through
    tenants/tree_set.lua, its policy hash, the scheduler's copies of its weight and
    parent, the tenant sets), many tenants per call. Parents come before their children;
    the tree is not checked (the bench builds a valid one)."""
    tree_set = register(redis, "tenants/tree_set.lua")
    tree_keys = [tree_parents_key(prefix), tree_version_key(prefix)]
    sched = SchedKeys(prefix)
    names = list(policies)
    for start in range(0, len(names), BULK):
        chunk = names[start : start + BULK]
        version, _ = await TenantStore(redis, prefix=prefix).tree()
        ops = [x for t in chunk for x in ("set", t, policies[t].parent or "")]
        if int(await tree_set(keys=tree_keys, args=[version, *ops])) != 1:
            raise RuntimeError("the tree changed under the bench")
        async with redis.pipeline(transaction=False) as pipe:
            for t in chunk:
                policy = policies[t]
                key = TenantKeys.of(prefix, t).policy
                pipe.delete(key)
                pipe.hset(key, mapping=dict(policy.redis_fields().items()))
                pipe.hset(sched.weight, t, repr(float(policy.weight)))
                if policy.parent is not None:
                    pipe.hset(sched.parent, t, policy.parent)
            pipe.sadd(sched.tenants, *chunk)
            pipe.sadd(sched.known, *chunk)
            await pipe.execute()


async def tree_tenants(redis: Any, prefix: str, tenants: int) -> JobQueue:
    """``tenants`` backlogged tenants, 2 levels below the root: organisations of 99
    tenants (one of 9 for 10 tenants), 6,000 jobs between them (at least 2 each)."""
    store = TenantStore(redis, prefix=prefix)
    queue = JobQueue(redis, prefix=prefix)
    orgs = [f"o{k:03d}" for k in range(max(tenants // 100, 1))]
    names = [f"t{k:05d}" for k in range(tenants - len(orgs))]
    policies = {org: TenantPolicy() for org in orgs}
    policies |= {n: TenantPolicy(parent=orgs[k % len(orgs)]) for k, n in enumerate(names)}
    await bulk_put(redis, prefix, policies)
    sample = names[-1]  # what put would have stored
    assert await store.get(sample) == policies[sample]
    assert len(await store.parents()) == tenants
    each = max(2, 6_000 // len(names))
    await gather_chunked(
        [queue.submit(n, "b", [NewJob(f"c{j}", params(j)) for j in range(each)]) for n in names]
    )
    return queue


async def commands(redis: Any) -> int:
    """Commands the server has run so far (INFO commandstats; scripts' own included)."""
    stats = await redis.info("commandstats")
    return sum(int(v.get("calls", 0)) for v in stats.values() if isinstance(v, dict))


async def timed_block(redis: Any, queue: JobQueue, picks: int) -> tuple[float, int]:
    """(seconds, Redis commands) for ``picks`` picks; the INFO call's own not counted."""
    before = await commands(redis)
    took = await pick_block(queue, picks)
    return took, await commands(redis) - before - 1


async def run(opts: Options) -> list[Row]:
    tenants = int(opts.extra.get("tenants", 2_000 if opts.quick else 10_000))
    blocks, block = (6, 200) if opts.quick else (8, 250)
    async with redis_server("tree_fairness") as (_server, redis):
        tokens = await split(redis, 200)
        t_setup = time.perf_counter()
        tree = await tree_tenants(redis, "tree", tenants)
        setup_s = time.perf_counter() - t_setup
        small = await tree_tenants(redis, "small", 10)
        one = JobQueue(redis, prefix="one")
        await TenantStore(redis, prefix="one").put("solo", TenantPolicy())
        jobs = [NewJob(f"c{j}", params(j)) for j in range(blocks * block + 50)]
        await one.submit("solo", "b", jobs)
        queues = {"tree": tree, "small": small, "one": one}
        took = dict.fromkeys(queues, 0.0)
        ran = dict.fromkeys(queues, 0)
        for queue in queues.values():
            await pick_block(queue, 20)
        for _ in range(blocks):
            for name, queue in queues.items():
                seconds, count = await timed_block(redis, queue, block)
                took[name] += seconds
                ran[name] += count
    picks = blocks * block
    per = {name: took[name] / picks * 1000 for name in queues}
    cmds = {name: ran[name] / picks for name in queues}
    total = sum(tokens.values())
    big = sum(v for t, v in tokens.items() if t.startswith("a"))
    share_a = big / total
    inner = [tokens[f"a{i}"] / big for i in range(10)]
    worst = max(abs(s - 0.1) / 0.1 for s in inner)
    return [
        Row(
            "tree_fairness",
            "tokens served: org of 10 backlogged tenants vs org of 1, equal weights",
            100 * share_a,
            "% to the big org",
            50.0,
            "equal shares",
            share_a / 0.5,
            "50 % ± 5 %",
            abs(share_a - 0.5) <= 0.05,
            note=f"{total:,} tokens over 200 picks of 10 slots; 1,000 tokens per job",
        ),
        Row(
            "tree_fairness",
            "inside the big org: 10 equal shares, worst tenant's deviation",
            100 * worst,
            "% of a tenth",
            0.0,
            "exact tenth",
            None,
            "≤ 5 %",
            worst <= 0.05,
            note="shares " + ", ".join(f"{100 * s:.1f}" for s in inner) + " %",
        ),
        Row(
            "tree_fairness",
            f"time per JobQueue.pick, {tenants:,} backlogged tenants in a tree vs 1",
            per["tree"],
            "ms",
            per["one"],
            "1 backlogged tenant, no tree",
            per["tree"] / per["one"],
            "≤ 1.2x",
            per["tree"] / per["one"] <= 1.2,
            note=f"{tenants // 100} organisations, depth 2; {blocks} alternating blocks of "
            f"{block} picks; Redis commands per pick {cmds['tree']:.1f} vs {cmds['one']:.1f} "
            f"(the tree's levels: a few zset commands each); setup {setup_s:.0f} s"
            + ("" if tenants >= 10_000 else "; --quick: the issue asks 10,000"),
        ),
        Row(
            "tree_fairness",
            f"time per JobQueue.pick, {tenants:,} backlogged tenants in a tree vs 10",
            per["tree"],
            "ms",
            per["small"],
            "10 backlogged tenants, same depth",
            per["tree"] / per["small"],
            "≤ 1.2x",
            per["tree"] / per["small"] <= 1.2,
            note=f"Redis commands per pick {cmds['tree']:.1f} vs {cmds['small']:.1f} "
            f"({cmds['tree'] / cmds['small']:.2f}x; scripts' own commands included): a "
            "pick's work does not grow with the tenants; same blocks as the row above",
        ),
    ]


if __name__ == "__main__":
    run_standalone(run, tenants=int)
