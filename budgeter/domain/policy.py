"""Tenant ids and tenant policies: the pydantic models at the edge, flattened for Lua."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    field_validator,
    model_validator,
)

from budgeter.domain import policy_fields as pf
from budgeter.domain.passthrough import check_beta_name
from budgeter.domain.policy_fields import RATE_KINDS, LimitField, format_field

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
Period = Literal["minute", "hour", "day", "month", "total"]
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")


# Limits are exact integers in Lua (doubles): at most 2**53. Policies are strict (no "600"
# for 600) and refuse NaN and infinities, however they are parsed.
MAX_LIMIT = 2**53
PositiveInt = Annotated[int, Field(gt=0, le=MAX_LIMIT)]
POLICY_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InvalidTenantError(ValueError):
    """A tenant id outside ``^[a-z0-9][a-z0-9_-]{0,62}$``."""


def check_tenant_id(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_ID_RE.fullmatch(tenant):
        shown = repr(tenant)
        if len(shown) > 80:  # a hostile 10 KB id is not echoed whole
            shown = f"{shown[:60]}... ({len(shown)} characters)"
        raise InvalidTenantError(
            f"invalid tenant id {shown}: use 1-63 characters a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


class RateLimits(BaseModel):
    """Per-minute token buckets that refill continuously, as the upstream's own limits do."""

    model_config = POLICY_CONFIG

    rpm: PositiveInt | None = Field(default=None, description="Requests per minute.")
    itpm: PositiveInt | None = Field(default=None, description="Input tokens per minute.")
    otpm: PositiveInt | None = Field(default=None, description="Output tokens per minute.")


ModelName = str
MODEL_NAME_MAX = 200
USD_DECIMALS = 6


def _check_models(names: list[str]) -> None:
    for name in names:
        if not name or len(name) > MODEL_NAME_MAX or any(ord(c) < 32 for c in name):
            raise ValueError(
                f"invalid model name {name!r}: 1-{MODEL_NAME_MAX} printable characters"
            )


class SpendLimits(BaseModel):
    """Token and dollar budgets and rate limits of one scope inside a policy: one model
    (:class:`ModelLimits`) or one API key (budgeter/domain/key_limits.py)."""

    model_config = POLICY_CONFIG

    budgets: dict[Period, PositiveInt] = Field(
        default_factory=dict, description="Tokens per UTC calendar period."
    )
    usd_budgets: dict[Period, PositiveFloat] = Field(
        default_factory=dict, description="US dollars per UTC calendar period."
    )
    rate: RateLimits = Field(default_factory=RateLimits)

    def flat(self, model: str | None = None) -> dict[str, str]:
        """The flat fields of these limits, of the policy itself or of ``model``."""
        fields: dict[str, str] = {}
        for period, limit in self.budgets.items():
            fields[format_field(LimitField("budget", period, model))] = str(limit)
        for period, usd in self.usd_budgets.items():
            fields[format_field(LimitField("usd", period, model))] = repr(float(usd))
        for kind in RATE_KINDS:
            limit = getattr(self.rate, kind)
            if limit is not None:
                fields[format_field(LimitField("rate", kind, model))] = str(limit)
        return fields


class ModelLimits(SpendLimits):
    """Limits that apply to one model only, on top of the policy's own."""


class NotifyPolicy(BaseModel):
    """Budget notifications: an event when the used share of any budget first reaches
    each threshold in a period (and ``budget.exhausted`` at 1.0)."""

    model_config = POLICY_CONFIG

    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        min_length=1,
        max_length=10,
        description="Fractions of each budget (0 < t <= 1), e.g. [0.5, 0.8, 1.0].",
    )

    @field_validator("thresholds")
    @classmethod
    def _sorted(cls, value: list[float]) -> list[float]:
        return sorted(set(value))

    def flat(self) -> str:
        """The policy hash's ``notify`` field: the thresholds, ascending, comma-separated."""
        return ",".join(repr(float(t)) for t in self.thresholds)


