"""An API key's own limits (issue 17 item 3): one more admission scope under its tenant
(``KeyScopeKeys``, in the tenant's hash slot). The fields have the shape and validation of
a tenant policy's; the key's scope is checked after its tenant's, so a key's limits only
ever narrow what its tenant may do (both scopes must hold).

The key's policy hash (``KeyScopeKeys.policy``) is flattened exactly as
``TenantPolicy.redis_fields`` flattens these fields; ``admission/reserve.lua`` reads it
with ARGV[2] = '-' (an empty hash: no limits)."""

from __future__ import annotations

from pydantic import BaseModel, Field, ValidationError, field_validator

from budgeter.domain import policy_fields as pf
from budgeter.domain.messages import JsonValue, first_error
from budgeter.domain.policy import (
    POLICY_CONFIG,
    ModelName,
    PositiveInt,
    SpendLimits,
    _check_models,
)

KEY_NAME_MAX = 100


class InvalidKeyLimitsError(ValueError):
    """Bad ``limits`` (or ``name``) of a key; the message names the field."""


class KeyLimits(SpendLimits):
    """What one API key may spend, inside its tenant's policy. Every field may be absent."""

    max_concurrency: PositiveInt | None = Field(
        default=None, description="Reservations of this key in flight at once."
    )
    allowed_models: list[ModelName] | None = Field(
        default=None, description="When set, this key's requests for other models are refused."
    )

    @field_validator("allowed_models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        if value:
            _check_models(value)
        return value

    @property
    def empty(self) -> bool:
        return not self.redis_fields()

    def redis_fields(self) -> dict[str, str]:
        """The key's flat policy hash (absent field = no limit), as TenantPolicy's."""
        fields = self.flat()
        if self.allowed_models is not None:
            fields[pf.ALLOWLIST] = "1"
            for model in self.allowed_models:
                fields[pf.allow_field(model)] = "1"
        if self.max_concurrency is not None:
            fields[pf.MAX_CONCURRENCY] = str(self.max_concurrency)
        return fields


class NewKey(BaseModel):
    """The optional body of ``POST /admin/tenants/{t}/keys``."""

    model_config = POLICY_CONFIG

    name: str | None = Field(
        default=None, min_length=1, max_length=KEY_NAME_MAX, description="A label for people."
    )
    limits: KeyLimits | None = Field(
        default=None, description="The key's own limits (they only narrow the tenant's)."
    )

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("a key's name must be printable characters")
        return value


def validate_new_key(payload: JsonValue) -> NewKey:
    """The body of a key creation; :class:`InvalidKeyLimitsError` naming the field."""
    try:
        return NewKey.model_validate(payload)
    except ValidationError as exc:
        raise InvalidKeyLimitsError(f"invalid key: {first_error(exc)}") from None
