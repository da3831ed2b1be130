"""The synchronous proxy: ``POST /v1/messages`` (also ``stream: true``) and
``POST /v1/messages/count_tokens``, under the same admission as the queue.

One reservation per call: ADMIT forwards; DEFER waits up to the tenant's
``max_wait_seconds`` and otherwise answers 429 ``rate_limit_error`` with ``retry-after``;
REJECT answers 429 ``budget_exhausted_error`` with ``x-should-retry: false``. The
reservation is settled exactly once: by the usage of the answer (right after the answer
is sent; see :mod:`budgeter.api.settles`), at ``message_stop`` of a stream, on an
upstream error, or with what was generated when the client goes away.
The caller's betas, version and query go upstream with both calls (budgeter's own count
and the call it admits); see :mod:`budgeter.api.passthrough`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from budgeter.admission.admission import Admission, Decision, Usage
from budgeter.admission.fallback import as_served, fallback_models_of, reserve_with_fallback
from budgeter.api.errors import REQUEST_ID, ApiError
from budgeter.api.passthrough import BetaGate, read_passthrough, upstream_id_headers
from budgeter.api.ratelimit_headers import tenant_ratelimit_headers
from budgeter.api.request import PRINCIPAL, read_json
from budgeter.api.settles import PendingSettles
from budgeter.domain import jsonio
from budgeter.domain.messages import MessageParams, first_error
from budgeter.domain.passthrough import Passthrough
from budgeter.domain.results import BUDGET_ERROR_TYPE, REFUSAL_TYPES, error_body
from budgeter.ledger.tags import HEADER as TAGS_HEADER
from budgeter.ledger.tags import TagError, proxy_meta
from budgeter.metrics import Metrics
from budgeter.queue.jobqueue import JobQueue
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.upstream.client import (
    COUNT_TOKENS_FIELDS,
    UpstreamClient,
    UpstreamError,
)
from budgeter.upstream.token_counter import TokenCounter

log = logging.getLogger("budgeter.proxy")

MAX_RETRY_AFTER_S = 60
SETTLE_WAIT_POLL_S = 0.25


@dataclass
class ProxyDeps:
    redis: RedisClient
    upstream: UpstreamClient
    counter: TokenCounter
    admission: Admission
    queue: JobQueue
    tenants: TenantStore
    metrics: Metrics
    prefix: str
    hold_ms: int
    betas: BetaGate
    settles: PendingSettles = field(default_factory=PendingSettles)  # after the answers
    clock: Callable[[], float] = time.monotonic  # the DEFER wait's (injected by tests)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


PROXY = web.AppKey("proxy", ProxyDeps)  # built by the app's cleanup context at start-up


def _deps(request: web.Request) -> ProxyDeps:
    return request.app[PROXY]


def retry_after_s(until_ms: int, now_ms: int) -> int:
    """Whole seconds, at least 1 and at most 60 (SDKs ignore larger values)."""
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil((until_ms - now_ms) / 1000)))


async def _params(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    try:
        MessageParams.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, first_error(exc)) from None
    if not isinstance(body, dict):  # (never: MessageParams takes a JSON object only)
        raise ApiError(400, "request body must be a JSON object")
    return dict(body)


def _discard(task: asyncio.Future[Any]) -> None:
    """Leave a side task unawaited: cancel it, or take its exception (no warning later)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _upstream_error(
    request: web.Request, exc: UpstreamError, headers: dict[str, str]
) -> web.Response:
    status = exc.status if exc.status >= 400 else 502
    headers = {**headers, **upstream_id_headers(request, exc.request_id)}
    return web.json_response(exc.body, status=status, headers=headers, dumps=jsonio.dumps_str)


async def _passthrough(request: web.Request, deps: ProxyDeps, tenant: str) -> Passthrough:
    """The caller's betas (refused here when the setting or the tenant's policy does not
    allow one), version and query."""
    passthrough = read_passthrough(request)
    await deps.betas.check(tenant, passthrough.betas)
    return passthrough


