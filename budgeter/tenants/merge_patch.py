"""JSON merge patch (RFC 7396) of a tenant's policy: ``PATCH /admin/tenants/{t}`` and
``budgeter tenants set T --merge``.

:func:`merge_patch` is the RFC's algorithm (``null`` deletes a member, objects merge
recursively, anything else replaces). :func:`patched_policy` applies a patch to the stored
policy (as stored: defaults left out) and validates the result *whole*, so a patch that
leaves an invalid policy is refused naming the bad field, and nothing is stored.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from budgeter.domain.messages import JsonValue, first_error
from budgeter.domain.policy import TenantPolicy

MERGE_PATCH_TYPE = "application/merge-patch+json"


class InvalidPolicyError(ValueError):
    """The policy a patch (or a replacement) would leave is invalid: one line naming the
    field, e.g. ``invalid policy: rate.rpm: Input should be greater than 0``."""


def merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    """RFC 7396 section 2, MergePatch(Target, Patch). Neither argument is changed."""
    if not isinstance(patch, dict):
        return patch
    result: dict[str, JsonValue] = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def stored_form(policy: TenantPolicy) -> dict[str, JsonValue]:
    """The policy as it is stored and as a patch applies to it (defaults left out)."""
    dumped: dict[str, JsonValue] = policy.model_dump(mode="json", exclude_defaults=True)
    return dumped


def validate_policy(payload: JsonValue) -> TenantPolicy:
    try:
        return TenantPolicy.model_validate(payload)
    except ValidationError as exc:
        raise InvalidPolicyError(f"invalid policy: {first_error(exc)}") from None


def patched_policy(current: TenantPolicy, patch: JsonValue) -> TenantPolicy:
    """``current`` with ``patch`` merged into it, validated whole."""
    return validate_policy(merge_patch(stored_form(current), patch))


def policy_answer(tenant: str, policy: TenantPolicy) -> dict[str, Any]:
    """What ``PUT``/``PATCH``/``GET /admin/tenants/{t}`` and ``budgeter tenants set``
    answer: the tenant and its whole policy, defaults included."""
    return {"tenant": tenant, "policy": policy.model_dump(mode="json")}


def reparent_note(before: TenantPolicy | None, after: TenantPolicy) -> dict[str, str]:
    """``{"note": ...}`` when a change moved the tenant to another parent (else ``{}``):
    what it was charged so far stays where it was counted; only future charges move."""
    if before is None or before.parent == after.parent:
        return {}
    old = repr(before.parent) if before.parent else "no parent"
    new = repr(after.parent) if after.parent else "no parent"
    return {
        "note": f"moved from {old} to {new}: usage already charged stays counted where it "
        "was; only charges from now on count toward the new parent"
    }
