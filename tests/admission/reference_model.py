"""A pure-Python reference model of reserve.lua and settle.lua (lua/admission/).

Same decisions, same state and the same floating point as the Lua (IEEE doubles on both
sides): bucket TATs are kept as the ``'%.3f'`` strings the Lua stores, the reservation
record keeps what cjson round-trips (numbers with 14 significant digits), and
``math.ceil`` gives the moment a deferred request fits. ``snapshot`` renders the state in
the shape of the tenant's Redis keys so a test can compare the two exactly.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

PERIODS: tuple[str, ...] = ("minute", "hour", "day", "month", "total")
RATE_KINDS: tuple[str, ...] = ("rpm", "itpm", "otpm")
USAGE_PERIODS: tuple[str, ...] = ("day", "month", "total")
BUCKET_CAPACITY_MS = 60_000

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS_PER_DAY = 86_400_000


def fmt(x: float) -> str:
    """``string.format('%.3f', x)``: how the Lua stores a TAT."""
    return f"{x:.3f}"


def cjson_number(x: float) -> float:
    """A number after ``cjson.encode`` + ``cjson.decode`` (``%.14g``)."""
    return float(f"{x:.14g}")


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
class Policy:
    """The fields of the flattened TenantPolicy the admission script reads."""

    budgets: dict[str, int] = field(default_factory=dict)
    rates: dict[str, int] = field(default_factory=dict)
    max_concurrency: int | None = None
    on_exhausted: str = "reject"


@dataclass
class Budget:
    id: str
    used: int
    reserved: int


@dataclass
class Reservation:
    """What admission/reserve.lua records (after the cjson round trip)."""

    input: int
    output: int
    model: str
    t: int
    periods: dict[str, str]
    intervals: dict[str, float]

    @property
    def est(self) -> int:
        return self.input + self.output

    def record(self) -> dict[str, Any]:
        return {
            "i": self.input,
            "o": self.output,
            "m": self.model,
            "t": self.t,
            "b": dict(self.periods),
            "r": dict(self.intervals),
        }


@dataclass
class State:
    """One tenant: policy, buckets, budgets, reservations, sent marks, usage, flags."""

    policy: Policy | None
    buckets: dict[str, str] = field(default_factory=dict)  # kind -> TAT as stored ('%.3f')
    budgets: dict[str, Budget] = field(default_factory=dict)  # period -> current record
    reservations: dict[str, Reservation] = field(default_factory=dict)
    deadlines: dict[str, int] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    usage: dict[str, int] = field(default_factory=dict)
    waiting_settle: bool = False

    def snapshot(self) -> dict[str, Any]:
        """The state in the shape of the Redis keys (see ``redis_snapshot`` in the tests)."""
        budget: dict[str, str] = {}
        for per, b in self.budgets.items():
            budget[f"{per}:id"] = b.id
            budget[f"{per}:used"] = str(b.used)
            budget[f"{per}:reserved"] = str(b.reserved)
        return {
            "budget": budget,
            "buckets": dict(self.buckets),
            "resv": {rid: r.record() for rid, r in self.reservations.items()},
            "deadlines": {rid: float(d) for rid, d in self.deadlines.items()},
            "sent": set(self.sent),
            "usage": {k: str(v) for k, v in self.usage.items()},
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


def reserve(
    state: State,
    rid: str,
    input_tokens: int,
    max_tokens: int,
    now_ms: int,
    hold_ms: int,
    model: str,
) -> ReserveResult:
    """reserve.lua: ADMIT applies every limit, DEFER and REJECT change nothing (but the flag)."""
    now = now_ms
    if rid in state.reservations:
        return ReserveResult("ADMIT", 0, "already_reserved")
    pol = state.policy
    if pol is None:
        return ReserveResult("REJECT", 0, "unknown_tenant")

    est = input_tokens + max_tokens
    settle_wait, wait_reason = False, None
    exhausted_until, exhausted_reason = 0, None

    # 1. calendar budgets
    budgets: dict[str, tuple[str, int, int]] = {}
    for per in PERIODS:
        limit = pol.budgets.get(per)
        if limit is None:
            continue
        pid, reset = period_of(per, now)
        cur = state.budgets.get(per)
        used, reserved = (cur.used, cur.reserved) if cur is not None and cur.id == pid else (0, 0)
        if est > limit:
            return ReserveResult("REJECT", 0, f"too_large:budget:{per}", f"{est}/{limit}")
        if used + est > limit:
            if pol.on_exhausted == "wait" and reset > 0:
                if reset > exhausted_until:
                    exhausted_until, exhausted_reason = reset, f"exhausted:{per}"
            else:
                return ReserveResult("REJECT", reset, f"exhausted:{per}", f"{used}/{limit}")
        elif used + reserved + est > limit:
            settle_wait = True
            wait_reason = wait_reason or f"inflight:{per}"
        budgets[per] = (pid, used, reserved)

    # 2. concurrency
    if pol.max_concurrency is not None and len(state.reservations) >= pol.max_concurrency:
        settle_wait = True
        wait_reason = wait_reason or "concurrency"

    # 3. GCRA buckets
    costs = {"rpm": 1, "itpm": input_tokens, "otpm": max_tokens}
    new_tats: dict[str, float] = {}
    intervals: dict[str, float] = {}
    rate_until, rate_reason = 0, None
    for kind in RATE_KINDS:
        limit = pol.rates.get(kind)
        if limit is None:
            continue
        cost = costs[kind]
        if cost > limit:
            return ReserveResult("REJECT", 0, f"too_large:rate:{kind}", f"{cost}/{limit}")
        interval = BUCKET_CAPACITY_MS / limit
        stored = state.buckets.get(kind)
        tat: float = float(stored) if stored is not None else now
        if tat < now:
            tat = now
        new_tat = tat + cost * interval
        if new_tat - now > BUCKET_CAPACITY_MS:
            fits_at = math.ceil(new_tat - BUCKET_CAPACITY_MS)
            if fits_at > rate_until:
                rate_until, rate_reason = fits_at, f"rate:{kind}"
        new_tats[kind] = new_tat
        intervals[kind] = interval

    if exhausted_reason:
        return ReserveResult("DEFER", exhausted_until, exhausted_reason)
    if rate_until > 0 or settle_wait:
        if settle_wait:
            state.waiting_settle = True
        return ReserveResult("DEFER", rate_until, rate_reason or wait_reason or "")

    # ADMIT
    for kind, tat in new_tats.items():
        state.buckets[kind] = fmt(tat)
    for per, (pid, used, reserved) in budgets.items():
        state.budgets[per] = Budget(pid, used, reserved + est)
    state.reservations[rid] = Reservation(
        input=input_tokens,
        output=max_tokens,
        model=model,
        t=now,
        periods={per: b[0] for per, b in budgets.items()},
        intervals={kind: cjson_number(iv) for kind, iv in intervals.items()},
    )
    state.deadlines[rid] = now + hold_ms
    return ReserveResult("ADMIT", 0, "")


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

    for bucket, interval in r.intervals.items():
        delta = 0
        if bucket == "itpm":
            delta = total_in - r.input
        elif bucket == "otpm":
            delta = a_out - r.output
        elif kind == "release":
            delta = -1
        if delta != 0 and bucket in state.buckets:
            state.buckets[bucket] = fmt(float(state.buckets[bucket]) + delta * interval)

    for per, pid in r.periods.items():
        cur = state.budgets.get(per)
        if cur is not None and cur.id == pid:
            cur.reserved = max(cur.reserved - est, 0)
            cur.used += total

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


def mark_sent(state: State, rid: str) -> None:
    """The harness's raw HSET resv_sent <id> 1, whether or not the reservation exists
    (Admission.mark_sent itself marks only a reservation still held: admission/mark_sent.lua)."""
    state.sent.add(rid)


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
