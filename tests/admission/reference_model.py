"""A pure-Python reference model of reserve.lua, settle.lua and mark_sent.lua (lua/admission/).

Same decisions, same state and the same floating point as the Lua (IEEE doubles on both
sides): bucket TATs are kept as the ``'%.3f'`` strings the Lua stores, US-dollar counters
as the ``'%.6f'`` strings it stores, the reservation record keeps what cjson round-trips
(numbers with 14 significant digits), a number in a reason's detail is written as Lua
writes it (``'%.14g'``), and ``math.ceil`` gives the moment a deferred request fits.
``snapshot`` renders the state in the shape of the tenant's Redis keys so a test can
compare the two exactly; the dollars in the usage hash (summed by Redis's HINCRBYFLOAT in
long doubles) are rendered to the micro-dollar, as the test reads them.

The limits of a policy apply in scopes: the policy's own, then the request's model's
(``models[<model>]``, counters ``m:<model>:<period>``, buckets ``m:<model>:<kind>``, named
``model:...`` in reasons). Within a scope the token budgets come before the dollar budgets,
each in PERIODS order; every budget of every scope is checked before concurrency, and the
buckets (rpm, itpm, otpm per scope) after it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from budgeter.domain.price_arg import PriceArg, Rates, parse_price_arg

PERIODS: tuple[str, ...] = ("minute", "hour", "day", "month", "total")
RATE_KINDS: tuple[str, ...] = ("rpm", "itpm", "otpm")
USAGE_PERIODS: tuple[str, ...] = ("day", "month", "total")
BUCKET_CAPACITY_MS = 60_000

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS_PER_DAY = 86_400_000


def fmt(x: float) -> str:
    """``string.format('%.3f', x)``: how the Lua stores a TAT."""
    return f"{x:.3f}"


def fmt6(x: float) -> str:
    """``string.format('%.6f', x)``: how the Lua stores US dollars."""
    return f"{x:.6f}"


def cjson_number(x: float) -> float:
    """A number after ``cjson.encode`` + ``cjson.decode`` (``%.14g``)."""
    return float(f"{x:.14g}")


def lua_str(x: float) -> str:
    """A number concatenated to a Lua string (``%.14g``: 100 for 100.0)."""
    return f"{x:.14g}"


def usd_of(amounts: tuple[int, int, int, int], prices: PriceArg) -> float:
    """Dollars for (input, output, cache_creation, cache_read) tokens at the rates of the
    tier their input + cache_creation + cache_read falls in (lib/prices.lua prices_usage)."""
    a_in, a_out, a_cc, a_cr = amounts
    r = prices.rates_at(a_in + a_cc + a_cr)
    return (a_in * r.input + a_out * r.output + a_cc * r.cache_write + a_cr * r.cache_read) / 1e6


def reserve_usd(prices: PriceArg, input_tokens: int, max_tokens: int) -> float:
    """lib/prices.lua prices_reserve: the dearest the request can turn out, all its input
    written to the cache, in the base tier or any tier its counted input is over."""

    def cost(r: Rates) -> float:
        return (input_tokens * max(r.input, r.cache_write) + max_tokens * r.output) / 1e6

    usd = cost(prices.base)
    for tier in prices.tiers:
        if input_tokens > tier.above:
            usd = max(usd, cost(tier.rates))
    return usd


def parse_prices(arg: str) -> PriceArg:
    return parse_price_arg(arg)


def period_of(period: str, ms: int) -> tuple[str, int]:
    """The UTC calendar period containing ``ms``: (id, end ms); 'total' never resets (0)."""
    if period == "total":
        return "total", 0
    when = _EPOCH + dt.timedelta(milliseconds=ms)
    date = f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
    if period == "day":
        return date, (ms // _MS_PER_DAY + 1) * _MS_PER_DAY
    if period == "hour":
        return f"{date}T{when.hour:02d}", (ms // 3_600_000 + 1) * 3_600_000
    if period == "minute":
        return f"{date}T{when.hour:02d}:{when.minute:02d}", (ms // 60_000 + 1) * 60_000
    if period == "month":
        year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
        first = dt.datetime(year, month, 1, tzinfo=dt.UTC)
        return f"{when.year:04d}-{when.month:02d}", (first - _EPOCH).days * _MS_PER_DAY
    raise ValueError(f"unknown period {period!r}")


@dataclass(frozen=True)
class Limits:
    """The limits of one scope: token budgets, dollar budgets, per-minute rates."""

    budgets: dict[str, int] = field(default_factory=dict)
    usd_budgets: dict[str, float] = field(default_factory=dict)
    rates: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """The fields of the flattened TenantPolicy the admission script reads."""

    budgets: dict[str, int] = field(default_factory=dict)
    rates: dict[str, int] = field(default_factory=dict)
    max_concurrency: int | None = None
    on_exhausted: str = "reject"
    usd_budgets: dict[str, float] = field(default_factory=dict)
    models: dict[str, Limits] = field(default_factory=dict)
    allowed_models: frozenset[str] | None = None  # None: every model

    def scopes(self, model: str) -> list[tuple[str, str, Limits]]:
        """(counter/bucket prefix, reason prefix, limits) that apply to ``model``, in order."""
        own = Limits(self.budgets, self.usd_budgets, self.rates)
        found = [("", "", own)]
        if model in self.models:
            found.append((f"m:{model}:", "model:", self.models[model]))
        return found


@dataclass
class Budget:
    """A token counter (integers, stored as such)."""

    id: str
    used: int
    reserved: int


@dataclass
class UsdBudget:
    """A dollar counter: ``used`` and ``reserved`` are the '%.6f' strings stored."""

    id: str
    used: str
    reserved: str


@dataclass(frozen=True)
class _Check:
    """One budget a request is checked against (a counter in the period now)."""

    counter: str
    label: str
    usd: bool
    limit: float
    pid: str
    reset: int


@dataclass
class Reservation:
    """What admission/reserve.lua records (after the cjson round trip)."""

    input: int
    output: int
    model: str
    t: int
    periods: dict[str, str]
    intervals: dict[str, float]
    prices: str | None = None  # the price argument, when the request was priced
    usd: float = 0.0  # the dollar estimate as recorded (14 significant digits)
    usd_periods: dict[str, str] = field(default_factory=dict)  # dollar counter -> period id

    @property
    def est(self) -> int:
        return self.input + self.output

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "i": self.input,
            "o": self.output,
            "m": self.model,
            "t": self.t,
            "b": dict(self.periods),
            "r": dict(self.intervals),
        }
        if self.prices is not None:
            rec["p"] = self.prices
            rec["u"] = self.usd
        if self.usd_periods:
            rec["d"] = dict(self.usd_periods)
        return rec


@dataclass
class State:
    """One tenant: policy, buckets, budgets, reservations, sent marks, usage, flags."""

    policy: Policy | None
    buckets: dict[str, str] = field(default_factory=dict)  # kind -> TAT as stored ('%.3f')
    budgets: dict[str, Budget] = field(default_factory=dict)  # counter -> current record
    usd_budgets: dict[str, UsdBudget] = field(default_factory=dict)  # usd counter -> record
    reservations: dict[str, Reservation] = field(default_factory=dict)
    deadlines: dict[str, int] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    usage: dict[str, int] = field(default_factory=dict)
    usage_usd: dict[str, Decimal] = field(default_factory=dict)  # ...:usd -> dollars
    waiting_settle: bool = False

    def snapshot(self) -> dict[str, Any]:
        """The state in the shape of the Redis keys (see ``redis_snapshot`` in the tests)."""
        budget: dict[str, str] = {}
        for per, b in self.budgets.items():
            budget[f"{per}:id"] = b.id
            budget[f"{per}:used"] = str(b.used)
            budget[f"{per}:reserved"] = str(b.reserved)
        for per, u in self.usd_budgets.items():
            budget[f"{per}:id"] = u.id
            budget[f"{per}:used"] = u.used
            budget[f"{per}:reserved"] = u.reserved
        usage = {k: str(v) for k, v in self.usage.items()}
        usage |= {k: f"{v:.6f}" for k, v in self.usage_usd.items()}
        return {
            "budget": budget,
            "buckets": dict(self.buckets),
            "resv": {rid: r.record() for rid, r in self.reservations.items()},
            "deadlines": {rid: float(d) for rid, d in self.deadlines.items()},
            "sent": set(self.sent),
            "usage": usage,
            "state": {"waiting_settle": "1"} if self.waiting_settle else {},
        }


class ReserveResult(NamedTuple):
    decision: str
    until_ms: int
    reason: str
    detail: str = ""


class SettleResult(NamedTuple):
    settled: int
    waiting_settle: int
    charged_full: int
    released: int
    actual_tokens: int
    reserved_tokens: int


def _checks(pol: Policy, model: str, now: int) -> list[_Check]:
    """Every budget that applies to ``model`` at ``now``, in the order they are checked."""
    found = []
    for prefix, label, limits in pol.scopes(model):
        for usd, table in ((False, limits.budgets), (True, limits.usd_budgets)):
            for per in PERIODS:
                limit = table.get(per)
                if limit is None:
                    continue
                unit = "usd:" if usd else ""
                pid, reset = period_of(per, now)
                found.append(
                    _Check(f"{prefix}{unit}{per}", f"{label}{unit}{per}", usd, limit, pid, reset)
                )
    return found


def _counter_now(state: State, check: _Check) -> tuple[float, float]:
    """(used, reserved) of a counter in the period now: nothing in a new period."""
    if check.usd:
        u = state.usd_budgets.get(check.counter)
        return (float(u.used), float(u.reserved)) if u and u.id == check.pid else (0, 0)
    b = state.budgets.get(check.counter)
    return (b.used, b.reserved) if b and b.id == check.pid else (0, 0)


def reserve(
    state: State,
    rid: str,
    input_tokens: int,
    max_tokens: int,
    now_ms: int,
    hold_ms: int,
    model: str,
    sent: bool = False,
    prices: str | None = None,
) -> ReserveResult:
    """reserve.lua: ADMIT applies every limit, DEFER and REJECT change nothing (but the flag).

    ``prices``: the model's price argument (budgeter/domain/price_arg.py: base rates and
    long-context tiers), None when it has no price. ``sent``: the reservation is marked
    sent when admitted."""
    now = now_ms
    if rid in state.reservations:
        return ReserveResult("ADMIT", 0, "already_reserved")
    pol = state.policy
    if pol is None:
        return ReserveResult("REJECT", 0, "unknown_tenant")
    if pol.allowed_models is not None and model not in pol.allowed_models:
        return ReserveResult("REJECT", 0, "model_not_allowed", model)

    est = input_tokens + max_tokens
    price = parse_prices(prices) if prices is not None else None
    # priced at the dearest the request can turn out: all input written to the cache
    usd_est = reserve_usd(price, input_tokens, max_tokens) if price is not None else 0.0
    settle_wait, wait_reason = False, None
    exhausted_until, exhausted_reason = 0, None

    # 1. calendar budgets, tokens and dollars
    checks = _checks(pol, model, now)
    current: list[tuple[_Check, float, float]] = []
    for check in checks:
        if check.usd and price is None:
            return ReserveResult("REJECT", 0, "unpriced_model", model)
        cost: float = usd_est if check.usd else est
        used, reserved = _counter_now(state, check)
        if cost > check.limit:
            detail = f"{lua_str(cost)}/{lua_str(check.limit)}"
            return ReserveResult("REJECT", 0, f"too_large:budget:{check.label}", detail)
        if used + cost > check.limit:
            if pol.on_exhausted == "wait" and check.reset > 0:
                if check.reset > exhausted_until:
                    exhausted_until, exhausted_reason = check.reset, f"exhausted:{check.label}"
            else:
                detail = f"{lua_str(used)}/{lua_str(check.limit)}"
                return ReserveResult("REJECT", check.reset, f"exhausted:{check.label}", detail)
        elif used + reserved + cost > check.limit:
            settle_wait = True
            wait_reason = wait_reason or f"inflight:{check.label}"
        current.append((check, used, reserved))

    # 2. concurrency
    if pol.max_concurrency is not None and len(state.reservations) >= pol.max_concurrency:
        settle_wait = True
        wait_reason = wait_reason or "concurrency"

    # 3. GCRA buckets, the policy's then the model's
    costs = {"rpm": 1, "itpm": input_tokens, "otpm": max_tokens}
    new_tats: dict[str, float] = {}
    intervals: dict[str, float] = {}
    rate_until, rate_reason = 0, None
    for prefix, label, limits in pol.scopes(model):
        for kind in RATE_KINDS:
            limit = limits.rates.get(kind)
            if limit is None:
                continue
            bucket, cost_n = f"{prefix}{kind}", costs[kind]
            if cost_n > limit:
                return ReserveResult(
                    "REJECT", 0, f"too_large:rate:{label}{kind}", f"{cost_n}/{limit}"
                )
            interval = BUCKET_CAPACITY_MS / limit
            stored = state.buckets.get(bucket)
            tat: float = float(stored) if stored is not None else now
            if tat < now:
                tat = now
            new_tat = tat + cost_n * interval
            if new_tat - now > BUCKET_CAPACITY_MS:
                fits_at = math.ceil(new_tat - BUCKET_CAPACITY_MS)
                if fits_at > rate_until:
                    rate_until, rate_reason = fits_at, f"rate:{label}{kind}"
            new_tats[bucket] = new_tat
            intervals[bucket] = interval

    if exhausted_reason:
        return ReserveResult("DEFER", exhausted_until, exhausted_reason)
    if rate_until > 0 or settle_wait:
        if settle_wait:
            state.waiting_settle = True
        return ReserveResult("DEFER", rate_until, rate_reason or wait_reason or "")

    # ADMIT
    for bucket, tat in new_tats.items():
        state.buckets[bucket] = fmt(tat)
    for check, used, reserved in current:
        if check.usd:
            prev = state.usd_budgets.get(check.counter)
            used_s = prev.used if prev is not None and prev.id == check.pid else fmt6(0)
            state.usd_budgets[check.counter] = UsdBudget(
                check.pid, used_s, fmt6(reserved + usd_est)
            )
        else:
            state.budgets[check.counter] = Budget(check.pid, int(used), int(reserved) + est)
    state.reservations[rid] = Reservation(
        input=input_tokens,
        output=max_tokens,
        model=model,
        t=now,
        periods={c.counter: c.pid for c, _, _ in current if not c.usd},
        intervals={bucket: cjson_number(iv) for bucket, iv in intervals.items()},
        prices=prices,
        usd=cjson_number(usd_est),
        usd_periods={c.counter: c.pid for c, _, _ in current if c.usd},
    )
    state.deadlines[rid] = now + hold_ms
    if sent:
        state.sent.add(rid)
    # until: when the policy-wide request bucket takes the next request, if not now
    next_ms = 0
    if "rpm" in new_tats:
        at = math.ceil(new_tats["rpm"] + intervals["rpm"] - BUCKET_CAPACITY_MS)
        next_ms = at if at > now else 0
    return ReserveResult("ADMIT", next_ms, "")


def _settle_one(
    state: State, rid: str, kind: str, a_in: int = 0, a_out: int = 0, a_cc: int = 0, a_cr: int = 0
) -> tuple[bool, int, int]:
    r = state.reservations.get(rid)
    if r is None:
        return False, 0, 0
    est = r.est
    if kind == "full":
        a_in, a_out, a_cc, a_cr = r.input, r.output, 0, 0
    elif kind == "release":
        a_in, a_out, a_cc, a_cr = 0, 0, 0, 0
    total_in = a_in + a_cc + a_cr
    total = total_in + a_out
    usd = 0.0
    if r.prices is not None:
        # in full: the dollars reserved; else the usage at the model's prices
        usd = r.usd if kind == "full" else usd_of((a_in, a_out, a_cc, a_cr), parse_prices(r.prices))

    for bucket, interval in r.intervals.items():
        what = bucket.rsplit(":", 1)[-1]
        delta = 0
        if what == "itpm":
            delta = total_in - r.input
        elif what == "otpm":
            delta = a_out - r.output
        elif kind == "release":
            delta = -1
        if delta != 0 and bucket in state.buckets:
            state.buckets[bucket] = fmt(float(state.buckets[bucket]) + delta * interval)

    for counter, pid in r.periods.items():
        cur = state.budgets.get(counter)
        if cur is not None and cur.id == pid:
            cur.reserved = max(cur.reserved - est, 0)
            cur.used += total

    for counter, pid in r.usd_periods.items():
        u = state.usd_budgets.get(counter)
        if u is not None and u.id == pid:
            left = float(u.reserved) - r.usd
            u.reserved = fmt6(0 if left < 0.0000005 else left)  # below half a micro-dollar: 0
            u.used = fmt6(float(u.used) + usd)

    if kind != "release":
        amounts = {
            "input": a_in,
            "output": a_out,
            "cache_creation": a_cc,
            "cache_read": a_cr,
            "requests": 1,
        }
        for per in USAGE_PERIODS:
            pid, _ = period_of(per, r.t)
            for what, n in amounts.items():
                if n > 0:
                    key = f"{per}:{pid}:{r.model}:{what}"
                    state.usage[key] = state.usage.get(key, 0) + n
            if usd > 0:
                key = f"{per}:{pid}:{r.model}:usd"
                state.usage_usd[key] = state.usage_usd.get(key, Decimal(0)) + Decimal(fmt6(usd))

    del state.reservations[rid]
    state.deadlines.pop(rid, None)
    state.sent.discard(rid)
    return True, total, est


class _Tally:
    def __init__(self) -> None:
        self.settled = self.full = self.released = self.actual = self.reserved = 0

    def add(self, kind: str, ok: bool, actual: int, est: int) -> None:
        if ok:
            self.settled += 1
            self.actual += actual
            self.reserved += est
            if kind == "full":
                self.full += 1
            elif kind == "release":
                self.released += 1

    def result(self, state: State) -> SettleResult:
        waiting = 0
        if self.settled > 0 and state.waiting_settle:
            state.waiting_settle = False
            waiting = 1
        return SettleResult(
            self.settled, waiting, self.full, self.released, self.actual, self.reserved
        )


def settle(
    state: State,
    rid: str,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int,
    cache_read_input_tokens: int,
    now_ms: int,
) -> SettleResult:
    """admission/settle.lua mode 'usage': replace the reservation by the reported usage, once."""
    del now_ms  # only the reaper reads the clock
    tally = _Tally()
    ok, actual, est = _settle_one(
        state,
        rid,
        "usage",
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
    )
    tally.add("usage", ok, actual, est)
    return tally.result(state)


def charge_full(state: State, rid: str, now_ms: int) -> SettleResult:
    """admission/settle.lua mode 'full': charge the whole reservation."""
    del now_ms
    tally = _Tally()
    tally.add("full", *_settle_one(state, rid, "full"))
    return tally.result(state)


def release(state: State, rid: str, now_ms: int) -> SettleResult:
    """admission/settle.lua mode 'release': charge nothing, give the bucket tokens back."""
    del now_ms
    tally = _Tally()
    tally.add("release", *_settle_one(state, rid, "release"))
    return tally.result(state)


def mark_sent(state: State, rid: str) -> bool:
    """admission/mark_sent.lua: mark a reservation still held as sent (the reaper then
    charges it in full); a settled or reaped one is not marked (False)."""
    if rid not in state.reservations:
        return False
    state.sent.add(rid)
    return True


def reap(state: State, now_ms: int, limit: int = 1000) -> SettleResult:
    """admission/settle.lua mode 'reap': due reservations (deadline <= now, by deadline then id,
    at most ``limit``) are charged in full if marked sent, else released."""
    due = sorted((d, rid) for rid, d in state.deadlines.items() if d <= now_ms)[:limit]
    tally = _Tally()
    for _, rid in due:
        kind = "full" if rid in state.sent else "release"
        ok, actual, est = _settle_one(state, rid, kind)
        if not ok:
            state.deadlines.pop(rid, None)
        tally.add(kind, ok, actual, est)
    return tally.result(state)
