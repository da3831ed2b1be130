"""The Message Batches API (Anthropic's shape): create, list, retrieve, cancel, stream the
results of, and delete a tenant's batches."""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web
from pydantic import ValidationError

from budgeter.api.appkeys import BATCHES, SETTINGS, TENANTS
from budgeter.api.deadline import batch_deadline_s
from budgeter.api.errors import REQUEST_ID, ApiError
from budgeter.api.passthrough import check_betas, read_passthrough
from budgeter.api.request import base_url, limit_param, principal, read_json
from budgeter.api.schemas import (
    CreateBatchBody,
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchList,
    ok,
)
from budgeter.domain.jobs import MAX_DEADLINE_S
from budgeter.domain.messages import JsonValue, first_error
from budgeter.domain.policy import PRIORITIES
from budgeter.ledger.tags import HEADER as TAGS_HEADER
from budgeter.ledger.tags import TagError, parse_tags_header
from budgeter.queue.batches import BatchNotEndedError, BatchNotFoundError, BatchStatus
from budgeter.queue.jobqueue import UnknownTenantError
from budgeter.store.reply_deadline import reply_deadline

PRIORITY_HEADER = "budgeter-priority"
DEADLINE_HEADER = "budgeter-deadline-seconds"
RESULT_LINES_PER_WRITE = 500


def _body(payload: JsonValue) -> CreateBatchBody:
    try:
        body = CreateBatchBody.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(400, first_error(exc)) from None
    seen: set[str] = set()
    for index, item in enumerate(body.requests):
        if item.custom_id in seen:
            raise ApiError(
                400, f"requests.{index}.custom_id: duplicate custom_id {item.custom_id!r}"
            )
        seen.add(item.custom_id)
    return body


async def create_batch(request: web.Request) -> web.Response:
    who = principal(request)
    settings = request.app[SETTINGS]
    passthrough = read_passthrough(request)  # its betas and version go with every job
    try:  # its tags go in every job's ledger entry
        tags = parse_tags_header(request.headers.get(TAGS_HEADER))
    except TagError as exc:
        raise ApiError(400, f"{TAGS_HEADER}: {exc}") from None
    passthrough = replace(
        passthrough, tags=tuple(tags.items()), key=who.key_id, key_limited=who.limited
    )
    check_betas(passthrough.betas, settings.allowed_betas)
    body = _body(await read_json(request))
    policy = await request.app[TENANTS].get(who.tenant)
    if policy is None:
        raise ApiError(404, "this key's tenant has no policy (tenant not found)")
    check_betas(passthrough.betas, policy.allowed_betas, tenant=True)
    for index, item in enumerate(body.requests):
        if not policy.allows(item.params.model):
            raise ApiError(
                403,
                f"requests.{index}.params.model: model {item.params.model!r} is not in this "
                "tenant's allowed_models",
            )
    priority = _priority_header(request, policy.default_priority)
    ttl_ms = _deadline_header(request, int(settings.batch_ttl_hours * 3_600_000))
    store = request.app[BATCHES]
    # its MULTI/EXEC grows with it: Redis busy with it is given longer (api/deadline.py)
    with reply_deadline(batch_deadline_s(settings, len(body.requests))):
        try:
            batch_id = await store.create(
                who.tenant, body.requests, ttl_ms=ttl_ms, priority=priority, passthrough=passthrough
            )
        except UnknownTenantError:
            raise ApiError(404, "this key's tenant has no policy (tenant not found)") from None
        status = await store.status(batch_id, tenant=who.tenant)
    return ok(MessageBatch.of(status, base_url(request)))


def _priority_header(request: web.Request, default: str) -> str:
    value = request.headers.get(PRIORITY_HEADER, default).strip().lower()
    if value not in PRIORITIES:
        raise ApiError(400, f"{PRIORITY_HEADER}: must be one of high, normal, low")
    return value


def _deadline_header(request: web.Request, default_ms: int) -> int:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return default_ms
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 1 <= seconds <= MAX_DEADLINE_S:
        raise ApiError(400, f"{DEADLINE_HEADER}: a number of seconds from 1 to {MAX_DEADLINE_S}")
    return int(seconds * 1000)


async def get_batch(request: web.Request) -> web.Response:
    status = await _status_or_404(request)
    return ok(MessageBatch.of(status, base_url(request)))


async def _status_or_404(request: web.Request) -> BatchStatus:
    try:
        return await request.app[BATCHES].status(
            request.match_info["batch_id"], tenant=principal(request).tenant
        )
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None


async def list_batches(request: web.Request) -> web.Response:
    before_id = request.query.get("before_id")
    after_id = request.query.get("after_id")
    if before_id and after_id:
        raise ApiError(400, "before_id and after_id cannot be used together")
    try:
        page, has_more = await request.app[BATCHES].list_batches(
            principal(request).tenant,
            limit=limit_param(request),
            before_id=before_id,
            after_id=after_id,
        )
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    data = [MessageBatch.of(status, base_url(request)) for status in page]
    return ok(
        MessageBatchList(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )
    )


async def cancel_batch(request: web.Request) -> web.Response:
    try:
        status = await request.app[BATCHES].cancel(
            request.match_info["batch_id"], tenant=principal(request).tenant
        )
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    return ok(MessageBatch.of(status, base_url(request)))


async def batch_results(request: web.Request) -> web.StreamResponse:
    status = await _status_or_404(request)
    if not status.ended:
        raise ApiError(
            400, f"batch {status.id} is still {status.processing_status}: results come when it ends"
        )
    response = web.StreamResponse(
        headers={"content-type": "application/x-jsonl", "request-id": request[REQUEST_ID]}
    )
    await response.prepare(request)
    buffer: list[str] = []
    async for line in request.app[BATCHES].raw_results(status.id, tenant=status.tenant):
        buffer.append(line)
        if len(buffer) >= RESULT_LINES_PER_WRITE:
            await response.write(("\n".join(buffer) + "\n").encode())
            buffer.clear()
    if buffer:
        await response.write(("\n".join(buffer) + "\n").encode())
    await response.write_eof()
    return response


async def delete_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    try:
        await request.app[BATCHES].delete(batch_id, tenant=principal(request).tenant)
    except BatchNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except BatchNotEndedError as exc:
        raise ApiError(400, str(exc)) from None
    return ok(DeletedMessageBatch(id=batch_id))
