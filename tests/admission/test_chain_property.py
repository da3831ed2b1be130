"""Property tests of admission along the organisation tree, on a real Redis.

Each example builds a random tree (depth 1-4 below its root) of tenants with random
policies (test_admission_property's strategies: token and dollar budgets, rates, per-model
limits, allow-lists, concurrency, on_exhausted), some tenants with an API key of random
limits (budgets, dollar budgets, rates, concurrency, allowed_models), and runs random
reserves (with or without the key), settles, charges, releases, mark-sents, reaps and clock
steps of any of its tenants through :class:`~budgeter.admission.admission.Admission` (the
real chain: tenant and key in one call, then ancestors). After every step the answer
equals chain_model's and every tenant's and key's Redis keys equal the model's state.
Then random trees (depth up to 4, each parent's budget below its children's sum) take
rounds of concurrent requests of all their tenants, half of them through a key with a
budget of its own (``asyncio.gather``: the scopes' script calls interleave and batch as in
a worker), settled every way (usage, in full, released, twice, by the reaper): an observer
reading every scope meanwhile never finds a budget of any level, key or tenant, over its
limit or more in flight than its max_concurrency, and at the end each tenant's usage is
exactly its own charges plus its children's.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis import Redis

from budgeter.admission.admission import Admission, Decision, Usage
from budgeter.admission.tree_view import TreeView
from budgeter.domain.key_limits import KeyLimits
from budgeter.domain.policy import RateLimits, TenantPolicy
from budgeter.domain.tree import MAX_DEPTH
from budgeter.store.client import make_redis
from budgeter.store.keys import KeyScopeKeys, TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from tests.admission import reference_model as ref
from tests.admission.chain_model import ChainModel
from tests.admission.test_admission_property import (
    BOUNDARIES,
    MODELS,
    PREFIX,
    PROFILE,
    TIMEOUT_S,
    model_policy,
    no_rates,
    policies,
    price_tables,
    redis_snapshot,
    sizes,
)

_trees = itertools.count()


@st.composite
def trees(draw: st.DrawFn) -> list[int | None]:
    """parent index of each node (None: a root), parents before children, depth <= 4."""
    n = draw(st.integers(2, 6))
    parents: list[int | None] = [None]
    depth = [0]
    for i in range(1, n):
        choices = [j for j in range(i) if depth[j] < MAX_DEPTH]
        parent = draw(st.sampled_from(choices)) if draw(st.integers(0, 5)) else None
        parents.append(parent)
        depth.append(0 if parent is None else depth[parent] + 1)
    return parents


def deep_chain() -> list[int | None]:
    return [None, 0, 1, 2, 3]  # a root and four levels below it


# a random policy, or a light one (a budget, an rpm, a concurrency) that admits often, so
# that requests get past their own tenant to the key and the ancestors, and DEFERs are met
light_limits = {
    "budgets": st.dictionaries(st.sampled_from(ref.PERIODS), st.integers(300, 20_000), max_size=1),
    "rate": no_rates | st.builds(RateLimits, rpm=st.integers(1, 6)),
    "max_concurrency": st.none() | st.integers(1, 2),
}
node_policies = policies().map(lambda p: p or TenantPolicy()) | st.builds(
    TenantPolicy, on_exhausted=st.sampled_from(["reject", "wait"]), **light_limits
)


# what a key's limits share with a tenant policy (budgeter/domain/key_limits.py)
KEY_FIELDS = ("budgets", "usd_budgets", "rate", "max_concurrency", "allowed_models")


def key_limits_of(pol: TenantPolicy | None) -> KeyLimits | None:
    """A key's limits with the fields a random policy drew (None: the tenant has no key)."""
    return None if pol is None else KeyLimits(**{f: getattr(pol, f) for f in KEY_FIELDS})


# a key with a random policy's fields, or light limits
key_policies = st.none() | policies().map(key_limits_of) | st.builds(KeyLimits, **light_limits)


