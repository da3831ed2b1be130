"""Property tests: reserve.lua and settle.lua on a real Redis against reference_model.py.

Each example writes a random policy for a fresh tenant and runs a random interleaving of
reserve / settle / charge_full / release / mark_sent / reap / clock steps (across minute,
hour, day and month boundaries). After every step the Lua's answer equals the model's and
the tenant's Redis keys equal the model's state; invariants are checked on Redis directly.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis import Redis

from budgeter.admission.admission import reserve_keys, settle_keys
from budgeter.domain.policy import RateLimits, TenantPolicy
from budgeter.store.keys import TenantKeys
from budgeter.store.scripts import lua_source
from tests.admission import reference_model as ref

PREFIX = "budgeter"
MODELS = ("claude-a", "claude-b")
_tenants = itertools.count()


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


@st.composite
def policies(draw: st.DrawFn) -> TenantPolicy | None:
    if draw(st.integers(0, 24)) == 0:
        return None  # no policy: unknown_tenant
    limit = st.integers(1, 100) | st.integers(100, 1500) | st.integers(1500, 5000)
    budgets = draw(st.dictionaries(st.sampled_from(ref.PERIODS), limit, max_size=5))
    rates = {
        "rpm": draw(st.none() | st.integers(1, 6) | st.integers(1, 60)),
        "itpm": draw(
            st.none() | st.integers(1, 600) | st.integers(600, 5000) | st.integers(5000, 10**7)
        ),
        "otpm": draw(
            st.none() | st.integers(1, 600) | st.integers(600, 5000) | st.integers(5000, 10**7)
        ),
    }
    return TenantPolicy(
        budgets=budgets,
        rate=RateLimits(**rates),
        max_concurrency=draw(st.none() | st.integers(1, 4)),
        on_exhausted=draw(st.sampled_from(["reject", "wait"])),
    )


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


def redis_snapshot(client: Redis, keys: TenantKeys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.budget)
    pipe.hgetall(keys.buckets)
    pipe.hgetall(keys.resv)
    pipe.zrange(keys.resv_deadline, 0, -1, withscores=True)
    pipe.hgetall(keys.resv_sent)
    pipe.hgetall(keys.usage)
    pipe.hgetall(keys.state)
    budget, buckets, resv, deadlines, sent, usage, state = pipe.execute()
    return {
        "budget": budget,
        "buckets": buckets,
        "resv": {rid: json.loads(raw) for rid, raw in resv.items()},
        "deadlines": dict(deadlines),
        "sent": set(sent),
        "usage": usage,
        "state": state,
    }


@dataclass
class Harness:
    client: Redis
    reserve_script: Any
    settle_script: Any
    policy: TenantPolicy | None
    now: int
    keys: TenantKeys = field(init=False)
    model: ref.State = field(init=False)
    ids: list[str] = field(default_factory=list)
    # (period, period id) -> tokens settled above their reservation (the counting error)
    excess: dict[tuple[str, str], int] = field(default_factory=dict)
    snap: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = TenantKeys.of(PREFIX, f"prop{next(_tenants)}")
        pol = self.policy
        self.model = ref.State(
            None
            if pol is None
            else ref.Policy(
                budgets=dict(pol.budgets),
                rates={k: v for k, v in pol.rate.model_dump().items() if v is not None},
                max_concurrency=pol.max_concurrency,
                on_exhausted=pol.on_exhausted,
            )
        )
        if pol is not None:
            self.client.hset(self.keys.policy, mapping=pol.redis_fields())
        self.snap = self.check_state()

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # -- script calls, each mirrored on the model

    def reserve(self, rid: str, inp: int, out: int, hold: int, model: str) -> ref.ReserveResult:
        return self.reserve_many([(rid, inp, out, hold, model)])[0]

    def reserve_many(self, items: list[tuple[str, int, int, int, str]]) -> list[ref.ReserveResult]:
        """One script call deciding every item: each answer must be the model's answer to
        that item alone, after the items before it."""
        requests = [[rid, inp, out, hold, model, "", ""] for rid, inp, out, hold, model in items]
        args: list[Any] = [self.now, "", json.dumps(requests)]
        flat = self.reserve_script(keys=reserve_keys(self.keys), args=args)
        assert len(flat) == 5 * len(items)
        replies = [flat[i : i + 5] for i in range(0, len(flat), 5)]
        results = []
        for (rid, inp, out, hold, model), reply in zip(items, replies, strict=True):
            got = ref.ReserveResult(reply[0], int(reply[1]), reply[2], reply[4])
            assert int(reply[3]) == self.now
            want = ref.reserve(self.model, rid, inp, out, self.now, hold, model)
            assert got == want, f"reserve({rid}, {inp}, {out}) at {self.now}"
            self.count(f"{got.decision}:{got.reason.split(':')[0]}")
            if rid not in self.ids:
                self.ids.append(rid)
            results.append(got)
        if len(items) > 1:
            self.count("reserve:batch")
        return results

    def settle(self, mode: str, rid: str, usage: tuple[int, int, int, int] = (0, 0, 0, 0)):
        return self.settle_many([(mode, rid, usage)])[0]

    def settle_many(self, items: list[tuple[str, str, tuple[int, int, int, int]]]):
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
        flat = self.settle_script(settle_keys(self.keys), args)
        got = [ref.SettleResult(*(int(x) for x in flat[i : i + 6])) for i in range(0, len(flat), 6)]
        assert got == wants, f"settle {items}"
        if len(items) > 1:
            self.count("settle:batch")
        return got

    def reap(self, limit: int) -> ref.SettleResult:
        reply = self.settle_script(settle_keys(self.keys), [self.now, "reap", limit])
        got = ref.SettleResult(*(int(x) for x in reply))
        want = ref.reap(self.model, self.now, limit)
        assert got == want, f"reap({limit}) at {self.now}"
        return got

    def mark_sent(self, rid: str) -> None:
        self.client.hset(self.keys.resv_sent, rid, "1")
        ref.mark_sent(self.model, rid)

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
        for per, limit in (pol.budgets if pol else {}).items():
            if f"{per}:id" not in budget:
                continue
            pid = budget[f"{per}:id"]
            used, reserved = int(budget[f"{per}:used"]), int(budget[f"{per}:reserved"])
            assert reserved >= 0, f"{per}: reserved {reserved} < 0"
            in_flight = sum(r["i"] + r["o"] for r in resv.values() if r["b"].get(per) == pid)
            assert reserved == in_flight, f"{per}: reserved {reserved} != in flight {in_flight}"
            over = self.excess.get((per, pid), 0)
            assert used + reserved <= limit + over, (
                f"{per} {pid}: used {used} + reserved {reserved} > limit {limit} + excess {over}"
            )
        if pol is not None and pol.max_concurrency is not None:
            assert len(resv) <= pol.max_concurrency
        assert set(snap["deadlines"]) == set(resv)

    def after_settle(self, mode: str, rid: str, got: ref.SettleResult, usage=(0, 0, 0, 0)):
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
            for per, pid in before["b"].items():
                self.excess[(per, pid)] = self.excess.get((per, pid), 0) + max(0, sum(usage) - est)
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
        self.snap = self.check_state()
        assert not set(due) & set(self.snap["resv"])

    def pick(self, target: tuple[bool, int]) -> str | None:
        stale, index = target
        pool = self.ids if stale else sorted(self.snap["resv"])
        return pool[index % len(pool)] if pool else None


# ---------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def sync_redis(redis_url: str):
    client = Redis.from_url(redis_url, decode_responses=True)
    yield (
        client,
        client.register_script(lua_source("admission/reserve.lua")),
        client.register_script(lua_source("admission/settle.lua")),
    )
    client.close()


STATS: dict[str, int] = {}


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    policy=policies(),
    start=st.sampled_from(BOUNDARIES) | st.integers(EARLIEST, LATEST),
    steps=st.lists(ops, min_size=12, max_size=60),
)
# explicit examples that reach every outcome, whatever the random runs draw
@example(policy=None, start=BOUNDARIES[0], steps=[("reserve", None, 10, 10, 0, MODELS[0])])
@example(
    policy=TenantPolicy(rate=RateLimits(rpm=2), max_concurrency=1),
    start=BOUNDARIES[0],
    steps=[
        ("reserve", None, 10, 10, 90_000, MODELS[0]),  # ADMIT
        ("reserve", 0, 10, 10, 90_000, MODELS[0]),  # already_reserved
        ("reserve", None, 10, 10, 90_000, MODELS[0]),  # DEFER concurrency
        ("full", (False, 0)),
        ("reserve", None, 10, 10, 90_000, MODELS[0]),  # ADMIT (bucket just full)
        ("full", (False, 0)),
        ("reserve", None, 10, 10, 90_000, MODELS[0]),  # DEFER rate:rpm
    ],
)
@example(
    policy=TenantPolicy(budgets={"hour": 300}),  # unit: 100 tokens
    start=BOUNDARIES[0],
    steps=[
        ("reserve", None, 1000, 1000, 0, MODELS[0]),  # ADMIT 200
        ("reserve", None, 1000, 500, 0, MODELS[0]),  # DEFER inflight:hour
        ("settle", (False, 0), 5, 100, 3, 0, 0),  # 208 used: 8 over the estimate
        ("reserve", None, 1000, 500, 0, MODELS[0]),  # REJECT exhausted:hour
        ("reserve", None, 3500, 0, 0, MODELS[0]),  # REJECT too_large:budget:hour
        ("reserve", None, 400, 400, 0, MODELS[1]),  # ADMIT 80
        ("mark_sent", (False, 0)),
        ("reserve", None, 100, 100, 0, MODELS[0]),  # DEFER inflight:hour
        ("reap", 1000),  # the sent one: charged in full
        ("release", (True, 0)),  # settled before: nothing
        ("reserve", None, 50, 50, 0, MODELS[0]),  # ADMIT 10
        ("release", (False, 0)),
    ],
)
@example(  # day and month both exhausted, resetting at the same instant: the first one names it
    policy=TenantPolicy(budgets={"day": 100, "month": 100}, on_exhausted="wait"),
    start=_ms("2025-11-30T23:58:30"),
    steps=[
        ("reserve", None, 1000, 1000, 90_000, MODELS[0]),
        ("full", (False, 0)),
        ("reserve", None, 1000, 1000, 0, MODELS[0]),
        ("advance_to", "month", 0),
        ("reserve", None, 1000, 1000, 0, MODELS[1]),
    ],
)
def test_lua_admission_matches_the_reference_model(sync_redis, policy, start, steps) -> None:
    client, reserve_script, settle_script = sync_redis
    h = Harness(client, reserve_script, settle_script, policy, start)
    limits = [*policy.budgets.values(), policy.rate.itpm, policy.rate.otpm] if policy else []
    unit = max(1, min([x for x in limits if x is not None] or [1500]) // 3)
    for op in steps:
        kind = op[0]
        if kind == "reserve":
            _, reuse, inp, out, hold, model = op
            rid = f"r{len(h.ids)}" if reuse is None or not h.ids else h.ids[reuse % len(h.ids)]
            got = h.reserve(rid, inp * unit // 1000, out * unit // 1000, hold, model)
            h.snap = h.check_state()
            if got.decision == "ADMIT" and got.reason == "":
                for kind_ in ref.RATE_KINDS:
                    tat = h.snap["buckets"].get(kind_)
                    if tat is not None:
                        assert float(tat) - h.now <= ref.BUCKET_CAPACITY_MS + 0.0005
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
            items = []
            for _, reuse, inp, out, hold, model in op[1]:
                known = h.ids + [item[0] for item in items]
                rid = f"r{len(known)}" if reuse is None or not known else known[reuse % len(known)]
                items.append((rid, inp * unit // 1000, out * unit // 1000, hold, model))
            h.reserve_many(items)
            h.snap = h.check_state()
        elif kind == "settle_batch":
            batch, open_before = [], dict(h.snap["resv"])
            for mode, target, in_err, out_pct in op[1]:
                rid = h.pick(target)
                if rid is None:
                    continue
                r = open_before.get(rid) or {"i": 10, "o": 10}
                usage = (max(0, r["i"] + in_err), r["o"] * out_pct // 100, 0, 0)
                batch.append((mode, rid, usage if mode == "usage" else (0, 0, 0, 0)))
            if not batch:
                continue
            got = h.settle_many(batch)
            for (mode, rid, usage), result in zip(batch, got, strict=True):
                before = open_before.pop(rid, None)
                assert result.settled == (1 if before is not None else 0)
                if before is not None and mode == "usage":
                    est = before["i"] + before["o"]
                    for per, pid in before["b"].items():
                        extra = max(0, sum(usage) - est)
                        self_excess = h.excess.get((per, pid), 0)
                        h.excess[(per, pid)] = self_excess + extra
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
    assert snap["resv"] == {} and snap["deadlines"] == {}
    for name, value in snap["budget"].items():
        if name.endswith(":reserved"):
            assert value == "0", f"{name} = {value} after every reservation settled"
    for what, n in h.stats.items():
        STATS[what] = STATS.get(what, 0) + n


def test_the_property_exercised_every_outcome() -> None:
    """Runs after the property (file order): the random runs reached every branch."""
    if not STATS:
        pytest.skip("the property test did not run")
    wanted = [
        "ADMIT:",
        "ADMIT:already_reserved",
        "DEFER:rate",
        "DEFER:inflight",
        "DEFER:concurrency",
        "DEFER:exhausted",
        "REJECT:exhausted",
        "REJECT:too_large",
        "REJECT:unknown_tenant",
        "settle:usage",
        "settle:full",
        "settle:release",
        "settle:noop",
        "reap:due",
        "reserve:batch",
        "settle:batch",
    ]
    missing = [w for w in wanted if not STATS.get(w)]
    assert not missing, f"never reached: {missing} (seen {STATS})"


# ---------------------------------------------------------------- calendar periods

PERIOD_PROBE = "\nlocal id, reset = period_of(ARGV[1], tonumber(ARGV[2]))\nreturn {id, reset}\n"


@settings(max_examples=300, deadline=None, database=None)
@given(
    ms=st.integers(0, _ms("2200-01-01T00:00:00"))
    | st.sampled_from(BOUNDARIES).flatmap(lambda b: st.integers(b - 120_000, b + 120_000)),
    period=st.sampled_from(ref.PERIODS),
)
def test_calendar_periods_match_lua_periods(sync_redis, ms: int, period: str) -> None:
    client = sync_redis[0]
    got = client.eval(lua_source("lib/periods.lua") + PERIOD_PROBE, 0, period, ms)
    assert (got[0], int(got[1])) == ref.period_of(period, ms)
