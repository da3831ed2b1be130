"""The ``budgeter`` command line: every command, flag, help text and default."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budgeter.settings import Settings

# The handler of a command that lives in a module of its own: the module's ``register(sub)``
# adds its subparser with ``set_defaults(run=handler)``, and ``commands.dispatch`` awaits it.
Handler = Callable[[argparse.Namespace, "Settings"], Awaitable[int]]

PORT_FILE_HELP = "write the bound port there once listening (for --port 0)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="budgeter",
        description="Token budgets and fair admission in front of an Anthropic-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = sub.add_parser("api", help="run the HTTP API (Message Batches, admin, metrics)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=_port, default=8080)
    api.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument("--concurrency", type=_positive_int, default=16)
    worker.add_argument("--host", default="127.0.0.1", help="where /metrics listens")
    worker.add_argument("--metrics-port", "--port", type=_port, default=9108, dest="port")
    worker.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)

    mock = sub.add_parser("mock-upstream", help="run the built-in mock Messages API")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=_port, default=8788)
    mock.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--fault-rate", type=float, default=0.0)
    mock.add_argument("--fault-kinds", default="429,500,529", help="comma list of 429,500,529,slow")
    mock.add_argument("--retry-after", type=float, default=1.0)
    mock.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults")
    demo.add_argument("--requests", type=_positive_int, default=500)
    demo.add_argument("--workers", type=_positive_int, default=2)
    demo.add_argument("--latency-ms", type=float, default=40.0)
    demo.add_argument("--no-progress", action="store_true")

    top = sub.add_parser("top", help="live view of tenants: budgets, queues, decisions")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes"
    )
    top.add_argument("--once", action="store_true", help="print one table and exit")

    tenants = sub.add_parser("tenants", help="manage tenant policies")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    tset = tsub.add_parser("set", help="create or replace a tenant's policy")
    tset.add_argument("tenant")
    tset.add_argument("--policy", required=True, help="policy JSON, or @FILE")
    tsub.add_parser("list", help="list tenants and their policies")
    tget = tsub.add_parser("get", help="show a tenant's policy")
    tget.add_argument("tenant")
    tdel = tsub.add_parser("delete", help="delete a tenant's policy")
    tdel.add_argument("tenant")
    tapply = tsub.add_parser(
        "apply",
        help="make Redis match a YAML file of tenant policies",
        description="Create, update and (with prune) delete tenants so that Redis matches "
        "FILE ({tenants: {ID: POLICY}, prune: BOOL}). Idempotent; prints the plan.",
    )
    tapply.add_argument("file", metavar="FILE", help="tenants YAML file, or - for stdin")
    tapply.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    tapply.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="delete tenants absent from the file (default: the file's 'prune', else no)",
    )
    tapply.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when the plan has changes (errors always exit 2)",
    )

    submit = sub.add_parser("submit", help="submit a JSONL file of batch requests")
    submit.add_argument("--tenant", required=True)
    submit.add_argument("file", type=Path)
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    submit.add_argument("--batch-id", default=None, help="reuse an id to retry a submission")
    submit.add_argument(
        "--priority",
        choices=("high", "normal", "low"),
        default=None,
        help="order among the tenant's own jobs (default: the policy's default_priority)",
    )
    submit.add_argument(
        "--deadline-seconds",
        type=float,
        default=None,
        help="jobs not served by then expire (default: BUDGETER_BATCH_TTL_HOURS)",
    )

    results = sub.add_parser("results", help="print a batch's results as JSONL")
    results.add_argument("batch_id")

    usage = sub.add_parser("usage", help="a tenant's budgets and usage")
    usage.add_argument("--tenant", required=True)
    usage.add_argument("--json", action="store_true")

    # command groups in modules of their own (each: register(sub), handlers set as `run`)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value
