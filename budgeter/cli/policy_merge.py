"""``budgeter tenants set T --merge --policy JSON``: what ``PATCH /admin/tenants/{t}``
does, from the command line. ``--policy`` is a JSON merge patch (RFC 7396) of the stored
policy; the merged policy is validated whole, and nothing is stored when it is invalid.
Prints the same ``{"tenant", "policy"}`` as ``tenants set`` and the admin API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from budgeter.cli.errors import CliError
from budgeter.domain.messages import JsonInputError, JsonValue, parse_json

if TYPE_CHECKING:
    from budgeter.settings import Settings


def read_policy_json(text: str) -> JsonValue:
    """The JSON of ``--policy``: inline, or ``@FILE`` (a whole policy or a merge patch)."""
    if text.startswith("@"):
        try:
            raw = Path(text[1:]).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read policy file {text[1:]!r}: {exc.strerror}") from None
    else:
        raw = text.encode("utf-8", "surrogateescape")  # argv bytes as they were given
    try:
        return parse_json(raw)
    except JsonInputError as exc:
        raise CliError(f"invalid policy: invalid JSON: {exc}") from None


async def merge_policy_command(args: argparse.Namespace, settings: Settings) -> int:
    from budgeter.cli import audit_cmd
    from budgeter.domain.policy import check_tenant_id
    from budgeter.domain.tree import TreeError
    from budgeter.store.client import redis_from_settings
    from budgeter.tenants.audit import policy_changes
    from budgeter.tenants.merge_patch import InvalidPolicyError, policy_answer, reparent_note
    from budgeter.tenants.store import PolicyConflictError, TenantStore

    tenant = check_tenant_id(args.tenant)
    patch = read_policy_json(args.policy)
    async with redis_from_settings(settings) as redis:
        store = TenantStore(redis, prefix=settings.key_prefix)
        try:
            both = await store.patch_with_before(tenant, patch)
        except (InvalidPolicyError, PolicyConflictError, TreeError) as exc:
            raise CliError(str(exc)) from None
        if both is None:
            raise CliError(f"tenant {tenant!r} not found (--merge changes an existing policy)")
        before, policy = both
        changes = policy_changes(before, policy)
        await audit_cmd.record(redis, settings, "tenant.update", tenant, changes)
    print(json.dumps(policy_answer(tenant, policy) | reparent_note(before, policy)))
    return 0
