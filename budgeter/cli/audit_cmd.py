"""``budgeter audit [--tenant T] [--actor A] [--since WHEN] [--limit N] [--json]``: the
audit log of admin writes, newest first, as ``GET /admin/audit`` answers it; and
:func:`record`, with which the CLI's own writes (``tenants set|delete|apply``, ``keys
create|revoke``) enter it as actor ``cli:<os user>``."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import time
from typing import TYPE_CHECKING, TypeVar

from budgeter.cli.errors import CliError

if TYPE_CHECKING:
    from budgeter.domain.policy import TenantPolicy
    from budgeter.settings import Settings
    from budgeter.store.types import RedisClient
    from budgeter.tenants.apply import Change
    from budgeter.tenants.audit import Actor, FieldChange


# any ArgumentParser subclass: build_parser's subparsers are of its own parser class
ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)


def register(sub: argparse._SubParsersAction[ParserT]) -> None:
    audit = sub.add_parser(
        "audit",
        help="the audit log of admin writes, newest first",
        description="Every admin write (policies, keys, the global policy, tenants apply) "
        "with who made it, from where, and the field-level changes. Never a secret.",
    )
    audit.add_argument("--tenant", help="only this tenant and its keys (default: all)")
    audit.add_argument("--actor", help="only this actor (a token's name, or cli:USER)")
    audit.add_argument(
        "--since",
        help="only entries since WHEN: RFC 3339 (2026-12-01T08:00:00Z), a date, unix "
        "milliseconds, or a span back from now (90m, 24h, 7d) (default: all kept)",
    )
    audit.add_argument(
        "--limit", type=int, default=100, help="at most this many entries (default: 100)"
    )
    audit.add_argument("--json", action="store_true", help="one JSON document per entry")
    audit.set_defaults(run=handler)


def cli_actor() -> Actor:
    """``cli:<os user>``, a request id of its own, and no client address."""
    from budgeter.tenants.audit import Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER
        user = f"uid{os.getuid()}"
    return Actor(f"cli:{user}", "", "cli_" + secrets.token_hex(8))


async def record(
    redis: RedisClient,
    settings: Settings,
    action: str,
    target: str,
    changes: list[FieldChange] | None = None,
    *,
    actor: Actor | None = None,
) -> None:
    """One audit log entry for a write the CLI made."""
    from budgeter.tenants.audit import AuditLog

    log = AuditLog.of(redis, settings)
    now_ms = int(time.time() * 1000)
    await log.record(actor or cli_actor(), action, target, changes or [], now_ms=now_ms)


async def record_apply(
    redis: RedisClient,
    settings: Settings,
    changes: list[Change],
    current: dict[str, TenantPolicy],
) -> None:
    """An entry per tenant ``tenants apply`` created, updated or deleted, one request id."""
    from budgeter.tenants.audit import policy_changes

    actor = cli_actor()
    actions = {"create": "tenant.create", "update": "tenant.update", "delete": "tenant.delete"}
    for change in changes:
        if change.action in actions:
            before, after = current.get(change.tenant), change.policy
            diff = policy_changes(before, None if change.action == "delete" else after)
            await record(redis, settings, actions[change.action], change.tenant, diff, actor=actor)


async def handler(args: argparse.Namespace, settings: Settings) -> int:
    from budgeter.domain.policy import InvalidTenantError, check_tenant_id
    from budgeter.store.client import redis_from_settings
    from budgeter.tenants.audit import AuditLog, BadQueryError, lines, parse_since

    if not 1 <= args.limit <= 10_000:
        raise CliError("--limit: must be between 1 and 10000")
    try:
        if args.tenant is not None:
            check_tenant_id(args.tenant)
        since_ms = parse_since(args.since, now_ms=int(time.time() * 1000)) if args.since else None
    except InvalidTenantError as exc:
        raise CliError(str(exc)) from None
    except BadQueryError as exc:
        raise CliError(f"--{exc}") from None  # "--since: not a time: ..."
    async with redis_from_settings(settings) as redis:
        page = await AuditLog.of(redis, settings).read(
            target=args.tenant, actor=args.actor, since_ms=since_ms, limit=args.limit
        )
    if args.json:
        for entry in page.data:
            print(json.dumps(entry.model_dump(mode="json"), ensure_ascii=False))
    elif not page.data:
        print("no audit entries" + (" for that filter" if args.tenant or args.actor else ""))
    else:
        print("\n".join(lines(page.data)))
    return 0
