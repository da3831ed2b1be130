"""``budgeter usage export|report``: options checked, then budgeter/cli/ledger_cmd.py."""

from __future__ import annotations

import argparse
import sys

from budgeter.cli.errors import CliError
from budgeter.cli.ledger_cmd import LedgerCliError, check_group_by, export, report, window
from budgeter.domain.policy import InvalidTenantError, check_tenant_id
from budgeter.settings import Settings
from budgeter.store.client import redis_from_settings
from budgeter.store.keys import TenantKeys
from budgeter.tenants.store import TenantStore


async def ledger_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        where = window(args.since, args.until)
        tenant = check_tenant_id(args.tenant) if args.tenant else None
        if args.action == "export":
            fmt = args.format or "csv"
            if fmt not in ("csv", "jsonl"):
                raise LedgerCliError(f"--format: {fmt!r}: export writes csv or jsonl")
            if tenant is None:
                raise LedgerCliError("usage export: --tenant is required")
        else:
            fmt = args.format or "table"
            if fmt not in ("table", "csv"):
                raise LedgerCliError(f"--format: {fmt!r}: report writes table or csv")
            check_group_by(args.group_by)
    except (LedgerCliError, InvalidTenantError) as exc:
        raise CliError(str(exc)) from None
    async with redis_from_settings(settings) as redis:
        store = TenantStore(redis, prefix=settings.key_prefix)
        names = [tenant] if tenant else sorted(await store.list_ids())
        if tenant and not await store.exists(tenant):
            raise CliError(f"tenant {tenant!r} not found")
        keys = [TenantKeys(settings.key_prefix, t) for t in names]
        if args.action == "export":
            await export(redis, keys[0], where, sys.stdout, fmt=fmt)
        else:
            await report(redis, keys, args.group_by, where, sys.stdout, fmt=fmt)
    return 0
