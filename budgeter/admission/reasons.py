"""The reason strings ``admission/reserve.lua`` answers with a DEFER or a REJECT, as a
typed :class:`Reason` (``parse_reason``) and back (``format_reason``).

The vocabulary (the script's opening comment is its contract)::

    [global:]rate:[model:]<kind>            a rate bucket (kind rpm | itpm | otpm)
    [global:]exhausted:<counter>            a budget whose used leaves no room
    [global:]inflight:<counter>             a budget held by in-flight reservations
    [global:]too_large:budget:<counter>     a request larger than a budget
    [global:]too_large:rate:[model:]<kind>  a request larger than a bucket
    [global:]concurrency | paused | model_not_allowed | unpriced_model | unknown_tenant

where <counter> is ``[model:][usd:]<period>`` and ``global:`` (added by Python, not Lua)
marks the upstream account's limits. The model's name is never part of a reason.

Along a chain of scopes (budgeter/admission/chain.py) Python prefixes the scope that
refused: ``parent:<tenant>:`` for an ancestor's limit (``parent:research:exhausted:day``) and
``key:`` for the limits of the API key the request came with. :func:`metric_reason` drops
the ancestor's id, so metric labels stay a bounded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, get_args

ReasonKind = Literal[
    "rate",
    "exhausted",
    "inflight",
    "too_large",
    "concurrency",
    "paused",
    "model_not_allowed",
    "unpriced_model",
    "unknown_tenant",
]
REASON_KINDS: frozenset[str] = frozenset(get_args(ReasonKind))
LIMIT_KINDS: frozenset[str] = frozenset({"rate", "exhausted", "inflight", "too_large"})
"""The kinds that name a limit (the others stand alone)."""
GLOBAL_PREFIX = "global:"
PARENT_PREFIX = "parent:"
KEY_PREFIX = "key:"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit named in a reason: ``[model:][usd:]<name>``, where name is a period of a
    budget or the kind of a rate bucket."""

    name: str
    budget: bool
    of_model: bool = False
    usd: bool = False

    def label(self, model: str | None) -> str:
        """'day USD budget of model X', 'rpm rate limit', 'day token budget'."""
        unit = "USD" if self.usd else "token"
        label = f"{self.name} {unit} budget" if self.budget else f"{self.name} rate limit"
        if self.of_model:
            label += f" of model {model}" if model else " of this model"
        return label


@dataclass(frozen=True, slots=True)
class Reason:
    """A parsed reason: its kind, the limit it names (kinds in LIMIT_KINDS), whether it
    is the upstream account's (``global:``), and the scope of the chain that refused:
    ``parent`` (an ancestor tenant's id) or ``key`` (the API key's limits)."""

    kind: ReasonKind
    limit: Limit | None = None
    account: bool = False
    parent: str = ""
    key: bool = False


def format_limit(limit: Limit) -> str:
    return ("model:" if limit.of_model else "") + ("usd:" if limit.usd else "") + limit.name


def parse_limit(text: str, *, budget: bool) -> Limit:
    """``[model:][usd:]<name>`` (no ``usd:`` for a rate bucket)."""
    rest = text
    of_model = rest.startswith("model:")
    rest = rest.removeprefix("model:")
    usd = budget and rest.startswith("usd:")
    if usd:
        rest = rest.removeprefix("usd:")
    if not rest or ":" in rest:
        raise ValueError(f"not a limit name: {text!r}")
    return Limit(rest, budget=budget, of_model=of_model, usd=usd)


def format_reason(reason: Reason) -> str:
    text: str = reason.kind
    limit = reason.limit
    if limit is not None:
        if reason.kind == "too_large":
            text += ":budget" if limit.budget else ":rate"
        text += ":" + format_limit(limit)
    return scope_prefix(reason.parent, key=reason.key, account=reason.account) + text


def scope_prefix(parent: str = "", *, key: bool = False, account: bool = False) -> str:
    """What names the scope of a chain in a reason ('' for the tenant's own)."""
    if account:
        return GLOBAL_PREFIX
    if parent:
        return f"{PARENT_PREFIX}{parent}:"
    return KEY_PREFIX if key else ""


def metric_reason(text: str) -> str:
    """``text`` for a metric label: an ancestor's id dropped (``parent:exhausted:day``)."""
    if text.startswith(PARENT_PREFIX):
        _, _, rest = text.removeprefix(PARENT_PREFIX).partition(":")
        return PARENT_PREFIX + rest
    return text


def parse_reason(text: str) -> Reason:
    """The :class:`Reason` of a reply's reason string; ValueError when it is none."""
    parent, key = "", False
    body = text
    if body.startswith(PARENT_PREFIX):
        parent, _, body = body.removeprefix(PARENT_PREFIX).partition(":")
        if not parent:
            raise ValueError(f"unknown admission reason {text!r}")
    elif body.startswith(KEY_PREFIX):
        key, body = True, body.removeprefix(KEY_PREFIX)
    account = body.startswith(GLOBAL_PREFIX)
    if account and (parent or key):
        raise ValueError(f"unknown admission reason {text!r}")
    kind, _, rest = body.removeprefix(GLOBAL_PREFIX).partition(":")
    if kind not in REASON_KINDS:
        raise ValueError(f"unknown admission reason {text!r}")
    if kind not in LIMIT_KINDS:
        if rest:
            raise ValueError(f"unknown admission reason {text!r}")
        return Reason(cast(ReasonKind, kind), None, account, parent, key)
    budget = kind != "rate"
    if kind == "too_large":
        scope, _, rest = rest.partition(":")
        if scope not in ("budget", "rate"):
            raise ValueError(f"unknown admission reason {text!r}")
        budget = scope == "budget"
    return Reason(cast(ReasonKind, kind), parse_limit(rest, budget=budget), account, parent, key)
