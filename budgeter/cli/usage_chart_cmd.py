"""``budgeter usage report --since 1h --chart``: under the ledger's report, the per-minute
rollups as one terminal sparkline per tenant (budgeter/cli/sparkline.py), the status page's
tokens-per-minute chart. ``--since`` defaults to 1h for the chart; the rollups keep 48 h."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from budgeter.cli.errors import CliError

if TYPE_CHECKING:
    from budgeter.settings import Settings


def add_chart_flags(usage: argparse.ArgumentParser) -> None:
    """``--chart`` and ``--width`` on the ``usage`` parser (for ``usage report``)."""
    usage.add_argument(
        "--chart",
        action="store_true",
        help="report: also draw tokens per minute since --since (default 1h; 48 h kept) "
        "as a sparkline per tenant",
    )
    usage.add_argument(
        "--width", type=int, default=60, help="report --chart: sparkline columns, 8-240"
    )


def check_chart_flags(args: argparse.Namespace) -> None:
    """One-line errors before anything is printed."""
    if getattr(args, "chart", False) and args.action != "report":
        raise CliError("--chart: only with usage report")
    if not 8 <= args.width <= 240:
        raise CliError("--width: must be between 8 and 240")


async def print_chart(args: argparse.Namespace, settings: Settings) -> None:
    from budgeter.cli.sparkline import report_chart
    from budgeter.store.client import redis_from_settings

    async with redis_from_settings(settings) as redis:
        lines = await report_chart(
            redis,
            prefix=settings.key_prefix,
            since=args.since or "1h",
            tenants=[args.tenant] if args.tenant else None,
            now_ms=int(time.time() * 1000),
            width=args.width,
        )
    print()
    print("\n".join(lines))
