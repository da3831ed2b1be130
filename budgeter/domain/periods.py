"""UTC calendar periods, computed exactly as ``lib/periods.lua`` does."""

from __future__ import annotations

import datetime as dt

PERIODS: tuple[str, ...] = ("minute", "hour", "day", "month", "total")
"""The UTC calendar periods of a budget, shortest first ('total' never resets)."""


def period_of(period: str, ms: int) -> tuple[str, int]:
    """(period id, end in ms; 0 = never) of the period that contains ``ms``."""
    if period == "total":
        return "total", 0
    t = dt.datetime.fromtimestamp(ms // 1000, tz=dt.UTC)
    if period == "minute":
        start = t.replace(second=0)
        return start.strftime("%Y-%m-%dT%H:%M"), _ms(start + dt.timedelta(minutes=1))
    if period == "hour":
        start = t.replace(minute=0, second=0)
        return start.strftime("%Y-%m-%dT%H"), _ms(start + dt.timedelta(hours=1))
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0)
        return start.strftime("%Y-%m-%d"), _ms(start + dt.timedelta(days=1))
    if period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0)
        following = (start + dt.timedelta(days=32)).replace(day=1)
        return start.strftime("%Y-%m"), _ms(following)
    raise ValueError(f"unknown period {period!r}")


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1000
