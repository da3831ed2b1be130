"""The ``budgeter`` command line: every command, flag, help text and default."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from budgeter.settings import Settings

# The handler of a command that lives in a module of its own: the module's ``register(sub)``
# adds its subparser with ``set_defaults(run=handler)``, and ``commands.dispatch`` awaits it.
Handler = Callable[[argparse.Namespace, "Settings"], Awaitable[int]]

PORT_FILE_HELP = "write the bound port there once listening (for --port 0)"
PORT_HELP = "port to listen on (0: any free port)"

# the settings the top-level help names (every one: README "Configuration")
MAIN_SETTINGS = (
    "redis_url",
    "upstream_url",
    "upstream_api_key",
    "admin_token",
    "data_dir",
    "public_url",
    "log_level",
    "log_format",
)

EXIT_STATUS_HELP = """exit status:
  0    done (submit --wait: every request succeeded)
  1    could not finish: Redis or the upstream unreachable, bad lines in an input file
  2    fix the command: bad flags, values or settings, unknown tenant or batch, port in use
  3    submit --wait: the batch ended with requests not succeeded
  130  interrupted (Ctrl-C)
  141  standard output closed early (e.g. piped into head)"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it or there is none
    (an off switch, an absent value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.required:
            return text
        if action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class TopHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help: its epilog (settings, exit status) keeps its lines."""


class BudgeterParser(argparse.ArgumentParser):
    """Every (sub)command's parser: defaults in the help, usage errors in one line."""

    # argparse's keyword arguments, passed through unchanged (typeshed types each one)
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:  # argparse's own swallows a closed stdout: here main() sees it (141)
            (file or sys.stderr).write(message)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    try:
        return importlib.metadata.version("budgeter")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a tree
        return "unknown"


def settings_epilog() -> str:
    from budgeter.settings import Settings

    fields = Settings.model_fields
    lines = ['settings (environment variables; every one: README "Configuration"):']
    for name in MAIN_SETTINGS:
        if name in fields:
            lines.append(
                textwrap.fill(
                    fields[name].description or "",
                    width=88,
                    initial_indent=f"  BUDGETER_{name.upper():<20} ",
                    subsequent_indent=" " * 32,
                )
            )
    return "\n".join(lines) + "\n\n" + EXIT_STATUS_HELP


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = BudgeterParser(  # its subparsers are BudgeterParser too
        prog="budgeter",
        description="Token budgets and fair admission in front of an Anthropic-compatible API.",
        epilog=settings_epilog(),
        formatter_class=TopHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"budgeter {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = sub.add_parser("api", help="run the HTTP API (Message Batches, admin, metrics)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=_port, default=8080, help=PORT_HELP)
    api.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument(
        "--concurrency", type=_positive_int, default=16, help="jobs served at once (coroutines)"
    )
    worker.add_argument(
        "--host", default="127.0.0.1", help="address /metrics, /healthz and /readyz listen on"
    )
    worker.add_argument(
        "--metrics-port",
        "--port",
        type=_port,
        default=9108,
        dest="port",
        help="port of /metrics, /healthz and /readyz (0: any free port)",
    )
    worker.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)

    mock = sub.add_parser("mock-upstream", help="run the built-in mock Messages API")
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on")
    mock.add_argument("--port", type=_port, default=8788, help=PORT_HELP)
    mock.add_argument("--port-file", type=Path, help=PORT_FILE_HELP)
    mock.add_argument(
        "--latency-ms", type=float, default=0.0, help="added before every answer (milliseconds)"
    )
    mock.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of calls answered with a fault, 0-1"
    )
    mock.add_argument(
        "--fault-kinds",
        default="429,500,529",
        help="faults to draw from: comma list of 429,500,529,slow",
    )
    mock.add_argument(
        "--retry-after", type=float, default=1.0, help="retry-after of a 429 or 529 (seconds)"
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    mock.add_argument(
        "--lenient",
        action="store_true",
        help="skip the real API's header and body-field checks (strict by default)",
    )
    mock.add_argument(
        "--reuse-port",
        action="store_true",
        help="listen with SO_REUSEPORT: several mock processes share one --port",
    )

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults")
    demo.add_argument(
        "--requests", type=_positive_int, default=500, help="requests submitted in all"
    )
    demo.add_argument("--workers", type=_positive_int, default=2, help="worker processes")
    demo.add_argument(
        "--latency-ms", type=float, default=40.0, help="latency of the mock upstream (ms)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    top = sub.add_parser("top", help="live view of tenants: budgets, queues, decisions")
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes"
    )
    top.add_argument("--once", action="store_true", help="print one table and exit")

    tenants = sub.add_parser("tenants", help="manage tenant policies")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    tset = tsub.add_parser("set", help="create or replace a tenant's policy")
    tset.add_argument("tenant", help="tenant id")
    tset.add_argument("--policy", required=True, metavar="JSON", help="policy JSON, or @FILE")
    tset.add_argument(
        "--merge",
        action="store_true",
        help="merge --policy into the stored policy as a JSON merge patch (RFC 7396: null "
        "deletes a field) instead of replacing it",
    )
    tsub.add_parser("list", help="list tenants and their policies")
    tget = tsub.add_parser("get", help="show a tenant's policy")
    tget.add_argument("tenant", help="tenant id")
    tdel = tsub.add_parser("delete", help="delete a tenant's policy")
    tdel.add_argument("tenant", help="tenant id")
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
    submit.add_argument("--tenant", required=True, help="the tenant whose budgets it uses")
    submit.add_argument(
        "file", type=Path, help='JSONL, one {"custom_id": ..., "params": {...}} per line'
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the batch ends; exit 0 if every request succeeded, else 3",
    )
    submit.add_argument(
        "--batch-id",
        default=None,
        help="reuse an id to retry a submission (default: a new id)",
    )
    submit.add_argument(
        "--tags",
        default=None,
        help="tags for every request's ledger entry, as team=search,feature=rerank "
        "(the budgeter-tags header of the API; at most 8)",
    )
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
    results.add_argument("batch_id", help="the id submit printed")

    usage = sub.add_parser("usage", help="a tenant's budgets and usage; its ledger")
    usage.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=("show", "export", "report"),
        help="show: budgets and counters; export: the ledger as CSV/JSONL; report: the "
        "ledger grouped (--group-by)",
    )
    usage.add_argument("--tenant", help="tenant id (show, export; report: all tenants if unset)")
    usage.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    usage.add_argument("--since", help="export/report: from (RFC 3339, unix ms, 24h, 30d)")
    usage.add_argument("--until", help="export/report: up to, excluded (same forms)")
    usage.add_argument(
        "--format",
        help="export: csv (default) or jsonl; report: table (default) or csv",
    )
    usage.add_argument(
        "--group-by",
        default="tenant",
        help="report: tenant, model, tag:<name>, day or batch",
    )
    from budgeter.cli.usage_chart_cmd import add_chart_flags

    add_chart_flags(usage)  # report --chart: the per-minute rollups as sparklines

    # command groups in modules of their own (each: register(sub), handlers set as `run`)
    from budgeter.cli import batches_cmd

    batches_cmd.register(sub)
    from budgeter.cli import keys_cmd

    keys_cmd.register(sub)
    from budgeter.cli import up

    up.register(sub)
    from budgeter.cli import redis_cmd

    redis_cmd.register(sub)
    from budgeter.cli import audit_cmd

    audit_cmd.register(sub)
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
