"""Property tests: reserve.lua, settle.lua and mark_sent.lua on a real Redis against
reference_model.py.

Each example writes a random policy for a fresh tenant (token and dollar budgets, rates,
per-model limits, an allow-list, concurrency) and a random price table, and runs a random
interleaving of reserve (some marked sent at once) / settle / charge_full / release /
mark_sent / reap / clock steps (across minute, hour, day and month boundaries). After every
step the Lua's answer equals the model's and the tenant's Redis keys equal the model's
state; invariants are checked on Redis directly.

Settings profiles (BUDGETER_HYPOTHESIS_PROFILE): ``ci`` (the default) is derandomized, so
every run draws the same examples, and does not shrink: a failure is reported at once with
its whole example, well inside the test's own timeout. ``shrink`` is ``ci`` with shrinking,
to reduce such a failure. ``deep`` (``make test-deep``) draws new examples on every run,
BUDGETER_HYPOTHESIS_EXAMPLES of them (default 5000), and shrinks what fails.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.commands.core import Script

from budgeter.admission.admission import reserve_keys, settle_keys
from budgeter.domain.policy import ModelLimits, RateLimits, TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTier
from budgeter.store.keys import AdmissionKeys, TenantKeys
from budgeter.store.scripts import lua_source
from tests.admission import reference_model as ref

PREFIX = "budgeter"
MODELS = ("claude-a", "claude-b", "claude-c")
_tenants = itertools.count()

# ---------------------------------------------------------------- settings profiles

_BASE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_NO_SHRINK = (Phase.explicit, Phase.generate)
settings.register_profile("ci", _BASE, max_examples=400, derandomize=True, phases=_NO_SHRINK)
settings.register_profile("shrink", _BASE, max_examples=400, derandomize=True)
settings.register_profile(
    "deep",
    _BASE,
    max_examples=int(os.environ.get("BUDGETER_HYPOTHESIS_EXAMPLES", "5000")),
    derandomize=False,
    print_blob=True,
)
PROFILE_NAME = os.environ.get("BUDGETER_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)  # not loaded globally: other tests keep theirs
# each property test's own limit (ci: about 20 s of work on one core; deep: shrinking too)
TIMEOUT_S = 240 if PROFILE_NAME == "ci" else 3600


def _ms(text: str) -> int:
    when = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


# instants just before calendar boundaries (month/year ends, leap days, an hour end)
BOUNDARIES = [
    _ms("2025-11-27T00:00:00"),
    _ms("2025-11-30T23:58:30"),
    _ms("2025-12-31T23:59:00"),
    _ms("2024-02-28T23:59:30"),
    _ms("2024-02-29T23:59:59.500"),
    _ms("2023-02-28T23:59:00"),
    _ms("2025-06-30T22:59:58"),
]
EARLIEST, LATEST = _ms("2020-01-01T00:00:00"), _ms("2030-01-01T00:00:00")


# ---------------------------------------------------------------- strategies

token_limits = st.integers(1, 100) | st.integers(100, 1500) | st.integers(1500, 5000)
rate_tokens = st.none() | st.integers(1, 600) | st.integers(600, 5000) | st.integers(5000, 10**7)
rate_limits = st.builds(
    RateLimits,
    rpm=st.none() | st.integers(1, 6) | st.integers(1, 60),
    itpm=rate_tokens,
    otpm=rate_tokens,
)
no_rates = st.just(RateLimits())


def unit_of(policy: TenantPolicy | None) -> int:
    """The example's unit of tokens: a third of its smallest token limit (any scope)."""
    if policy is None:
        return 500
    scopes = [ModelLimits(budgets=policy.budgets, rate=policy.rate), *policy.models.values()]
    limits = [
        x for s in scopes for x in [*s.budgets.values(), s.rate.itpm, s.rate.otpm] if x is not None
    ]
    return max(1, min(limits or [1500]) // 3)


def usd_limits(unit: int) -> st.SearchStrategy[float]:
    """Dollar limits from a fraction of a typical request (half a unit in, half out at
    $3/$15 per million: about 10 * unit micro-dollars) to a few thousand of them."""
    return (st.integers(1, 300) | st.integers(300, 3000) | st.integers(3000, 30_000)).map(
        lambda k: k * unit / 1e7
    )


@st.composite
def policies(draw: st.DrawFn) -> TenantPolicy | None:
    if draw(st.integers(0, 24)) == 0:
        return None  # no policy: unknown_tenant
    budgets = draw(st.dictionaries(st.sampled_from(ref.PERIODS), token_limits, max_size=5))
    rate = draw(rate_limits)
    models = draw(
        st.just({})
        | st.dictionaries(
            st.sampled_from(MODELS),
            st.builds(
                ModelLimits,
                budgets=st.dictionaries(st.sampled_from(ref.PERIODS), token_limits, max_size=3),
                rate=no_rates | rate_limits,
            ),
            max_size=2,
        )
    )
    unit = unit_of(TenantPolicy(budgets=budgets, rate=rate, models=models))
    usd_budgets = st.dictionaries(st.sampled_from(ref.PERIODS), usd_limits(unit), max_size=3)
    models = {
        m: limits.model_copy(update={"usd_budgets": draw(st.just({}) | usd_budgets)})
        for m, limits in models.items()
    }
    return TenantPolicy(
        budgets=budgets,
        usd_budgets=draw(st.just({}) | st.just({}) | usd_budgets),
        rate=rate,
        models=models,
        allowed_models=draw(
            st.none() | st.none() | st.lists(st.sampled_from(MODELS), unique=True, max_size=3)
        ),
        max_concurrency=draw(st.none() | st.integers(1, 4)),
        on_exhausted=draw(st.sampled_from(["reject", "wait"])),
    )


# a model's price argument as Admission passes it (ModelPrice.lua_arg), or none (unpriced);
# long-context tiers at thresholds within the examples' token counts, dearer (as Anthropic's
# are) or not (a dearer lower tier is what a reservation must cover when the input shrinks)
price_tiers = st.builds(
    PriceTier,
    above=st.sampled_from([1, 50, 300, 1000, 2500]) | st.integers(1, 6000),
    input=st.sampled_from([0.0, 1.0, 6.0, 10.0, 30.0]),
    output=st.sampled_from([0.0, 5.0, 22.5, 37.5, 100.0]),
    cache_write=st.none() | st.sampled_from([0.0, 7.5, 60.0]),
    cache_read=st.none() | st.sampled_from([0.0, 0.6, 3.0]),
)
model_prices = st.builds(
    ModelPrice,
    input=st.sampled_from([0.0, 0.8, 1.0, 3.0, 5.0, 15.0]),
    output=st.sampled_from([0.0, 4.0, 5.0, 15.0, 25.0, 75.0]),
    cache_write=st.none() | st.sampled_from([0.0, 1.0, 3.75, 30.0]),
    cache_read=st.none() | st.sampled_from([0.0, 0.1, 1.5]),
    tiers=st.just([]) | st.lists(price_tiers, max_size=3, unique_by=lambda t: t.above),
).map(ModelPrice.lua_arg)
price_tables = st.fixed_dictionaries(
    {}, optional={m: model_prices for m in MODELS}
) | st.fixed_dictionaries({m: model_prices for m in MODELS})

# token counts in thousandths of the example's unit (a third of its smallest token limit)
sizes = st.integers(0, 1000) | st.integers(0, 40) | st.integers(0, 3500)
holds = st.one_of(st.integers(0, 5000), st.just(90_000))
# which reservation an op targets: an open one (by index) or any id ever used (maybe settled)
targets = st.tuples(st.sampled_from([False, False, True]), st.integers(0, 1000))

reserve_op = st.tuples(
    st.just("reserve"),
    st.none() | st.none() | st.integers(0, 1000),  # None: a new id, else an id used before
    sizes,
    sizes,
    holds,
    st.sampled_from(MODELS),
    st.sampled_from([False, False, False, True]),  # marked sent at once (sent_at_once)
)
settle_op = st.tuples(
    st.just("settle"),
    targets,
    st.integers(-3, 12),  # input counting error
    st.integers(0, 100),  # output used, % of max_tokens
    st.integers(0, 1) | st.integers(1, 30),  # output over max_tokens
    st.just(0) | st.integers(0, 30),  # cache creation
    st.just(0) | st.integers(0, 30),  # cache read
)
# several requests decided (or settled) by one script call, as concurrent callers batch them
reserve_batch_op = st.tuples(st.just("reserve_batch"), st.lists(reserve_op, min_size=2, max_size=6))
settle_batch_op = st.tuples(
    st.just("settle_batch"),
    st.lists(
        st.tuples(
            st.sampled_from(["usage", "usage", "full", "release"]),
            targets,
            st.integers(-3, 12),  # input counting error
            st.integers(0, 120),  # output used, % of max_tokens
        ),
        min_size=2,
        max_size=6,
    ),
)
ops = st.one_of(
    reserve_batch_op,
    settle_batch_op,
    reserve_op,
    reserve_op,
    reserve_op,
    reserve_op,
    settle_op,
    settle_op,
    st.tuples(st.sampled_from(["full", "release", "mark_sent"]), targets),
    st.tuples(st.just("mark_sent"), targets),
    st.tuples(st.just("reap"), st.integers(1, 4) | st.just(1000)),
    st.tuples(
        st.just("advance"),
        st.integers(0, 3000) | st.integers(0, 150_000) | st.integers(0, 45 * 86_400_000),
    ),
    st.tuples(
        st.just("advance_to"),
        st.sampled_from(["minute", "hour", "day", "month"]),
        st.integers(-3, 3),
    ),
)


# ---------------------------------------------------------------- the harness

Usage = tuple[int, int, int, int]
Op = tuple[Any, ...]


def redis_snapshot(client: Redis, keys: AdmissionKeys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.budget)
    pipe.hgetall(keys.buckets)
    pipe.hgetall(keys.resv)
    pipe.zrange(keys.resv_deadline, 0, -1, withscores=True)
    pipe.hgetall(keys.resv_sent)
    pipe.hgetall(keys.usage)
    pipe.hgetall(keys.state)
    budget, buckets, resv, deadlines, sent, usage, state = pipe.execute()
    # dollars summed by HINCRBYFLOAT (long doubles, '%.17Lf' trimmed): read to the micro-dollar
    for name, value in usage.items():
        if name.endswith(":usd"):
            usage[name] = f"{Decimal(value):.6f}"
    return {
        "budget": budget,
        "buckets": buckets,
        "resv": {rid: json.loads(raw) for rid, raw in resv.items()},
        "deadlines": dict(deadlines),
        "sent": set(sent),
        "usage": usage,
        "state": state,
    }


def model_policy(pol: TenantPolicy) -> ref.Policy:
    def rates(r: RateLimits) -> dict[str, int]:
        return {k: v for k, v in r.model_dump().items() if v is not None}

    return ref.Policy(
        budgets=dict(pol.budgets),
        rates=rates(pol.rate),
        max_concurrency=pol.max_concurrency,
        on_exhausted=pol.on_exhausted,
        usd_budgets=dict(pol.usd_budgets),
        models={
            m: ref.Limits(dict(lim.budgets), dict(lim.usd_budgets), rates(lim.rate))
            for m, lim in pol.models.items()
        },
        allowed_models=None if pol.allowed_models is None else frozenset(pol.allowed_models),
    )


def limit_of(pol: TenantPolicy, counter: str) -> tuple[bool, float]:
    """(in dollars, limit) of a budget counter: [m:<model>:][usd:]<period>."""
    parts = counter.split(":")
    limits = ModelLimits(budgets=pol.budgets, usd_budgets=pol.usd_budgets)
    if parts[0] == "m":
        limits, parts = pol.models[parts[1]], parts[2:]
    if parts[0] == "usd":
        return True, limits.usd_budgets[parts[1]]
    return False, limits.budgets[parts[0]]


@dataclass
class Scripts:
    reserve: Script
    settle: Script
    mark_sent: Script


@dataclass
class Harness:
    client: Redis
    scripts: Scripts
    policy: TenantPolicy | None
    now: int
    prices: dict[str, str] = field(default_factory=dict)  # model -> price argument
    keys: TenantKeys = field(init=False)
    model: ref.State = field(init=False)
    ids: list[str] = field(default_factory=list)
    # (counter, period id) -> tokens (or dollars) settled above their reservation
    excess: dict[tuple[str, str], float] = field(default_factory=dict)
    usd_writes: int = 0  # dollar counters written: each may round by half a micro-dollar
    snap: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = TenantKeys.of(PREFIX, f"prop{next(_tenants)}")
        pol = self.policy
        self.model = ref.State(None if pol is None else model_policy(pol))
        if pol is not None:
            self.client.hset(self.keys.policy, mapping=pol.redis_fields())
        self.snap = self.check_state()

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def count_tier(self, what: str, price: str, input_tokens: int) -> None:
        """'reserve:tier' / 'settle:tier': priced in a long-context tier."""
        tiers = ref.parse_prices(price).tiers
        if tiers and input_tokens > tiers[0].above:
            self.count(f"{what}:tier")

    def count_decision(self, got: ref.ReserveResult) -> None:
        self.count(f"{got.decision}:{got.reason.split(':')[0]}")
        for scope in ("model:", "usd:"):
            if scope in got.reason:  # e.g. 'DEFER:inflight:model:', 'REJECT:exhausted:usd:'
                self.count(f"{got.decision}:{got.reason.split(':')[0]}:{scope}")

    # -- script calls, each mirrored on the model

    def reserve(
        self, rid: str, inp: int, out: int, hold: int, model: str, sent: bool = False
    ) -> ref.ReserveResult:
        return self.reserve_many([(rid, inp, out, hold, model, sent)])[0]

    def reserve_many(
        self, items: list[tuple[str, int, int, int, str, bool]]
    ) -> list[ref.ReserveResult]:
        """One script call deciding every item: each answer must be the model's answer to
        that item alone, after the items before it."""
        requests = [
            [rid, inp, out, hold, model, "1" if sent else "", self.prices.get(model, "")]
            for rid, inp, out, hold, model, sent in items
        ]
        args: list[Any] = [self.now, "", json.dumps(requests)]
        flat = self.scripts.reserve(keys=reserve_keys(self.keys), args=args)
        assert len(flat) == 5 * len(items)
        replies = [flat[i : i + 5] for i in range(0, len(flat), 5)]
        results = []
        for (rid, inp, out, hold, model, sent), reply in zip(items, replies, strict=True):
            got = ref.ReserveResult(reply[0], int(reply[1]), reply[2], reply[4])
            assert int(reply[3]) == self.now
            price = self.prices.get(model)
            want = ref.reserve(self.model, rid, inp, out, self.now, hold, model, sent, price)
            assert got == want, f"reserve({rid}, {inp}, {out}, {model}) at {self.now}"
            self.count_decision(got)
            if got == ("ADMIT", 0, "", ""):
                self.usd_writes += 1
                if sent:
                    self.count("reserve:sent")
                if price:
                    self.count_tier("reserve", price, inp)
            if rid not in self.ids:
                self.ids.append(rid)
            results.append(got)
        if len(items) > 1:
            self.count("reserve:batch")
        return results

    def settle(self, mode: str, rid: str, usage: Usage = (0, 0, 0, 0)) -> ref.SettleResult:
        return self.settle_many([(mode, rid, usage)])[0]

    def settle_many(self, items: list[tuple[str, str, Usage]]) -> list[ref.SettleResult]:
        """One script call settling every item, each checked against the model in turn."""
        args: list[Any] = [self.now, json.dumps([[m, rid, *usage] for m, rid, usage in items])]
        wants = []
        for mode, rid, usage in items:
            if mode == "usage":
                wants.append(ref.settle(self.model, rid, *usage, self.now))
            elif mode == "full":
                wants.append(ref.charge_full(self.model, rid, self.now))
            else:
                wants.append(ref.release(self.model, rid, self.now))
        flat = self.scripts.settle(settle_keys(self.keys), args)
        # 7 per reservation; the 7th (notification events) is 0: no policy here notifies
        assert all(int(flat[i + 6]) == 0 for i in range(0, len(flat), 7))
        got = [ref.SettleResult(*(int(x) for x in flat[i : i + 6])) for i in range(0, len(flat), 7)]
        assert got == wants, f"settle {items}"
        self.usd_writes += len(items)
        if len(items) > 1:
            self.count("settle:batch")
        return got

    def reap(self, limit: int) -> ref.SettleResult:
        reply = self.scripts.settle(settle_keys(self.keys), [self.now, "reap", limit])
        assert int(reply[6]) == 0
        got = ref.SettleResult(*(int(x) for x in reply[:6]))
        want = ref.reap(self.model, self.now, limit)
        assert got == want, f"reap({limit}) at {self.now}"
        self.usd_writes += got.settled
        return got

    def mark_sent(self, rid: str) -> bool:
        """admission/mark_sent.lua, as Admission.mark_sent calls it."""
        got = self.scripts.mark_sent(keys=[self.keys.resv, self.keys.resv_sent], args=[rid])
        want = ref.mark_sent(self.model, rid)
        assert got == int(want), f"mark_sent({rid}) = {got}"
        assert want == (rid in self.snap["resv"])  # marked exactly when still held
        self.count("mark_sent:held" if want else "mark_sent:gone")
        return want

    # -- state comparison and invariants

    def check_state(self) -> dict[str, Any]:
        snap = redis_snapshot(self.client, self.keys)
        assert snap == self.model.snapshot(), f"state differs at {self.now}"
        self.check_invariants(snap)
        return snap

    def check_invariants(self, snap: dict[str, Any]) -> None:
        resv = snap["resv"]
        budget = snap["budget"]
        pol = self.policy
        tol = 1e-6 * (self.usd_writes + 1)  # dollar counters: rounded to the micro-dollar
        for name, pid in budget.items():
            if not name.endswith(":id"):
                continue
            assert pol is not None, f"{name} written without a policy"
            counter = name.removesuffix(":id")
            usd, limit = limit_of(pol, counter)
            used = float(budget[f"{counter}:used"])
            reserved = float(budget[f"{counter}:reserved"])
            assert reserved >= 0, f"{counter}: reserved {reserved} < 0"
            if usd:
                in_flight = sum(r["u"] for r in resv.values() if r.get("d", {}).get(counter) == pid)
                assert abs(reserved - in_flight) <= tol, f"{counter}: reserved {reserved}"
            else:
                in_flight = sum(
                    r["i"] + r["o"] for r in resv.values() if r["b"].get(counter) == pid
                )
                assert reserved == in_flight, f"{counter}: reserved {reserved} != {in_flight}"
            over = self.excess.get((counter, pid), 0)
            slack = tol if usd else 0
            assert used + reserved <= limit + over + slack, (
                f"{counter} {pid}: used {used} + reserved {reserved} > limit {limit} + {over}"
            )
        if pol is not None and pol.max_concurrency is not None:
            assert len(resv) <= pol.max_concurrency
        if pol is not None and pol.allowed_models is not None:
            assert {r["m"] for r in resv.values()} <= set(pol.allowed_models)
        assert set(snap["deadlines"]) == set(resv)
        assert snap["sent"] <= set(resv), "a sent mark outlives its reservation"

    def note_excess(self, before: dict[str, Any], usage: Usage) -> None:
        """What a usage settle charged above the reservation, per counter it was held on."""
        est = before["i"] + before["o"]
        for counter, pid in before["b"].items():
            extra = max(0, sum(usage) - est)
            self.excess[(counter, pid)] = self.excess.get((counter, pid), 0) + extra
        if "p" in before:
            usd = ref.usd_of(usage, ref.parse_prices(before["p"]))
            a_in, a_out, a_cc, a_cr = usage
            self.count_tier("settle", before["p"], a_in + a_cc + a_cr)
            if a_in + a_cc + a_cr <= before["i"] and a_out <= before["o"]:
                # within its tokens, a request never costs more than its reservation,
                # whatever tier its real input falls in
                assert usd <= before["u"] * (1 + 1e-12), f"{usage} ${usd} > ${before['u']}"
            for counter, pid in before.get("d", {}).items():
                extra_usd = max(0.0, usd - before["u"])
                self.excess[(counter, pid)] = self.excess.get((counter, pid), 0) + extra_usd

    def after_settle(
        self, mode: str, rid: str, got: ref.SettleResult, usage: Usage = (0, 0, 0, 0)
    ) -> None:
        """Bookkeeping for the excess bound, then prove the settle cannot happen twice."""
        before = self.snap["resv"].get(rid)
        assert got.settled == (1 if before is not None else 0)
        if before is None:
            self.count("settle:noop")
            self.snap = self.check_state()
            return
        est = before["i"] + before["o"]
        assert got.reserved_tokens == est
        if mode == "usage":
            assert got.actual_tokens == sum(usage)
            self.note_excess(before, usage)
        elif mode == "full":
            assert (got.actual_tokens, got.charged_full) == (est, 1)
        else:
            assert (got.actual_tokens, got.released) == (0, 1)
        self.count(f"settle:{mode}")
        snap = self.check_state()
        assert rid not in snap["resv"] and rid not in snap["sent"]
        # exactly once: any second settle of the same id changes nothing
        for again in ("usage", "full", "release"):
            assert self.settle(again, rid, usage).settled == 0
        assert redis_snapshot(self.client, self.keys) == snap
        self.snap = snap

    def do_reap(self, limit: int) -> None:
        due = self.client.zrangebyscore(self.keys.resv_deadline, "-inf", self.now, 0, limit)
        sent = {rid for rid in due if rid in self.snap["sent"]}
        got = self.reap(limit)
        assert (got.settled, got.charged_full, got.released) == (
            len(due),
            len(sent),
            len(due) - len(sent),
        )
        full_est = sum(self.snap["resv"][r]["i"] + self.snap["resv"][r]["o"] for r in sent)
        assert got.actual_tokens == full_est  # sent: charged in full; unsent: nothing
        if due:
            self.count("reap:due")
        if sent:
            self.count("reap:sent")
        self.snap = self.check_state()
        assert not set(due) & set(self.snap["resv"])

    def pick(self, target: tuple[bool, int]) -> str | None:
        stale, index = target
        pool = self.ids if stale else sorted(self.snap["resv"])
        return pool[index % len(pool)] if pool else None


# ---------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[tuple[Redis, Scripts]]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield (
        client,
        Scripts(
            client.register_script(lua_source("admission/reserve.lua")),
            client.register_script(lua_source("admission/settle.lua")),
            client.register_script(lua_source("admission/mark_sent.lua")),
        ),
    )
    client.close()


