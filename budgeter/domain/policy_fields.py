"""The field names of a tenant's flattened policy hash (what ``admission/reserve.lua``
reads) and of the budget counters it keeps, formatted and parsed in one place.

Policy hash (``TenantKeys.policy``; absent field = no limit)::

    json  weight  on_exhausted  max_concurrency  allowlist  allow:<model>
    [m:<model>:]budget:<period>   tokens per period
    [m:<model>:]usd:<period>      US dollars per period
    [m:<model>:]rate:<kind>       per-minute bucket (rpm | itpm | otpm)

Budget hash (``AdmissionKeys.budget``): ``<counter>:id|used|reserved`` where a counter is
``[m:<model>:][usd:]<period>``. A model's name may contain ':'; it is always followed by
exactly two more parts, so fields are parsed from the right.

Buckets hash (``AdmissionKeys.buckets``): ``[m:<model>:]<kind>`` -> the GCRA theoretical
arrival time in ms, a decimal with 3 decimals as ``admission/reserve.lua`` and ``settle.lua``
write it (``fmt``: '%.3f'); ``bucket_field``, ``parse_bucket_field``, ``format_tat``, ``parse_tat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

from budgeter.domain.periods import PERIODS

RATE_KINDS: tuple[str, ...] = ("rpm", "itpm", "otpm")

JSON = "json"
"""The policy as the admin API wrote it (``TenantPolicy.model_dump_json``)."""
WEIGHT = "weight"
ON_EXHAUSTED = "on_exhausted"
MAX_CONCURRENCY = "max_concurrency"
NOTIFY = "notify"  # budget notification thresholds, "0.5,0.8,1.0" (NotifyPolicy.flat)
ALLOWLIST = "allowlist"
ALLOW_PREFIX = "allow:"
MODEL_PREFIX = "m:"

LimitKind = Literal["budget", "usd", "rate"]
_NAMES: dict[str, tuple[str, ...]] = {"budget": PERIODS, "usd": PERIODS, "rate": RATE_KINDS}

CounterPart = Literal["id", "used", "reserved"]


@dataclass(frozen=True, slots=True)
class LimitField:
    """One limit of the flat policy: a token budget, a USD budget or a rate bucket (its
    ``name`` a period or a rate kind), of the policy itself or of one ``model``."""

    kind: LimitKind
    name: str
    model: str | None = None


def model_scope(model: str | None) -> str:
    """'' for the policy's own limits, 'm:<model>:' for a model's."""
    return "" if model is None else f"{MODEL_PREFIX}{model}:"


def format_field(field: LimitField) -> str:
    return f"{model_scope(field.model)}{field.kind}:{field.name}"


def parse_field(name: str) -> LimitField | None:
    """The limit a field names; None for any other field (json, weight, allow:...)."""
    model: str | None = None
    if name.startswith(MODEL_PREFIX):
        parts = name.removeprefix(MODEL_PREFIX).rsplit(":", 2)
        if len(parts) != 3 or not parts[0]:
            return None
        model, kind, limit = parts
    else:
        kind, _, limit = name.partition(":")
    if limit not in _NAMES.get(kind, ()):
        return None
    return LimitField(cast(LimitKind, kind), limit, model)


def allow_field(model: str) -> str:
    return f"{ALLOW_PREFIX}{model}"


def field_models(fields: dict[str, str]) -> list[str]:
    """The models that have limits of their own in a flat policy, sorted."""
    return sorted({f.model for name in fields if (f := parse_field(name)) is not None and f.model})


def budget_counter(period: str, *, usd: bool = False, model: str | None = None) -> str:
    """The counter of a budget: '[m:<model>:][usd:]<period>'."""
    return f"{model_scope(model)}{'usd:' if usd else ''}{period}"


def counter_field(counter: str, part: CounterPart) -> str:
    """'<counter>:id' (period id), ':used' or ':reserved' in the budget hash."""
    return f"{counter}:{part}"


def bucket_field(kind: str, model: str | None = None) -> str:
    """The buckets hash field of a rate kind (rpm | itpm | otpm): '[m:<model>:]<kind>'."""
    return f"{model_scope(model)}{kind}"


def parse_bucket_field(name: str) -> tuple[str, str | None] | None:
    """(kind, model) of a buckets hash field; None for anything else."""
    model: str | None = None
    kind = name
    if name.startswith(MODEL_PREFIX):
        model, sep, kind = name.removeprefix(MODEL_PREFIX).rpartition(":")
        if not sep or not model:
            return None
    if kind not in RATE_KINDS:
        return None
    return kind, model


def format_tat(tat_ms: float) -> str:
    """What lib/periods.lua's ``fmt`` writes: '%.3f'."""
    return f"{tat_ms:.3f}"


def parse_tat(value: str | bytes | None) -> float | None:
    """A bucket's theoretical arrival time (ms); None when absent or unreadable (the
    bucket then counts as full)."""
    if value is None:
        return None
    try:
        tat = float(value)
    except ValueError:
        return None
    return tat if math.isfinite(tat) else None
