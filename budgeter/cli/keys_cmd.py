"""``budgeter keys create|list|revoke TENANT [KEY_ID]``: a tenant's API keys from the
command line. ``create`` prints the key this once (only its SHA-256 is stored); ``list``
shows each key's id, when it was created and last used, and its last 4 characters, never
the key."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, TypeVar

from budgeter.cli.errors import CliError

if TYPE_CHECKING:
    from budgeter.domain.key_limits import NewKey
    from budgeter.domain.messages import JsonValue
    from budgeter.settings import Settings
    from budgeter.tenants.credentials import KeyStore


# any ArgumentParser subclass: build_parser's subparsers are of its own parser class
ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)


def register(sub: argparse._SubParsersAction[ParserT]) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, list or revoke a tenant's API keys",
        description="A tenant's API keys. A key is printed once, by create; only its "
        "SHA-256 is stored.",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = ksub.add_parser(
        "create",
        help="create a key and print it, this once",
        description='Create a key for TENANT and print {"id", "key", "tenant", "name", '
        '"limits"} as the API answers: the key is shown this once. A key\'s limits are '
        "one more scope under its tenant: they only ever narrow what the tenant may do.",
    )
    create.add_argument("tenant", metavar="TENANT", help="tenant id")
    create.add_argument("--name", metavar="N", help="a label for the key (shown by list)")
    create.add_argument(
        "--limits",
        metavar="JSON|@FILE",
        help="the key's own limits: budgets, usd_budgets, rate, max_concurrency, "
        "allowed_models, as in a policy (inline JSON or @FILE)",
    )
    listing = ksub.add_parser(
        "list",
        help="the tenant's keys: id, created, last used (never the key)",
        description="The tenant's keys, oldest first: id, created, last used (to the "
        "minute), last 4 characters. Never the key.",
    )
    listing.add_argument("tenant", metavar="TENANT", help="tenant id")
    listing.add_argument(
        "--json",
        action="store_true",
        help='print the API\'s answer ({"data": [...]}) instead of one line per key',
    )
    revoke = ksub.add_parser(
        "revoke", help="revoke a key at once", description="Revoke the key KEY_ID of TENANT."
    )
    revoke.add_argument("tenant", metavar="TENANT", help="tenant id")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_...)")
    for parser in (create, listing, revoke):
        parser.set_defaults(run=handler)


async def handler(args: argparse.Namespace, settings: Settings) -> int:
    from budgeter.cli import audit_cmd
    from budgeter.domain.policy import InvalidTenantError, check_tenant_id
    from budgeter.store.client import redis_from_settings
    from budgeter.tenants.credentials import KeyStore
    from budgeter.tenants.store import TenantStore

    try:
        tenant = check_tenant_id(args.tenant)
    except InvalidTenantError as exc:
        raise CliError(str(exc)) from None
    async with redis_from_settings(settings) as redis:
        if not await TenantStore(redis, prefix=settings.key_prefix).exists(tenant):
            raise CliError(f"tenant {tenant!r} not found")
        keys = KeyStore(redis, prefix=settings.key_prefix)
        action = args.keys_command
        if action == "create":
            new = _new_key(args)
            key_id, key = await keys.create(tenant, name=new.name, limits=new.limits)
            await audit_cmd.record(redis, settings, "key.create", f"{tenant}/key:{key_id}")
            print(json.dumps(_created(key_id, key, tenant, new)))
        elif action == "revoke":
            if not await keys.revoke(tenant, args.key_id):
                raise CliError(f"key {args.key_id!r} of tenant {tenant!r} not found")
            await audit_cmd.record(redis, settings, "key.revoke", f"{tenant}/key:{args.key_id}")
            print(json.dumps({"id": args.key_id, "revoked": True}))
        else:
            await _list(keys, tenant, as_json=args.json)
    return 0


def _created(key_id: str, key: str, tenant: str, new: NewKey) -> dict[str, Any]:
    """What ``POST /admin/tenants/{t}/keys`` answers."""
    from budgeter.api.schemas import KeyCreated, dump

    limits = new.limits if new.limits is not None and not new.limits.empty else None
    return dump(KeyCreated(id=key_id, key=key, tenant=tenant, name=new.name, limits=limits))


def _new_key(args: argparse.Namespace) -> NewKey:
    """The name and limits given to ``keys create``, validated as the API validates them."""
    from budgeter.cli.policy_merge import read_policy_json
    from budgeter.domain.key_limits import InvalidKeyLimitsError, validate_new_key

    body: dict[str, JsonValue] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.limits is not None:
        try:
            body["limits"] = read_policy_json(args.limits)
        except CliError as exc:
            raise CliError(str(exc).replace("policy", "limits")) from None
    try:
        return validate_new_key(body)
    except InvalidKeyLimitsError as exc:
        raise CliError(str(exc)) from None


async def _list(keys: KeyStore, tenant: str, *, as_json: bool) -> None:
    import time

    from budgeter.admission.admission import format_ms
    from budgeter.api.schemas import dump
    from budgeter.tenants.key_usage import key_list

    found = await key_list(keys, tenant, now_ms=int(time.time() * 1000))
    if as_json:
        print(json.dumps(dump(found)))
        return
    if not found.data:
        print(f"tenant {tenant!r} has no keys")
        return
    for info in found.data:
        row: dict[str, Any] = {
            "id": info.id,
            "name": info.name or "-",
            "created": format_ms(info.created_at_ms),
            "last used": format_ms(info.last_used_at_ms) if info.last_used_at_ms else "never",
            "ends with": info.hint,
        }
        if info.limits is not None:
            row["limits"] = json.dumps(info.limits.model_dump(mode="json", exclude_defaults=True))
        day = next((t for t in info.usage or [] if t.period == "day"), None)
        if day is not None:
            row["today"] = f"{day.used} tokens, {day.requests} requests"
        print("  ".join(f"{name}: {value}" for name, value in row.items()))