def run_steps(h: Harness, steps: list[Op]) -> None:
    """Run one example's steps on Redis and on the model, then drain it."""
    unit = unit_of(h.policy)
    for op in steps:
        kind = op[0]
        if kind == "reserve":
            _, reuse, inp, out, hold, model, *flag = op
            rid = f"r{len(h.ids)}" if reuse is None or not h.ids else h.ids[reuse % len(h.ids)]
            sent = bool(flag and flag[0])
            got = h.reserve(rid, inp * unit // 1000, out * unit // 1000, hold, model, sent)
            h.snap = h.check_state()
            if got.decision == "ADMIT" and got.reason == "":
                # the buckets this request moved (the policy's and its model's) hold it;
                # another model's may be past capacity after a settle over its reservation
                for bucket, tat in h.snap["buckets"].items():
                    if ":" not in bucket or bucket.startswith(f"m:{model}:"):
                        assert float(tat) - h.now <= ref.BUCKET_CAPACITY_MS + 0.0005, bucket
                assert (rid in h.snap["sent"]) == sent
        elif kind == "settle":
            _, target, in_err, out_pct, out_over, cc, cr = op
            rid = h.pick(target)
            if rid is None:
                continue
            r = h.snap["resv"].get(rid) or {"i": 10, "o": 10}
            out_used = r["o"] * out_pct // 100 if out_pct < 100 else r["o"] + out_over
            usage = (max(0, r["i"] + in_err - cc - cr), out_used, cc, cr)
            h.after_settle("usage", rid, h.settle("usage", rid, usage), usage)
        elif kind == "reserve_batch":
            items: list[tuple[str, int, int, int, str, bool]] = []
            for _, reuse, inp, out, hold, model, sent in op[1]:
                known = h.ids + [item[0] for item in items]
                rid = f"r{len(known)}" if reuse is None or not known else known[reuse % len(known)]
                items.append((rid, inp * unit // 1000, out * unit // 1000, hold, model, sent))
            h.reserve_many(items)
            h.snap = h.check_state()
        elif kind == "settle_batch":
            batch: list[tuple[str, str, Usage]] = []
            open_before = dict(h.snap["resv"])
            for mode, target, in_err, out_pct in op[1]:
                rid = h.pick(target)
                if rid is None:
                    continue
                r = open_before.get(rid) or {"i": 10, "o": 10}
                usage = (max(0, r["i"] + in_err), r["o"] * out_pct // 100, 0, 0)
                batch.append((mode, rid, usage if mode == "usage" else (0, 0, 0, 0)))
            if not batch:
                continue
            got_all = h.settle_many(batch)
            for (mode, rid, usage), result in zip(batch, got_all, strict=True):
                before = open_before.pop(rid, None)
                assert result.settled == (1 if before is not None else 0)
                if before is not None and mode == "usage":
                    h.note_excess(before, usage)
            h.snap = h.check_state()
        elif kind in ("full", "release"):
            rid = h.pick(op[1])
            if rid is not None:
                h.after_settle(kind, rid, h.settle(kind, rid))
        elif kind == "mark_sent":
            rid = h.pick(op[1])
            if rid is not None:
                h.mark_sent(rid)
                h.snap = h.check_state()
        elif kind == "reap":
            h.do_reap(op[1])
        elif kind == "advance":
            h.now += op[1]
        else:  # advance_to: a few ms around the end of the current period
            _, per, off = op
            h.now = max(h.now, ref.period_of(per, h.now)[1] + off)

    # drain: past every deadline the reaper settles what is left, sent or not
    h.now = max([h.now, *(int(d) for d in h.snap["deadlines"].values())])
    h.do_reap(1000)
    snap = h.snap
    assert snap["resv"] == {} and snap["deadlines"] == {} and snap["sent"] == set()
    for name, value in snap["budget"].items():
        if name.endswith(":reserved") and ":usd:" not in f":{name}":
            assert value == "0", f"{name} = {value} after every reservation settled"
        elif name.endswith(":reserved"):  # dollars: what rounding to the micro-dollar left
            assert float(value) <= 1e-6 * (h.usd_writes + 1), f"{name} = {value} after drain"


@dataclass(frozen=True)
class Scenario:
    policy: TenantPolicy | None
    start: int
    steps: list[Op]
    prices: dict[str, str] = field(default_factory=dict)


PRICED = {m: ModelPrice(input=3.0, output=15.0).lua_arg() for m in MODELS[:2]}  # not claude-c
# a long-context tier above 1000 input tokens: $6 in, $22.5 out (cache writes 7.5, reads 0.6)
TIERED = {
    MODELS[0]: ModelPrice(
        input=3.0, output=15.0, tiers=[PriceTier(above=1000, input=6.0, output=22.5)]
    ).lua_arg()
}

# fixed examples that reach every outcome, whatever the random runs draw: run first by
# every profile, and each one's outcomes are checked by the property test itself
SCENARIOS = [
    Scenario(None, BOUNDARIES[0], [("reserve", None, 10, 10, 0, MODELS[0])]),
    Scenario(
        TenantPolicy(rate=RateLimits(rpm=2), max_concurrency=1),
        BOUNDARIES[0],
        [
            ("reserve", None, 10, 10, 90_000, MODELS[0]),  # ADMIT
            ("reserve", 0, 10, 10, 90_000, MODELS[0]),  # already_reserved
            ("reserve", None, 10, 10, 90_000, MODELS[0]),  # DEFER concurrency
            ("full", (False, 0)),
            ("reserve", None, 10, 10, 90_000, MODELS[0]),  # ADMIT (bucket just full)
            ("full", (False, 0)),
            ("reserve", None, 10, 10, 90_000, MODELS[0]),  # DEFER rate:rpm
        ],
    ),
    Scenario(
        TenantPolicy(budgets={"hour": 300}),  # unit: 100 tokens
        BOUNDARIES[0],
        [
            ("reserve", None, 1000, 1000, 0, MODELS[0]),  # ADMIT 200
            ("reserve", None, 1000, 500, 0, MODELS[0]),  # DEFER inflight:hour
            ("settle", (False, 0), 5, 100, 3, 0, 0),  # 208 used: 8 over the estimate
            ("reserve", None, 1000, 500, 0, MODELS[0]),  # REJECT exhausted:hour
            ("reserve", None, 3500, 0, 0, MODELS[0]),  # REJECT too_large:budget:hour
            ("reserve", None, 400, 400, 0, MODELS[1]),  # ADMIT 80
            ("mark_sent", (False, 0)),  # held: marked
            ("reserve", None, 100, 100, 0, MODELS[0]),  # DEFER inflight:hour
            ("reap", 1000),  # the sent one: charged in full
            ("mark_sent", (True, 4)),  # reaped: not marked
            ("release", (True, 0)),  # settled before: nothing
            ("reserve", None, 50, 50, 0, MODELS[0]),  # ADMIT 10
            ("release", (False, 0)),
        ],
    ),
    Scenario(  # day and month both exhausted, resetting at the same instant: the first names it
        TenantPolicy(budgets={"day": 100, "month": 100}, on_exhausted="wait"),
        _ms("2025-11-30T23:58:30"),
        [
            ("reserve", None, 1000, 1000, 90_000, MODELS[0]),
            ("full", (False, 0)),
            ("reserve", None, 1000, 1000, 0, MODELS[0]),
            ("advance_to", "month", 0),
            ("reserve", None, 1000, 1000, 0, MODELS[1]),
        ],
    ),
    Scenario(  # per-model limits on top of the policy's, and an allow-list
        TenantPolicy(
            budgets={"day": 3000},  # unit: 100 tokens (the model's hour budget is the least)
            models={
                MODELS[0]: ModelLimits(budgets={"hour": 300}, rate=RateLimits(rpm=2, itpm=1000))
            },
            allowed_models=[MODELS[0], MODELS[1]],
        ),
        BOUNDARIES[0],
        [
            ("reserve", None, 1000, 1000, 90_000, MODELS[0]),  # ADMIT 200 (model hour: 200)
            ("reserve", None, 1000, 500, 90_000, MODELS[0]),  # DEFER inflight:model:hour
            ("reserve", None, 1000, 500, 90_000, MODELS[1]),  # ADMIT: no model limit
            ("reserve", None, 10, 10, 0, MODELS[2]),  # REJECT model_not_allowed
            ("reserve", None, 3500, 0, 0, MODELS[0]),  # REJECT too_large:budget:model:hour
            ("reserve", None, 0, 0, 90_000, MODELS[0], True),  # ADMIT, sent at once
            ("reserve", None, 0, 0, 0, MODELS[0]),  # DEFER rate:model:rpm
            ("full", (False, 0)),  # r0: 200 charged on hour and day
            ("reserve", None, 1000, 500, 0, MODELS[0]),  # REJECT exhausted:model:hour
            ("reap", 1000),  # nothing due yet
            ("advance", 90_000),
            ("reap", 1000),  # r2 released, r5 (sent) charged in full
        ],
    ),
    Scenario(  # dollar budgets: $3 in, $15 out per million tokens; claude-c has no price
        TenantPolicy(
            usd_budgets={"hour": 0.003},  # unit: 500 tokens; 500 in + 500 out = $0.009
            models={MODELS[1]: ModelLimits(usd_budgets={"day": 0.0005})},
        ),
        BOUNDARIES[0],
        [
            ("reserve", None, 100, 100, 90_000, MODELS[0]),  # ADMIT $0.0009
            ("reserve", None, 300, 300, 90_000, MODELS[0]),  # DEFER inflight:usd:hour
            ("reserve", None, 1000, 1000, 0, MODELS[0]),  # REJECT too_large:budget:usd:hour
            ("reserve", None, 10, 10, 0, MODELS[2]),  # REJECT unpriced_model
            ("reserve", None, 100, 100, 0, MODELS[1]),  # REJECT too_large:budget:model:usd:day
            ("reserve", None, 20, 20, 90_000, MODELS[1]),  # ADMIT $0.00018
            ("settle", (False, 0), 3, 100, 4, 2, 1),  # r0: a little over its estimate
            ("reserve", None, 20, 20, 90_000, MODELS[1]),  # ADMIT
            ("reserve", None, 20, 20, 90_000, MODELS[1]),  # DEFER inflight:model:usd:day
            ("full", (False, 0)),
            ("full", (False, 0)),
            ("reserve", None, 20, 20, 0, MODELS[1]),  # REJECT exhausted:model:usd:day
            ("reserve", None, 250, 250, 0, MODELS[0]),  # REJECT exhausted:usd:hour
        ],
        PRICED,
    ),
    Scenario(  # long-context tiers: a request over 1000 input tokens is priced at the tier
        TenantPolicy(usd_budgets={"hour": 0.01}),  # unit: 500 tokens
        BOUNDARIES[0],
        [
            # 2000 in + 100 out: $0.01725 at the tier (it would be $0.009 at the base)
            ("reserve", None, 4000, 200, 90_000, MODELS[0]),  # REJECT too_large:budget:usd:hour
            ("reserve", None, 2004, 100, 90_000, MODELS[0]),  # ADMIT 1002 in: $0.00864
            ("settle", (False, 0), 0, 100, 0, 10, 5),  # 1002 in (cache incl.): at the tier
            ("advance_to", "hour", 0),
            ("reserve", None, 2004, 100, 90_000, MODELS[0]),  # ADMIT at the tier
            ("settle", (False, 0), -3, 100, 0, 0, 0),  # 999 in: settled at the base prices
        ],
        TIERED,
    ),
    Scenario(  # several requests decided, then settled, by one script call each
        TenantPolicy(budgets={"day": 3000}, max_concurrency=3),
        BOUNDARIES[2],
        [
            (
                "reserve_batch",
                [
                    ("reserve", None, 100, 100, 0, MODELS[0], False),
                    ("reserve", None, 100, 100, 90_000, MODELS[1], True),
                    ("reserve", 0, 100, 100, 0, MODELS[0], False),
                ],
            ),
            (
                "settle_batch",
                [
                    ("usage", (False, 0), 2, 50),
                    ("full", (False, 1), 0, 0),
                    ("release", (True, 0), 0, 0),
                ],
            ),
        ],
        PRICED,
    ),
]

# every outcome the scenarios (and so every run of the property) must reach
OUTCOMES = [
    "ADMIT:",
    "ADMIT:already_reserved",
    "DEFER:rate",
    "DEFER:rate:model:",
    "DEFER:inflight",
    "DEFER:inflight:model:",
    "DEFER:inflight:usd:",
    "DEFER:concurrency",
    "DEFER:exhausted",
    "REJECT:exhausted",
    "REJECT:exhausted:model:",
    "REJECT:exhausted:usd:",
    "REJECT:too_large",
    "REJECT:too_large:model:",
    "REJECT:too_large:usd:",
    "REJECT:unknown_tenant",
    "REJECT:model_not_allowed",
    "REJECT:unpriced_model",
    "reserve:sent",
    "mark_sent:held",
    "mark_sent:gone",
    "settle:usage",
    "settle:full",
    "settle:release",
    "settle:noop",
    "reap:due",
    "reap:sent",
    "reserve:batch",
    "settle:batch",
    "reserve:tier",
    "settle:tier",
]


def with_scenarios(test: Callable[..., None]) -> Callable[..., None]:
    for sc in reversed(SCENARIOS):
        test = example(policy=sc.policy, prices=sc.prices, start=sc.start, steps=sc.steps)(test)
    return test


@pytest.mark.timeout(TIMEOUT_S)
def test_lua_admission_matches_the_reference_model(sync_redis: tuple[Redis, Scripts]) -> None:
    """The property over the profile's examples (the fixed SCENARIOS first), then: every
    outcome was reached, counted in this test alone, whatever runs before or after it."""
    client, scripts = sync_redis
    stats: dict[str, int] = {}

    @PROFILE
    @with_scenarios
    @given(
        policy=policies(),
        prices=price_tables,
        start=st.sampled_from(BOUNDARIES) | st.integers(EARLIEST, LATEST),
        steps=st.lists(ops, min_size=12, max_size=60),
    )
    def check(
        policy: TenantPolicy | None, prices: dict[str, str], start: int, steps: list[Op]
    ) -> None:
        h = Harness(client, scripts, policy, start, prices)
        run_steps(h, steps)
        for what, n in h.stats.items():
            stats[what] = stats.get(what, 0) + n

    check()
    missing = [w for w in OUTCOMES if not stats.get(w)]
    assert not missing, f"never reached: {missing} (seen {stats})"


def test_the_scenarios_alone_reach_every_outcome(sync_redis: tuple[Redis, Scripts]) -> None:
    """The fixed scenarios reach every outcome by themselves (so does every profile)."""
    client, scripts = sync_redis
    stats: dict[str, int] = {}
    for sc in SCENARIOS:
        h = Harness(client, scripts, sc.policy, sc.start, dict(sc.prices))
        run_steps(h, sc.steps)
        for what in h.stats:
            stats[what] = stats.get(what, 0) + 1
    missing = [w for w in OUTCOMES if not stats.get(w)]
    assert not missing, f"never reached: {missing} (seen {stats})"


# ---------------------------------------------------------------- calendar periods

PERIOD_PROBE = "\nlocal id, reset = period_of(ARGV[1], tonumber(ARGV[2]))\nreturn {id, reset}\n"


@pytest.mark.timeout(TIMEOUT_S)
@settings(PROFILE, max_examples=300 if PROFILE_NAME != "deep" else PROFILE.max_examples)
@given(
    ms=st.integers(0, _ms("2200-01-01T00:00:00"))
    | st.sampled_from(BOUNDARIES).flatmap(lambda b: st.integers(b - 120_000, b + 120_000)),
    period=st.sampled_from(ref.PERIODS),
)
def test_calendar_periods_match_lua_periods(
    sync_redis: tuple[Redis, Scripts], ms: int, period: str
) -> None:
    client = sync_redis[0]
    got = client.eval(lua_source("lib/periods.lua") + PERIOD_PROBE, 0, period, ms)
    assert (got[0], int(got[1])) == ref.period_of(period, ms)
