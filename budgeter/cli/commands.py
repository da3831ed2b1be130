"""The ``budgeter`` command: processes (worker, mock-upstream, demo) and operator commands.

Bad input gets a one-line message on stderr and a non-zero exit; nothing half-done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from pydantic import ValidationError

from budgeter.admission.admission import format_ms
from budgeter.domain.jobs import MAX_DEADLINE_S
from budgeter.domain.messages import (
    CUSTOM_ID_RE,
    BatchRequest,
    first_error,
)
from budgeter.domain.passthrough import Passthrough
from budgeter.domain.policy import TenantPolicy, check_tenant_id
from budgeter.domain.tree import HasChildrenError, TreeError
from budgeter.logs import setup_logging
from budgeter.queue.batches import BatchNotFoundError, BatchStatus, BatchStore
from budgeter.serving import stop_event_on_signals, stopped_by_sigint
from budgeter.settings import Settings, load_settings
from budgeter.store.client import redis_from_settings
from budgeter.tenants.audit import policy_changes
from budgeter.tenants.merge_patch import policy_answer, reparent_note
from budgeter.tenants.store import PolicyConflictError, TenantStore
from budgeter.tenants.usage_tree import usage_report

if TYPE_CHECKING:
    from rich.console import Console

from budgeter.cli import audit_cmd, event_loop
from budgeter.cli.batch_file import read_batch_file
from budgeter.cli.errors import (
    EXIT_CLOSED_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_ALL_SUCCEEDED,
    EXIT_OK,
    EXIT_TERMINATED,
    CliError,
    CliFailure,
    InputFileError,
    describe,
)
from budgeter.cli.parser import Handler, build_parser
from budgeter.cli.usage_view import print_tree_usage

log = logging.getLogger("budgeter.cli")


# entry point --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and an exit status (the table
    in ``budgeter/cli/errors.py`` and the README's Commands section), never a traceback."""
    try:
        code = run_command(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
    except BrokenPipeError:
        return closed_stdout()
    except KeyboardInterrupt:  # Ctrl-C outside a stop-on-signal loop
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse (--help, --version, usage errors), rich's closed pipe
        return exit_status(exc)
    # a process stopped cleanly by Ctrl-C (api, worker, top, ...) still says it was interrupted
    return EXIT_INTERRUPTED if code == EXIT_OK and stopped_by_sigint() else code


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_format)
        process = args.command in ("api", "worker", "mock-upstream", "demo", "up")
        return event_loop.run(dispatch(args, settings), settings.event_loop, process=process)
    except InputFileError as exc:
        for problem in exc.problems:
            print(f"budgeter: {problem}", file=sys.stderr)
        print(f"budgeter: error: {exc}; nothing was submitted", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        raise
    except Exception as exc:  # every other failure: one line, the status describe() picks
        code, message = describe(exc, command=args.command)
        print(f"budgeter: error: {message}", file=sys.stderr)
        return code


def closed_stdout() -> int:
    """Standard output was closed by its reader (``| head``): stop quietly, exit 141 as a
    process killed by SIGPIPE would (the rest of the output goes to /dev/null)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (tests capturing it)
        pass
    return EXIT_CLOSED_PIPE


def exit_status(exc: SystemExit) -> int:
    if isinstance(exc.__context__, BrokenPipeError):  # rich.Console.on_broken_pipe
        return closed_stdout()
    try:
        sys.stdout.flush()  # the help argparse printed
    except BrokenPipeError:
        return closed_stdout()
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or EXIT_OK
    print(f"budgeter: error: {exc.code}", file=sys.stderr)
    return EXIT_FAILURE


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    run: Handler | None = getattr(args, "run", None)
    if run is not None:  # a command registered by its own module (parser.Handler)
        return await run(args, settings)
    if args.command in ("api", "worker", "mock-upstream", "demo", "top"):
        return await process_command(args, settings)
    return await operator_command(args, settings)


async def process_command(args: argparse.Namespace, settings: Settings) -> int:
    """The long-running commands and the demo."""
    command = args.command
    if command == "api":
        from budgeter.api.main import run_api

        return await run_api(settings, host=args.host, port=args.port, port_file=args.port_file)
    if command == "worker":
        from budgeter.worker.main import run_worker

        return await run_worker(
            settings,
            concurrency=args.concurrency,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
        )
    if command == "mock-upstream":
        from budgeter.upstream.mock_main import run_mock_upstream

        return await run_mock_upstream(args)
    if command == "demo":
        from budgeter.cli.demo import run_demo

        return await run_demo(
            settings,
            requests=args.requests,
            workers=args.workers,
            latency_ms=args.latency_ms,
            progress=not args.no_progress,
        )
    if command == "top":
        if args.interval <= 0:
            raise CliError("--interval: must be > 0")
        from budgeter.cli.top import run_top

        return await run_top(settings, interval_s=args.interval, once=args.once)
    raise CliError(f"unknown command {command}")


async def operator_command(args: argparse.Namespace, settings: Settings) -> int:
    """Commands that read or change Redis: their input is validated before touching it."""
    command = args.command
    if command == "tenants":
        return await tenants_command(args, settings)
    if command == "submit":
        check_tenant_id(args.tenant)
        if args.batch_id is not None and not CUSTOM_ID_RE.fullmatch(args.batch_id):
            raise CliError("--batch-id: use 1-64 characters a-z, A-Z, 0-9, '_' or '-'")
        tags = _submit_tags(args.tags)
        requests = read_batch_file(args.file)
        return await submit_command(args, settings, requests, tags)
    if command == "results":
        return await results_command(args.batch_id, settings)
    if command == "usage":
        from budgeter.cli.usage_chart_cmd import check_chart_flags, print_chart

        check_chart_flags(args)
    if command == "usage" and args.action != "show":
        from budgeter.cli.ledger_run import ledger_command

        code = await ledger_command(args, settings)
        if code == 0 and args.chart:  # under the report's table
            await print_chart(args, settings)
        return code
    if command == "usage":
        if not args.tenant:
            raise CliError("usage: --tenant is required")
        check_tenant_id(args.tenant)
        return await usage_command(args, settings)
    raise CliError(f"unknown command {command}")


# tenants ------------------------------------------------------------------------------


def parse_policy(text: str) -> TenantPolicy:
    from budgeter.cli.policy_merge import read_policy_json

    try:
        return TenantPolicy.model_validate(read_policy_json(text))
    except ValidationError as exc:
        raise CliError(f"invalid policy: {first_error(exc)}") from None


async def tenants_command(args: argparse.Namespace, settings: Settings) -> int:
    action = args.tenants_command
    if action == "apply":
        return await tenants_apply_command(args, settings)
    if action == "set" and args.merge:  # a JSON merge patch, as PATCH /admin/tenants/{t}
        from budgeter.cli.policy_merge import merge_policy_command

        return await merge_policy_command(args, settings)
    policy = None
    if action in ("set", "get", "delete"):
        check_tenant_id(args.tenant)
    if action == "set":
        policy = parse_policy(args.policy)
    async with redis_from_settings(settings) as redis:
        store = TenantStore(redis, prefix=settings.key_prefix)
        if action == "set":
            assert policy is not None
            await _tenants_set(store, settings, args.tenant, policy)
        elif action == "get":
            found = await store.get(args.tenant)
            if found is None:
                raise CliError(f"tenant {args.tenant!r} not found")
            print(found.model_dump_json(exclude_defaults=True))
        elif action == "delete":
            await _tenants_delete(store, settings, args.tenant)
        else:
            for tenant in await store.list_ids():
                found = await store.get(tenant)
                policy_json = found.model_dump(exclude_defaults=True) if found else None
                print(json.dumps({"tenant": tenant, "policy": policy_json}))
    return 0


async def _tenants_set(
    store: TenantStore, settings: Settings, tenant: str, policy: TenantPolicy
) -> None:
    before = await store.get(tenant)
    try:
        await store.put(tenant, policy)
    except (TreeError, PolicyConflictError) as exc:
        raise CliError(str(exc)) from None
    what = "tenant.create" if before is None else "tenant.update"
    await audit_cmd.record(store.redis, settings, what, tenant, policy_changes(before, policy))
    print(json.dumps(policy_answer(tenant, policy) | reparent_note(before, policy)))  # as PUT


async def _tenants_delete(store: TenantStore, settings: Settings, tenant: str) -> None:
    before = await store.get(tenant)
    try:
        deleted = await store.delete(tenant)
    except HasChildrenError as exc:
        raise CliError(str(exc)) from None
    if not deleted:
        raise CliError(f"tenant {tenant!r} not found")
    changes = policy_changes(before, None)
    await audit_cmd.record(store.redis, settings, "tenant.delete", tenant, changes)
    print(json.dumps({"tenant": tenant, "deleted": True}))


async def tenants_apply_command(args: argparse.Namespace, settings: Settings) -> int:
    """``tenants apply FILE``: the whole file is validated before Redis is touched."""
    from rich.console import Console

    from budgeter.tenants import apply as ta

    try:
        desired = ta.load_file(args.file)
    except ta.TenantsFileError as exc:
        for problem in exc.problems:
            print(f"budgeter: error: {problem}", file=sys.stderr)
        return 2
    prune = desired.prune if args.prune is None else args.prune
    async with redis_from_settings(settings) as redis:
        store = TenantStore(redis, prefix=settings.key_prefix)
        try:
            current = await ta.load_current(store)
        except ta.StoredPolicyError as exc:
            raise CliError(str(exc)) from None
        changes = ta.plan(current, desired.tenants, prune=prune)
        problems = ta.tree_problems(await store.parents(), current, changes)
        for problem in problems:
            print(f"budgeter: error: {args.file}: {problem}", file=sys.stderr)
        if problems:
            return 2
        deleted = [c.tenant for c in changes if c.action == "delete"]
        queued = await ta.queued_jobs(store, deleted)
        console = Console(soft_wrap=True, highlight=False, emoji=False)
        for text, style in ta.plan_lines(changes, queued):
            console.print(text, style=style, markup=False)
        if not args.dry_run:
            await ta.apply(store, changes)
            await audit_cmd.record_apply(redis, settings, changes, current)
        console.print(ta.summary_line(changes, dry_run=args.dry_run), markup=False)
    has_changes = any(c.is_change for c in changes)
    return 1 if args.exit_code and has_changes else 0


# submit / results / usage -----------------------------------------------------------------


def _submit_tags(text: str | None) -> dict[str, str]:
    from budgeter.ledger.tags import TagError, parse_tags_header

    try:
        return parse_tags_header(text)
    except TagError as exc:
        raise CliError(f"--tags: {exc}") from None


async def submit_command(
    args: argparse.Namespace,
    settings: Settings,
    requests: list[BatchRequest],
    tags: dict[str, str] | None = None,
) -> int:
    async with redis_from_settings(settings) as redis:
        store = BatchStore(redis, prefix=settings.key_prefix)
        policy = await TenantStore(redis, prefix=settings.key_prefix).get(args.tenant)
        if policy is None:
            raise CliError(f"tenant {args.tenant!r} has no policy: set one first")
        deadline_s = args.deadline_seconds
        if deadline_s is not None and not 1 <= deadline_s <= MAX_DEADLINE_S:
            raise CliError(f"--deadline-seconds: a number of seconds from 1 to {MAX_DEADLINE_S}")
        batch_id = await store.create(
            args.tenant,
            requests,
            batch_id=args.batch_id,
            ttl_ms=int((deadline_s or settings.batch_ttl_hours * 3600) * 1000),
            priority=args.priority or policy.default_priority,
            passthrough=Passthrough(tags=tuple((tags or {}).items())),
        )
        if not args.wait:
            print(batch_id)
            return EXIT_OK
        # Ctrl-C (or SIGTERM) stops the wait, not the batch: a signal handler set before the
        # id is printed (a script may signal as soon as it reads it), not task cancellation,
        # which a Redis call in flight may swallow (asyncio.wait_for in Python 3.11)
        stop = stop_event_on_signals()
        print(batch_id)
        sys.stdout.flush()
        try:
            status = await wait_with_progress(store, batch_id, stop)
        except BatchNotFoundError:
            raise CliFailure(f"batch {batch_id} was deleted while waiting for it") from None
    if not status.ended:
        print(
            f"budgeter: interrupted; batch {batch_id} goes on (budgeter results {batch_id})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if stopped_by_sigint() else EXIT_TERMINATED
    print(ended_line(status), file=sys.stderr)
    return EXIT_OK if status.succeeded == status.total else EXIT_NOT_ALL_SUCCEEDED


def ended_line(status: BatchStatus) -> str:
    return (
        f"batch {status.id} ended: {status.succeeded} succeeded, {status.errored} errored, "
        f"{status.expired} expired, {status.canceled} canceled"
    )


async def wait_with_progress(
    store: BatchStore, batch_id: str, stop: asyncio.Event, poll_s: float = 0.5
) -> BatchStatus:
    """Poll the batch until it ends or ``stop`` is set (then the status is not ended);
    a progress bar on stderr when it is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _stderr_console()
    status = await store.status(batch_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(batch_id, total=status.total, detail="")
        while True:
            done = status.total - status.processing
            detail = (
                f"ok {status.succeeded}  err {status.errored}  "
                f"exp {status.expired}  cxl {status.canceled}"
            )
            progress.update(task, completed=done, total=status.total, detail=detail)
            if status.ended:
                return status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
            if stop.is_set():
                return status
            status = await store.status(batch_id)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


async def results_command(batch_id: str, settings: Settings) -> int:
    async with redis_from_settings(settings) as redis:
        store = BatchStore(redis, prefix=settings.key_prefix)
        status = await store.status(batch_id)
        out = sys.stdout
        async for line in store.results(batch_id):
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
        if not status.ended:
            print(
                f"budgeter: batch {batch_id} is still processing ({status.processing} left); "
                "results so far shown",
                file=sys.stderr,
            )
    return 0


async def usage_command(args: argparse.Namespace, settings: Settings) -> int:
    async with redis_from_settings(settings) as redis:
        report = await usage_report(
            redis, args.tenant, prefix=settings.key_prefix, now_ms=int(time.time() * 1000)
        )
    if report is None:
        raise CliError(f"tenant {args.tenant!r} not found")
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    budgets = Table(title=f"budgets of {args.tenant}")
    for column in ("period", "limit", "used", "reserved", "remaining", "resets at"):
        budgets.add_column(column, justify="right" if column != "period" else "left")
    for row in report.budgets:
        what = row.period + (" USD" if row.unit == "usd" else "")
        if row.model is not None:
            what += f" ({row.model})"
        budgets.add_row(
            what,
            f"{row.limit:,}",
            f"{row.used:,}",
            f"{row.reserved:,}",
            f"{row.remaining:,}",
            format_ms(row.resets_at_ms) if row.resets_at_ms else "never",
        )
    console.print(budgets)
    usage = Table(title=f"usage of {args.tenant} (tokens and US dollars)")
    for column in (
        "period",
        "model",
        "requests",
        "input",
        "output",
        "cache_creation",
        "cache_read",
        "USD",
    ):
        usage.add_column(column, justify="left" if column in ("period", "model") else "right")
    for used in report.usage:
        usd = used.amount("usd")
        usage.add_row(
            f"{used.period} {used.period_id}",
            used.model,
            *(
                f"{used.amount(kind) or 0:,}"
                for kind in ("requests", "input", "output", "cache_creation", "cache_read")
            ),
            f"{usd:,.6f}" if usd is not None else "-",
        )
    console.print(usage)
    print_tree_usage(console, report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