async def count_tokens(request: web.Request) -> web.Response:
    deps = _deps(request)
    tenant = request[PRINCIPAL].tenant
    passthrough = await _passthrough(request, deps, tenant)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    extra = sorted(set(body) - COUNT_TOKENS_FIELDS)
    if extra and not passthrough.betas:  # under a beta, the upstream knows more fields
        raise ApiError(400, f"{extra[0]}: Extra inputs are not permitted")
    # the headers are read while the upstream counts
    reading = asyncio.ensure_future(
        tenant_ratelimit_headers(deps.redis, TenantKeys.of(deps.prefix, tenant))
    )
    try:
        answer = await deps.upstream.count_tokens_raw(body, passthrough)
    except UpstreamError as exc:
        return _upstream_error(request, exc, await reading)
    except BaseException:
        _discard(reading)
        raise
    headers = {**await reading, **upstream_id_headers(request, answer.request_id)}
    return web.Response(body=answer.raw, content_type="application/json", headers=headers)


async def _end_failed_call(deps: ProxyDeps, tenant: str, rid: str, exc: UpstreamError) -> None:
    """A call that failed for good: charged in full when it was sent and got no answer (the
    upstream may have generated and billed it), else released."""
    if exc.maybe_served:
        await deps.admission.charge_full(tenant, rid)
    else:
        await deps.admission.release(tenant, rid)


async def create_message(request: web.Request) -> web.StreamResponse:
    deps = _deps(request)
    tenant = request[PRINCIPAL].tenant
    keys = TenantKeys.of(deps.prefix, tenant)
    passthrough = await _passthrough(request, deps, tenant)
    params = await _params(request)
    try:  # bad tags: 400 before anything is counted or reserved
        header = request.headers.get(TAGS_HEADER)
        meta = proxy_meta(request[REQUEST_ID], header, params, request[PRINCIPAL].key_id)
    except TagError as exc:
        raise ApiError(400, f"{TAGS_HEADER}: {exc}") from None
    try:
        input_tokens = await deps.counter.count_for(tenant, params, passthrough)
    except UpstreamError as exc:
        headers = await tenant_ratelimit_headers(deps.redis, keys)
        return _upstream_error(request, exc, headers)
    rid = f"sync:{request[REQUEST_ID]}"
    model = str(params["model"])
    key = request[PRINCIPAL].scope_key  # the key's id when it has limits of its own
    decision, served = await _admit(deps, tenant, rid, input_tokens, params, model, meta, key)
    if decision.kind != "ADMIT":
        headers = await tenant_ratelimit_headers(deps.redis, keys, now_ms=decision.now_ms)
        raise _refusal(decision, model, headers)
    params, fallback = as_served(params, served)  # the policy's fallback model is called
    # the reservation is marked sent by reserve itself (sent_at_once): a refusal below
    # releases it explicitly; a crash or a client gone mid-call charges it in full.
    # The rate-limit headers (the buckets just after this reservation) are read while the
    # upstream works: no round trip of their own on the way.
    reading = asyncio.ensure_future(
        tenant_ratelimit_headers(deps.redis, keys, now_ms=decision.now_ms)
    )
    try:
        call = _Call(tenant, rid, params, passthrough, input_tokens, fallback)
        if params.get("stream"):
            return await _stream(request, deps, call, reading)
        return await _forward(request, deps, call, reading)
    finally:
        _discard(reading)


def _refusal(decision: Decision, model: str, headers: dict[str, str]) -> ApiError:
    """The answer to a DEFER (after waiting as long as the policy allows) or a REJECT."""
    if decision.kind == "DEFER":
        wait = retry_after_s(decision.until_ms or decision.now_ms + 1000, decision.now_ms)
        return ApiError(
            429,
            decision.describe(model),
            error_type="rate_limit_error",
            headers={**headers, "retry-after": str(wait), "x-should-retry": "true"},
        )
    if decision.reason == "unknown_tenant":
        return ApiError(404, "this key's tenant has no policy (tenant not found)", headers=headers)
    if decision.reason_kind in REFUSAL_TYPES:  # whichever scope refused (key, parent)
        status, error_type = REFUSAL_TYPES[decision.reason_kind]
        return ApiError(status, decision.describe(model), error_type=error_type, headers=headers)
    return ApiError(
        429,
        decision.describe(model),
        error_type=BUDGET_ERROR_TYPE,
        headers={**headers, "x-should-retry": "false"},
    )


async def _headers(reading: asyncio.Future[dict[str, str]]) -> dict[str, str]:
    """The rate-limit headers read beside the upstream call. The upstream has been called
    by now, so a failed read costs only the headers, not the answer."""
    try:
        return await reading
    except Exception as exc:
        log.warning("rate-limit headers unavailable: %s", type(exc).__name__)
        return {}