class TenantPolicy(BaseModel):
    """What one tenant may spend. Every field may be absent (no limit)."""

    model_config = POLICY_CONFIG

    weight: PositiveFloat = Field(default=1.0, description="Share in the fair scheduler.")
    parent: str | None = Field(
        default=None,
        description="The parent tenant in the organisation tree (it must exist; at most "
        "4 levels below a root, no cycles).",
    )
    budgets: dict[Period, PositiveInt] = Field(
        default_factory=dict,
        description="Total tokens (input + output, cache included) per UTC calendar period.",
    )
    usd_budgets: dict[Period, PositiveFloat] = Field(
        default_factory=dict,
        description="US dollars per UTC calendar period, priced by BUDGETER_PRICES.",
    )
    rate: RateLimits = Field(default_factory=RateLimits)
    models: dict[ModelName, ModelLimits] = Field(
        default_factory=dict, description="Limits of one model, on top of the ones above."
    )
    allowed_models: list[ModelName] | None = Field(
        default=None, description="When set, requests for any other model are refused."
    )
    allowed_betas: list[str] | None = Field(
        default=None,
        description="When set, a request with any other anthropic-beta value is refused.",
    )
    fallback_models: dict[ModelName, ModelName] = Field(
        default_factory=dict,
        description="Model -> model served instead when a budget (tokens or USD: the "
        "tenant's, a model's, an ancestor's) cannot hold a request for it: admitted once "
        "as the fallback (one hop, no self-map).",
    )
    max_concurrency: PositiveInt | None = Field(
        default=None, description="Reservations in flight at once."
    )
    notify: NotifyPolicy | None = Field(
        default=None,
        description="Budget notifications to BUDGETER_WEBHOOK_URL: thresholds of each budget.",
    )
    on_exhausted: Literal["reject", "wait"] = Field(
        default="reject",
        description="'wait' parks jobs of an exhausted budget until the period resets.",
    )

    default_priority: Priority = Field(
        default="normal",
        description="Priority of the tenant's batches that do not name one: 'high' jobs are "
        "served before 'normal' ones and 'low' after, within the tenant's fair share.",
    )
    on_count_failure: Literal["reject", "estimate"] = Field(
        default="reject",
        description="When count_tokens keeps failing: 'reject' waits and retries the job "
        "(errored after its attempts), 'estimate' admits it on a local estimate.",
    )
    estimate_margin: float = Field(
        default=1.5,
        ge=1,
        le=10,
        description="Safety factor on the local estimate (on_count_failure='estimate').",
    )
    max_wait_seconds: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="How long a synchronous /v1/messages call may wait for a DEFER to end.",
    )

    @field_validator("models", "allowed_models")
    @classmethod
    def _model_names(
        cls, value: dict[str, ModelLimits] | list[str] | None
    ) -> dict[str, ModelLimits] | list[str] | None:
        if value:
            _check_models(list(value))
        return value

    @field_validator("fallback_models")
    @classmethod
    def _fallbacks(cls, value: dict[str, str]) -> dict[str, str]:
        _check_models([*value, *value.values()])
        for model, fallback in value.items():
            if fallback == model:
                raise ValueError(f"{model!r} falls back to itself")
            if fallback in value:
                raise ValueError(
                    f"{model!r} -> {fallback!r} -> {value[fallback]!r} is a chain (one hop only)"
                )
        return value

    @model_validator(mode="after")
    def _fallbacks_allowed(self) -> TenantPolicy:
        for model, fallback in self.fallback_models.items():
            if not self.allows(fallback):
                raise ValueError(
                    f"fallback_models: {model!r} falls back to {fallback!r}, which is not in "
                    "allowed_models"
                )
        return self

    @field_validator("parent")
    @classmethod
    def _parent_id(cls, value: str | None) -> str | None:
        return None if value is None else check_tenant_id(value)

    @field_validator("allowed_betas")
    @classmethod
    def _beta_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(map(check_beta_name, value)))

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def redis_fields(self) -> dict[str, str]:
        """The flat hash the admission script reads (absent field = no limit)."""
        fields = {
            pf.JSON: self.model_dump_json(exclude_defaults=True),
            pf.WEIGHT: repr(float(self.weight)),
            pf.ON_EXHAUSTED: self.on_exhausted,
        }
        fields |= ModelLimits(
            budgets=self.budgets, usd_budgets=self.usd_budgets, rate=self.rate
        ).flat()
        for model, limits in self.models.items():
            fields |= limits.flat(model)
        if self.allowed_models is not None:
            fields[pf.ALLOWLIST] = "1"
            for model in self.allowed_models:
                fields[pf.allow_field(model)] = "1"
        if self.max_concurrency is not None:
            fields[pf.MAX_CONCURRENCY] = str(self.max_concurrency)
        if self.notify is not None:
            fields[pf.NOTIFY] = self.notify.flat()
        return fields


class GlobalPolicy(BaseModel):
    """The upstream account's own limits. The upstream limits each model on its own, so
    the top-level limits apply to every model separately (each model has its own buckets
    and counters); ``models`` replaces them for the models it names."""

    model_config = POLICY_CONFIG

    budgets: dict[Period, PositiveInt] = Field(default_factory=dict)
    usd_budgets: dict[Period, PositiveFloat] = Field(default_factory=dict)
    rate: RateLimits = Field(default_factory=RateLimits)
    models: dict[ModelName, ModelLimits] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelLimits]) -> dict[str, ModelLimits]:
        _check_models(list(value))
        return value

    @classmethod
    def from_stored(cls, raw: str | bytes | None) -> GlobalPolicy:
        """The stored policy; fields this version does not know are dropped, so an older or
        newer policy never stops admission."""
        if raw is None:
            return cls()
        data = json.loads(raw)
        if not isinstance(data, dict):
            return cls()
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})

    def limits_for(self, model: str) -> dict[str, str]:
        """The flat fields admission/reserve.lua applies to ``model`` ({} = no global limit)."""
        limits = self.models.get(model) or ModelLimits(
            budgets=self.budgets, usd_budgets=self.usd_budgets, rate=self.rate
        )
        return limits.flat()