def key_policy(limits: KeyLimits) -> TenantPolicy:
    """The key's limits as the policy the reference model reads (no on_exhausted: reject)."""
    return TenantPolicy(**{f: getattr(limits, f) for f in KEY_FIELDS})


op = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.integers(0, 5),  # node
        st.none() | st.none() | st.integers(0, 100),  # None: a new id, else one used before
        sizes,
        sizes,
        st.one_of(st.integers(0, 5000), st.just(90_000)),
        st.sampled_from(MODELS),
        st.booleans(),  # marked sent at once
        st.sampled_from([True, True, False]),  # with the tenant's API key (if it has one)
    ),
    st.tuples(
        st.sampled_from(["usage", "usage", "full", "release", "mark_sent"]),
        st.integers(0, 1000),
        st.integers(-3, 12),
        st.integers(0, 120),
    ),
    st.tuples(st.just("reap")),
    st.tuples(st.just("advance"), st.integers(0, 3000) | st.integers(0, 200_000)),
)


class PricedAdmission(Admission):
    """Admission with the example's price arguments (model -> lua_arg, absent: unpriced)."""

    def __init__(self, redis: RedisClient, prices: dict[str, str]) -> None:
        super().__init__(redis, prefix=PREFIX, tree=TreeView(redis, prefix=PREFIX, refresh_s=0))
        self.example_prices = prices

    def price_arg(self, model: str, now_ms: int | None = None) -> str:
        del now_ms  # one table for the whole example
        return self.example_prices.get(model, "")