@dataclass(frozen=True, slots=True)
class _Call:
    """An admitted call: whose, its reservation, what goes upstream, what was counted."""

    tenant: str
    rid: str
    params: dict[str, Any]
    passthrough: Passthrough
    input_tokens: int
    headers: dict[str, str] = field(default_factory=dict)  # budgeter's own answer headers

    @property
    def model(self) -> str:
        return str(self.params["model"])

    @property
    def reserved(self) -> int:
        return self.input_tokens + int(self.params["max_tokens"])


async def _forward(
    request: web.Request,
    deps: ProxyDeps,
    call: _Call,
    reading: asyncio.Future[dict[str, str]],
) -> web.Response:
    tenant, rid = call.tenant, call.rid
    try:
        answer = await deps.upstream.create_message_raw(call.params, call.passthrough)
    except UpstreamError as exc:
        await _end_failed_call(deps, tenant, rid, exc)
        return _upstream_error(request, exc, await _headers(reading))
    except BaseException:
        await deps.admission.charge_full(tenant, rid)
        raise
    headers = await _headers(reading)  # before the settle: the state the decision left
    headers.update(upstream_id_headers(request, answer.request_id))
    headers.update(call.headers)
    headers["request-id"] = request[REQUEST_ID]  # (the middleware adds none to a sent answer)
    usage = Usage.from_message(answer.payload)
    # the upstream's own bytes: no second encoding of the message
    response = web.Response(body=answer.raw, content_type="application/json", headers=headers)
    try:  # the answer goes out first; the settle right after, beside the next requests
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:  # settled all the same: the upstream served it
        log.info("client left before the answer", extra={"tenant": tenant, "reservation": rid})
        return web.Response(status=499)
    finally:
        deps.settles.start(_settle_served(deps, call, usage), reservation=rid)
    return response


async def _settle_served(deps: ProxyDeps, call: _Call, usage: Usage) -> None:
    await _settle(deps, call.tenant, call.rid, call.model, usage, call.reserved)
    deps.metrics.for_tenant(call.tenant).job("succeeded").inc()


async def _admit(
    deps: ProxyDeps,
    tenant: str,
    rid: str,
    input_tokens: int,
    params: dict[str, Any],
    model: str,
    meta: Mapping[str, object] | None = None,
    key: str | None = None,
) -> tuple[Decision, str]:
    """Reserve (also in the API key's scope: ``key``, when it has limits); while DEFER
    and the tenant's max_wait allows, wait and try again. Answers
    the decision and the model to call (see budgeter/admission/fallback.py).

    The policy's ``max_wait_seconds`` is read only at the first DEFER, so an admitted call
    costs one Redis round trip here."""
    series = deps.metrics.for_tenant(tenant)
    started = deps.clock()
    give_up: float | None = None
    while True:
        decision, served = await reserve_with_fallback(
            deps.admission,
            tenant,
            rid,
            input_tokens,
            int(params["max_tokens"]),
            model=model,
            fallback_models=fallback_models_of(deps.tenants).lookup(tenant),
            hold_ms=deps.hold_ms,
            sent_at_once=True,
            key=key,
            meta=meta,
        )
        series.decision(decision.kind, decision.reason).inc()
        if decision.kind != "DEFER" or decision.waits_for_reset:
            break
        pause = (
            SETTLE_WAIT_POLL_S
            if decision.waits_for_settle
            else (decision.until_ms - decision.now_ms) / 1000
        )
        if give_up is None:
            policy = await deps.tenants.get(tenant)
            give_up = started + (policy.max_wait_seconds if policy else 0.0)
        if deps.clock() + pause > give_up:
            break
        await deps.sleep(max(pause, 0.001))
    if decision.kind == "ADMIT":
        series.admission_wait.observe(deps.clock() - started)
    return decision, served


async def _settle(
    deps: ProxyDeps, tenant: str, rid: str, model: str, usage: Usage, reserved: int
) -> None:
    settled = await deps.admission.settle(tenant, rid, usage)
    usage.record(deps.metrics, tenant, model, reserved)
    for waiting in await deps.admission.to_wake(tenant, settled):  # their jobs waited
        await deps.queue.activate(waiting, unpark=True, wake=1)


