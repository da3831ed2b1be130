"""The entries of a tenant's ``recent`` list: the last admission decisions, written by
``admission/reserve.lua`` as ``'<now ms> <decision> <reason> <tokens>'`` (reason '-' when
there is none, e.g. for ADMIT), read by the status page and ``budgeter top``."""

from __future__ import annotations

from typing import TypedDict


class RecentDecision(TypedDict):
    at_ms: int
    decision: str
    reason: str
    tokens: int


def format_recent(entry: RecentDecision) -> str:
    """What reserve.lua writes (``string.format('%d %s %s %d', ...)``)."""
    reason = entry["reason"] or "-"
    return f"{entry['at_ms']:d} {entry['decision']} {reason} {entry['tokens']:d}"


def parse_recent(text: str) -> RecentDecision:
    ms, decision, reason, tokens = text.split(" ", 3)
    return {
        "at_ms": int(ms or 0),
        "decision": decision,
        "reason": "" if reason == "-" else reason,
        "tokens": int(tokens or 0),
    }