def without_x(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with the reservations' ledger record ("x": ancestors) left out."""
    snapshot["resv"] = {
        rid: {k: v for k, v in r.items() if k != "x"} for rid, r in snapshot["resv"].items()
    }
    return snapshot


class Example:
    def __init__(
        self,
        sync: Redis,
        redis: RedisClient,
        shape: list[int | None],
        pols: list[TenantPolicy],
        key_pols: list[KeyLimits | None],
        prices: dict[str, str],
        now: int,
    ) -> None:
        tag = next(_trees)
        self.sync = sync
        self.names = [f"tr{tag}-{i}" for i in range(len(shape))]
        self.parent_of = {
            t: (None if p is None else self.names[p])
            for t, p in zip(self.names, shape, strict=True)
        }
        self.pols = {t: pols[i % len(pols)] for i, t in enumerate(self.names)}
        self.admission = PricedAdmission(redis, prices)
        self.prices = prices
        # tenant -> its API key's limits (scope name f"{tenant}:k:k{i}" in the model)
        self.key_limits = {
            t: limits
            for i, t in enumerate(self.names)
            if (limits := key_pols[i % len(key_pols)]) is not None
        }
        states = {t: ref.State(model_policy(p)) for t, p in self.pols.items()}
        for t, limits in self.key_limits.items():
            states[self.key_scope(t)] = ref.State(model_policy(key_policy(limits)))
        self.model = ChainModel(dict(self.parent_of), states)
        self.store = TenantStore(redis, prefix=PREFIX)
        self.now = now
        self.ids: dict[str, list[str]] = {t: [] for t in self.names}
        self.owner: dict[str, str] = {}
        self.stats: dict[str, int] = {}

    async def write_policies(self) -> None:
        for t in self.names:  # parents come first
            parent = self.parent_of[t]
            await self.store.put(t, self.pols[t].model_copy(update={"parent": parent}))
        for t, limits in self.key_limits.items():  # as TenantCredentials writes a key's
            fields = limits.redis_fields()
            if fields:
                await self.admission.redis.hset(self.key_keys(t).policy, mapping=fields)
            await self.admission.redis.sadd(TenantKeys.of(PREFIX, t).limited_keys, self.key_id(t))

    def key_id(self, tenant: str) -> str:
        return f"k{self.names.index(tenant)}"

    def key_scope(self, tenant: str) -> str:
        return f"{tenant}:k:{self.key_id(tenant)}"

    def key_keys(self, tenant: str) -> KeyScopeKeys:
        return KeyScopeKeys(PREFIX, tenant, self.key_id(tenant))

    def check_state(self) -> None:
        for t in self.names:
            got = without_x(redis_snapshot(self.sync, TenantKeys.of(PREFIX, t)))
            want = self.model.states[t].snapshot()
            assert got == want, f"state of {t} (parent {self.parent_of[t]})"
        for t in self.key_limits:
            got = redis_snapshot(self.sync, self.key_keys(t))
            assert got == self.model.states[self.key_scope(t)].snapshot(), f"key of {t}"

    async def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "reserve":
            _, node, reuse, inp, out, hold, model, sent, with_key = op
            tenant = self.names[node % len(self.names)]
            with_key = with_key and tenant in self.key_limits
            known = self.ids[tenant]
            if reuse is None or not known:
                rid = f"{tenant}-r{len(known)}"
                known.append(rid)
                self.owner[rid] = tenant
            else:
                rid = known[reuse % len(known)]
            got = await self.admission.reserve(
                tenant, rid, inp, out, model=model, hold_ms=hold, now_ms=self.now,
                sent_at_once=sent, key=self.key_id(tenant) if with_key else None,
            )  # fmt: skip
            scope = (
                got.reason.split(":")[0] if got.reason.startswith(("parent:", "key:")) else "own"
            )
            if with_key and got.kind == "ADMIT":
                scope = "key"
            self.stats[f"{got.kind}:{scope}"] = self.stats.get(f"{got.kind}:{scope}", 0) + 1
            price = self.prices.get(model)
            key = self.key_scope(tenant) if with_key else None
            want = self.model.reserve(
                tenant, rid, inp, out, self.now, hold, model, sent, price, key
            )  # fmt: skip
            assert (got.kind, got.until_ms, got.reason, got.detail) == tuple(want), (
                f"reserve({tenant}, {rid}, {inp}, {out}, {model}) at {self.now}"
            )
        elif kind in ("usage", "full", "release", "mark_sent"):
            every = [rid for ids in self.ids.values() for rid in ids]
            if not every:
                return
            rid = every[op[1] % len(every)]
            tenant = self.owner[rid]
            if kind == "mark_sent":
                marked = await self.admission.mark_sent(tenant, rid)
                assert marked == self.model.mark_sent(tenant, rid)
                return
            usage = (
                (op[2] + 10 if op[2] > 0 else 0, op[3], 0, 0) if kind == "usage" else (0, 0, 0, 0)
            )
            if kind == "usage":
                settled = await self.admission.settle(tenant, rid, Usage(*usage), now_ms=self.now)
            elif kind == "full":
                settled = await self.admission.charge_full(tenant, rid, now_ms=self.now)
            else:
                settled = await self.admission.release(tenant, rid, now_ms=self.now)
            expected = self.model.settle(tenant, kind, rid, usage, self.now)
            got_counts = (settled.settled, int(settled.waiting_settle), settled.charged_full)
            want_counts = (expected.settled, expected.waiting_settle, expected.charged_full)
            assert got_counts == want_counts, f"{kind}({rid}) at {self.now}"
            assert settled.released == expected.released
        elif kind == "reap":
            for t in self.names:
                reaped = await self.admission.reap(t, now_ms=self.now)
                due = ref.reap(self.model.states[t], self.now)
                if t in self.key_limits:
                    ref.reap(self.model.states[self.key_scope(t)], self.now)
                assert (reaped.settled, reaped.charged_full, reaped.released) == (
                    due.settled, due.charged_full, due.released,
                )  # fmt: skip
        else:
            self.now += op[1]

    async def drain(self) -> None:
        self.now += 200_000
        for t in self.names:
            await self.admission.reap(t, now_ms=self.now)
            ref.reap(self.model.states[t], self.now)
            if t in self.key_limits:
                ref.reap(self.model.states[self.key_scope(t)], self.now)


@pytest.fixture(scope="module")
def sync_client(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _key_reserve(rid: int | None, inp: int) -> tuple[object, ...]:
    return ("reserve", 1, rid, inp, 100, 5000, MODELS[0], False, True)


# a team's key of concurrency 1 and a small day budget under its org: admitted, deferred
# while in flight, rejected as too large, admitted again once settled
KEY_EXAMPLE: dict[str, object] = {
    "shape": [None, 0],
    "pols": [TenantPolicy(budgets={"day": 10_000})],
    "key_pols": [None, KeyLimits(max_concurrency=1, budgets={"day": 2_000})],
    "prices": {},
    "start": BOUNDARIES[0],
    "steps": [
        _key_reserve(None, 100),
        _key_reserve(None, 100),
        _key_reserve(None, 3_000),
        ("usage", 0, 50, 20),
        _key_reserve(None, 100),
        ("full", 3, 0, 0),
        ("reap",),
    ],
}
# the same id without the key (the chain then forgets the key), settled, then with the key
# again: the key still holds it (until the reaper), so the key is not reserved twice
KEY_HELD_EXAMPLE = KEY_EXAMPLE | {
    "steps": [
        _key_reserve(None, 100),
        ("reserve", 1, 0, 100, 100, 5000, MODELS[0], False, False),
        ("usage", 0, 50, 20),
        _key_reserve(0, 100),
        ("advance", 10_000),
        ("reap",),
    ]
}


@pytest.mark.timeout(TIMEOUT_S)
def test_admission_along_random_trees_matches_the_chain_model(
    sync_client: Redis, redis_url: str
) -> None:
    seen: dict[str, int] = {}
    with asyncio.Runner() as runner:
        redis = make_redis(redis_url)

        @settings(PROFILE, max_examples=min(PROFILE.max_examples, 150))
        @example(**KEY_EXAMPLE)
        @example(**KEY_HELD_EXAMPLE)
        @given(
            shape=trees() | st.just(deep_chain()),
            pols=st.lists(node_policies, min_size=1, max_size=6),
            key_pols=st.lists(key_policies, min_size=1, max_size=6),
            prices=price_tables,
            start=st.sampled_from(BOUNDARIES),
            steps=st.lists(op, min_size=10, max_size=40),
        )
        def check(
            shape: list[int | None],
            pols: list[TenantPolicy],
            key_pols: list[KeyLimits | None],
            prices: dict[str, str],
            start: int,
            steps: list[tuple[Any, ...]],
        ) -> None:
            ex = Example(sync_client, redis, shape, pols, key_pols, prices, start)
            runner.run(ex.write_policies())
            for one in steps:
                runner.run(ex.step(one))
                ex.check_state()
            runner.run(ex.drain())
            ex.check_state()
            for t in ex.names:
                snap = redis_snapshot(sync_client, TenantKeys.of(PREFIX, t))
                assert snap["resv"] == {} and snap["deadlines"] == {}
            for t in ex.key_limits:
                snap = redis_snapshot(sync_client, ex.key_keys(t))
                assert snap["resv"] == {} and snap["deadlines"] == {}
            for one in steps:
                seen[one[0]] = seen.get(one[0], 0) + 1
            for what, n in ex.stats.items():
                seen[what] = seen.get(what, 0) + n

        check()
        runner.run(redis.aclose())
    reached = {"reserve", "usage", "full", "release", "reap", "mark_sent", "ADMIT:own"}
    reached |= {"DEFER:own", "REJECT:own", "DEFER:parent", "REJECT:parent"}
    reached |= {"ADMIT:key", "DEFER:key", "REJECT:key"}
    assert reached <= set(seen), seen


def test_the_chain_model_names_ancestors_refusals() -> None:
    """The model itself: a parent's exhausted day budget refuses the child's request and
    names the parent; the child's reservation is rolled back."""
    parents: dict[str, str | None] = {"org": None, "team": "org"}
    model = ChainModel(
        parents,
        {
            "org": ref.State(ref.Policy(budgets={"day": 100})),
            "team": ref.State(ref.Policy(budgets={"day": 1000})),
        },
    )
    now = BOUNDARIES[0]
    got = model.reserve("team", "r1", 60, 60, now, 90_000, "m", False, None)
    assert got.decision == "REJECT" and got.reason == "parent:org:too_large:budget:day"
    assert model.states["team"].reservations == {}


# ---------------------------------------------------------------- concurrency

KEY_LIMIT = 3_000


def concurrent_tree(rng: random.Random, tag: int) -> dict[str, tuple[str | None, int]]:
    """tenant -> (parent, day budget): a random tree (4-10 tenants, depth up to 4 below
    its roots; the first seeds take a chain of depth 4) where every parent's budget is
    smaller than the sum of its children's."""
    n = rng.randint(4, 10)
    parents: list[int | None] = [None]
    depth = [0]
    for i in range(1, n):
        if tag % 3 == 0 and i <= MAX_DEPTH:
            parent: int | None = i - 1  # a chain of depth 4 first
        else:
            choices = [j for j in range(i) if depth[j] < MAX_DEPTH]
            parent = rng.choice(choices) if rng.random() < 0.85 else None
        parents.append(parent)
        depth.append(0 if parent is None else depth[parent] + 1)
    budgets = [rng.choice([8_000, 12_000, 20_000]) for _ in range(n)]
    for i in reversed(range(n)):  # children first: a parent below its children's sum
        kids = [budgets[c] for c in range(n) if parents[c] == i]
        if kids:
            budgets[i] = max(4_000, int(sum(kids) * rng.uniform(0.4, 0.9)))
    names = [f"c{tag}-{i}" for i in range(n)]
    return {names[i]: (None if p is None else names[p], budgets[i]) for i, p in enumerate(parents)}


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_requests_never_overshoot_any_level(redis: RedisClient, seed: int) -> None:
    """Rounds of concurrent requests of every tenant of a random tree (a parent is an
    ordinary tenant: it sends too), half of them through the tenant's API key, settled with
    usage, charged in full, released, settled twice, or left to the reaper. An observer reads
    every scope while they run: no budget of any level, key or tenant, is ever over its
    limit and no scope holds more than its max_concurrency. At the end every scope holds
    nothing, and each tenant's usage is exactly what its own requests were charged plus
    its children's usage."""
    rng = random.Random(seed)
    tree = concurrent_tree(rng, seed)
    store = TenantStore(redis, prefix=PREFIX)
    for tenant, (parent, day) in tree.items():  # parents come first
        await store.put(
            tenant, TenantPolicy(parent=parent, budgets={"day": day}, max_concurrency=6)
        )
    admission = Admission(redis, prefix=PREFIX, tree=TreeView(redis, prefix=PREFIX, refresh_s=0))
    tenants = list(tree)
    for tenant in tenants:  # each tenant's key "k": a day budget of its own, a concurrency of 2
        limits = KeyLimits(budgets={"day": KEY_LIMIT}, max_concurrency=2).redis_fields()
        await redis.hset(KeyScopeKeys(PREFIX, tenant, "k").policy, mapping=limits)
        await redis.sadd(TenantKeys.of(PREFIX, tenant).limited_keys, "k")
    scopes: list[tuple[str, TenantKeys | KeyScopeKeys, int, int]] = [
        (t, TenantKeys.of(PREFIX, t), day, 6) for t, (_, day) in tree.items()
    ] + [(f"{t}'s key", KeyScopeKeys(PREFIX, t, "k"), KEY_LIMIT, 2) for t in tenants]
    now = BOUNDARIES[0]
    own: dict[str, int] = dict.fromkeys(tree, 0)  # tokens charged to each tenant's own requests
    seen: dict[str, int] = {}
    ids = itertools.count()
    running = True

    async def one(tenant: str) -> Decision:
        rid = f"{tenant}-{next(ids)}"
        inp, out = rng.randint(10, 200), rng.randint(10, 300)
        key = rng.choice(["k", None])
        decision = await admission.reserve(
            tenant, rid, inp, out, model="m", now_ms=now, key=key, hold_ms=1000,
            sent_at_once=True,
        )  # fmt: skip
        if decision.kind != "ADMIT":
            return decision
        await asyncio.sleep(0)
        how = rng.choice(["usage", "usage", "full", "release", "twice", "reaper"])
        seen[how] = seen.get(how, 0) + 1
        if how in ("usage", "twice"):
            used = Usage(inp, rng.randint(0, out))
            await admission.settle(tenant, rid, used, now_ms=now)
            if how == "twice":  # a retried settle charges nothing more
                await admission.settle(tenant, rid, used, now_ms=now)
            own[tenant] += used.input_tokens + used.output_tokens
        elif how == "full":
            await admission.charge_full(tenant, rid, now_ms=now)
            own[tenant] += inp + out
        elif how == "release":
            await admission.release(tenant, rid, now_ms=now)
        else:  # its worker died: sent, so the reapers charge it in full
            own[tenant] += inp + out
        return decision

    async def over_limits() -> list[str]:
        over = []
        for name, keys, day, conc in scopes:
            budget = await redis.hgetall(keys.budget)
            used, reserved = int(budget.get("day:used", 0)), int(budget.get("day:reserved", 0))
            if used + reserved > day:
                over.append(f"{name}: {used} + {reserved} > {day}")
            if await redis.hlen(keys.resv) > conc:
                over.append(f"{name}: more than {conc} in flight")
        return over

    async def observe() -> list[str]:
        found: list[str] = []
        while running:
            found += await over_limits()
            await asyncio.sleep(0)
        return found

    for _ in range(16):
        running = True
        watcher = asyncio.ensure_future(observe())
        decisions = await asyncio.gather(*(one(rng.choice(tenants)) for _ in range(40)))
        running = False
        assert not await watcher
        assert not await over_limits()
        for d in decisions:
            what = d.reason.split(":")[0] if d.reason.startswith(("parent:", "key:")) else "own"
            seen[f"{d.kind}:{what}"] = seen.get(f"{d.kind}:{what}", 0) + 1
        now += 2000  # past the holds: the reapers charge what the dead workers left
        for tenant in tenants:
            await admission.reap(tenant, now_ms=now)
    assert {"ADMIT:own", "reaper", "twice", "release", "full"} <= set(seen), seen
    for scope in ("parent", "key"):  # refused by an ancestor and by a key
        assert seen.get(f"DEFER:{scope}", 0) + seen.get(f"REJECT:{scope}", 0), seen
    for name, keys, _, _ in scopes:
        budget = await redis.hgetall(keys.budget)
        assert int(budget.get("day:reserved", 0)) == 0 and await redis.hlen(keys.resv) == 0, name
    totals = {}
    for tenant in tree:
        usage = cast(dict[str, str], await redis.hgetall(TenantKeys.of(PREFIX, tenant).usage))
        totals[tenant] = sum(
            int(v) for k, v in usage.items() if k.startswith("day:") and ":requests" not in k
        )
    for tenant in reversed(tenants):  # exact: its own charges plus its children's usage
        children = [t for t, (p, _) in tree.items() if p == tenant]
        assert totals[tenant] == own[tenant] + sum(totals[c] for c in children), tenant
        budget = await redis.hgetall(TenantKeys.of(PREFIX, tenant).budget)
        assert totals[tenant] == int(budget.get("day:used", 0)) <= tree[tenant][1], tenant