class StreamUsage:
    """Usage read from the events of a stream as they pass. Until ``message_start`` tells
    the real input, the counted input is assumed: the upstream bills it once it has the
    request, even if the client leaves before the first event."""

    def __init__(self, counted_input: int = 0) -> None:
        self.input = counted_input
        self.output = self.cache_creation = self.cache_read = 0
        self.text_bytes = 0
        self.stopped = False
        self.errored = False

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self.input = int(usage.get("input_tokens") or 0)
            self.cache_creation = int(usage.get("cache_creation_input_tokens") or 0)
            self.cache_read = int(usage.get("cache_read_input_tokens") or 0)
            self.output = int(usage.get("output_tokens") or 0)
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            for field in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(field), str):
                    self.text_bytes += len(delta[field].encode())
        elif kind == "message_delta":
            usage = event.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.output = int(usage["output_tokens"])
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            self.errored = True

    def usage(self) -> Usage:
        """What was generated: the reported output, or an estimate from the text seen."""
        output = self.output if self.stopped else max(self.output, math.ceil(self.text_bytes / 3))
        return Usage(self.input, output, self.cache_creation, self.cache_read)


async def _end_with_error(response: web.StreamResponse, lines: list[bytes], message: str) -> None:
    """Write what came of the event being read, as it came, then an ``error`` event."""
    event = error_body("api_error", message)
    await response.write(b"".join(lines) + f"event: error\ndata: {json.dumps(event)}\n\n".encode())


async def _pass_events(
    content: AsyncIterable[bytes],
    response: web.StreamResponse,
    seen: StreamUsage,
    lines: list[bytes],
    settle: Callable[[], Awaitable[None]],
) -> None:
    """Pass the upstream's events on, each in one piece as it ends, reading the usage from
    them, and ``settle`` once the last one (``message_stop`` or ``error``) has gone out.
    ``lines`` holds the lines of the event being read (the caller writes them on an error)."""
    pending: list[str] = []
    async for raw_line in content:
        lines.append(raw_line)
        line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            pending.append(line[5:].strip())
        elif not line:
            await response.write(b"".join(lines))
            lines.clear()
            if not pending:
                continue
            with contextlib.suppress(ValueError):
                seen.feed(jsonio.loads("\n".join(pending)))
            pending.clear()
            if seen.stopped or seen.errored:
                await settle()
    if lines:  # the upstream ended without closing its last event
        await response.write(b"".join(lines))


async def _stream(
    request: web.Request,
    deps: ProxyDeps,
    call: _Call,
    reading: asyncio.Future[dict[str, str]],
) -> web.StreamResponse:
    tenant, rid, model, reserved = call.tenant, call.rid, call.model, call.reserved
    seen = StreamUsage(call.input_tokens)
    settled = False

    async def settle() -> None:  # once: at the last event, else when the stream ends
        nonlocal settled
        if not settled:
            await _settle(deps, tenant, rid, model, seen.usage(), reserved)
            settled = True

    try:
        async with deps.upstream.open_stream(call.params, call.passthrough) as upstream:
            headers = await _headers(reading)
            upstream_id = upstream.headers.get("request-id")
            response = web.StreamResponse(
                headers={
                    **headers,
                    **upstream_id_headers(request, upstream_id),
                    **call.headers,
                    "content-type": "text/event-stream; charset=utf-8",
                    "cache-control": "no-cache",
                    "request-id": request[REQUEST_ID],
                }
            )
            await response.prepare(request)
            lines: list[bytes] = []  # of the event being read: written in one piece at its end
            try:
                await _pass_events(upstream.content, response, seen, lines, settle)
            except (ConnectionResetError, asyncio.CancelledError):
                log.info("client left mid-stream", extra={"tenant": tenant, "reservation": rid})
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                # the upstream went away mid-stream: tell the client in the stream itself
                log.warning("upstream stream broke: %s", type(exc).__name__)
                await _end_with_error(response, lines, "upstream connection lost mid-stream")
            except Exception:  # an event budgeter cannot read (or a bug): the client is
                # told in the stream, which then ends, instead of waiting on it forever
                log.exception("stream failed", extra={"tenant": tenant, "reservation": rid})
                await _end_with_error(response, lines, "internal error mid-stream")
            finally:  # client gone or upstream cut: charge what was generated
                await settle()
            await response.write_eof()
            return response
    except UpstreamError as exc:  # before the first byte of a 2xx answer
        await _end_failed_call(deps, tenant, rid, exc)
        return _upstream_error(request, exc, await _headers(reading))
    except ConnectionResetError:
        return web.Response(status=499)
