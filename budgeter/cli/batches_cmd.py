"""``budgeter batches list|get|cancel|delete --tenant T [BATCH_ID]``: a tenant's Message
Batches from the command line, printed as the API's ``/v1/messages/batches`` answers them
(one JSON document on stdout, shaped by the API's own models)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, TypeVar

from budgeter.cli.errors import CliError

if TYPE_CHECKING:
    from budgeter.queue.batches import BatchStore
    from budgeter.settings import Settings

DEFAULT_BASE_URL = "http://127.0.0.1:8080"  # where `budgeter api` listens by default
MAX_LIMIT = 1000  # as GET /v1/messages/batches?limit=


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LIMIT}: {text}")
    return value


# any ArgumentParser subclass: build_parser's subparsers are of its own parser class
ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)


def register(sub: argparse._SubParsersAction[ParserT]) -> None:
    batches = sub.add_parser(
        "batches",
        help="list, show, cancel or delete a tenant's batches",
        description="A tenant's Message Batches, printed as JSON in the shapes of the API's "
        "/v1/messages/batches answers.",
    )
    bsub = batches.add_subparsers(dest="batches_command", required=True, metavar="ACTION")
    actions = {
        "list": "the tenant's batches, newest first (paginated as the API)",
        "get": "one batch: processing_status, request_counts, times, results_url",
        "cancel": "cancel a batch: its queued requests end as canceled at once",
        "delete": "delete an ended batch and its results",
    }
    for action, text in actions.items():
        parser = bsub.add_parser(action, help=text, description=text)
        parser.add_argument("--tenant", required=True, help="the tenant the batch belongs to")
        if action == "list":
            parser.add_argument(
                "--limit", type=_limit, default=20, help=f"batches per page, 1-{MAX_LIMIT}"
            )
            parser.add_argument(
                "--after-id",
                default=None,
                help="the page after this batch id, older ones (default: the newest page)",
            )
            parser.add_argument(
                "--before-id",
                default=None,
                help="the page before this batch id, newer ones (default: the newest page)",
            )
        else:
            parser.add_argument("batch_id", metavar="BATCH_ID", help="the batch id")
        parser.add_argument(
            "--base-url",
            default=None,
            help=f"base of results_url (default: BUDGETER_PUBLIC_URL, else {DEFAULT_BASE_URL})",
        )
        parser.set_defaults(run=handler)


async def handler(args: argparse.Namespace, settings: Settings) -> int:
    from budgeter.domain.policy import InvalidTenantError, check_tenant_id
    from budgeter.queue.batches import BatchStore
    from budgeter.store.client import redis_from_settings
    from budgeter.tenants.store import TenantStore

    try:
        tenant = check_tenant_id(args.tenant)
    except InvalidTenantError as exc:
        raise CliError(f"--tenant: {exc}") from None
    if args.batches_command == "list" and args.after_id and args.before_id:
        raise CliError("--after-id and --before-id cannot be used together")
    base_url = (args.base_url or settings.public_url or DEFAULT_BASE_URL).rstrip("/")
    async with redis_from_settings(settings) as redis:
        if not await TenantStore(redis, prefix=settings.key_prefix).exists(tenant):
            raise CliError(f"tenant {tenant!r} not found")
        store = BatchStore(redis, prefix=settings.key_prefix)
        answer = await _answer(args, store, tenant, base_url)
    print(json.dumps(answer))
    return 0


async def _answer(
    args: argparse.Namespace, store: BatchStore, tenant: str, base_url: str
) -> dict[str, Any]:
    """What the API answers for the same operation (same models, same shaping)."""
    from budgeter.api.schemas import DeletedMessageBatch, MessageBatch, MessageBatchList, dump
    from budgeter.queue.batches import BatchNotEndedError, BatchNotFoundError

    action = args.batches_command
    try:
        if action == "list":
            page, has_more = await store.list_batches(
                tenant, limit=args.limit, before_id=args.before_id, after_id=args.after_id
            )
            data = [MessageBatch.of(status, base_url) for status in page]
            return dump(
                MessageBatchList(
                    data=data,
                    has_more=has_more,
                    first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None,
                )
            )
        if action == "get":
            return dump(MessageBatch.of(await store.status(args.batch_id, tenant=tenant), base_url))
        if action == "cancel":
            return dump(MessageBatch.of(await store.cancel(args.batch_id, tenant=tenant), base_url))
        await store.delete(args.batch_id, tenant=tenant)
        return dump(DeletedMessageBatch(id=args.batch_id))
    except BatchNotFoundError as exc:
        raise CliError(f"{exc} (tenant {tenant!r})") from None
    except BatchNotEndedError as exc:
        raise CliError(str(exc)) from None
