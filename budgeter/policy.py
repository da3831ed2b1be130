"""Tenant ids and tenant policies: the pydantic models at the edge, flattened for Lua."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PERIODS: tuple[str, ...] = ("minute", "hour", "day", "month", "total")
Period = Literal["minute", "hour", "day", "month", "total"]
RATE_KINDS: tuple[str, ...] = ("rpm", "itpm", "otpm")


class InvalidTenantError(ValueError):
    """A tenant id outside ``^[a-z0-9][a-z0-9_-]{0,62}$``."""


def check_tenant_id(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_ID_RE.fullmatch(tenant):
        raise InvalidTenantError(
            f"invalid tenant id {tenant!r}: use 1-63 characters a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


class RateLimits(BaseModel):
    """Per-minute token buckets that refill continuously, as the upstream's own limits do."""

    model_config = ConfigDict(extra="forbid")

    rpm: PositiveInt | None = Field(default=None, description="Requests per minute.")
    itpm: PositiveInt | None = Field(default=None, description="Input tokens per minute.")
    otpm: PositiveInt | None = Field(default=None, description="Output tokens per minute.")


class TenantPolicy(BaseModel):
    """What one tenant may spend. Every field may be absent (no limit)."""

    model_config = ConfigDict(extra="forbid")

    weight: PositiveFloat = Field(default=1.0, description="Share in the fair scheduler.")
    budgets: dict[Period, PositiveInt] = Field(
        default_factory=dict,
        description="Total tokens (input + output, cache included) per UTC calendar period.",
    )
    rate: RateLimits = Field(default_factory=RateLimits)
    max_concurrency: PositiveInt | None = Field(
        default=None, description="Reservations in flight at once."
    )
    on_exhausted: Literal["reject", "wait"] = Field(
        default="reject",
        description="'wait' parks jobs of an exhausted budget until the period resets.",
    )

    max_wait_seconds: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="How long a synchronous /v1/messages call may wait for a DEFER to end.",
    )

    def redis_fields(self) -> dict[str, str]:
        """The flat hash the admission script reads (absent field = no limit)."""
        fields = {
            "json": self.model_dump_json(exclude_defaults=True),
            "weight": repr(float(self.weight)),
            "on_exhausted": self.on_exhausted,
        }
        for period, limit in self.budgets.items():
            fields[f"budget:{period}"] = str(limit)
        for kind in RATE_KINDS:
            limit = getattr(self.rate, kind)
            if limit is not None:
                fields[f"rate:{kind}"] = str(limit)
        if self.max_concurrency is not None:
            fields["max_concurrency"] = str(self.max_concurrency)
        return fields
