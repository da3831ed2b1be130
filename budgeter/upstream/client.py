"""Async client for an Anthropic-compatible Messages API (messages and count_tokens routes).

Retries retryable statuses and connection errors with exponential backoff and full jitter,
honouring ``retry-after``; any other client error is final. Never logs the API key or headers.
What the caller's request carries through (``anthropic-beta``, its ``anthropic-version``
when ``anthropic_version="client"``, query parameters) comes in a :class:`Passthrough`;
the upstream's ``request-id`` goes back in every :class:`UpstreamAnswer` and error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeGuard, TypeVar

import aiohttp

from budgeter.domain import jsonio
from budgeter.domain.messages import COUNT_TOKENS_FIELDS as COUNT_TOKENS_FIELDS
from budgeter.domain.messages import JsonValue
from budgeter.domain.passthrough import (
    BETA_HEADER,
    CLIENT_VERSION,
    DEFAULT_VERSION,
    NO_PASSTHROUGH,
    VERSION_HEADER,
    Passthrough,
    format_betas,
)
from budgeter.domain.results import STATUS_ERROR_TYPES
from budgeter.domain.results import error_body as anthropic_error

log = logging.getLogger("budgeter.upstream")

ANTHROPIC_VERSION = DEFAULT_VERSION
UPSTREAM_REQUEST_ID = "request-id"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
# The routes that generate a message: the upstream bills them, so one whose connection was
# lost after it was sent may have been served (it is not sent again), and their 429 pauses
# the model for every process. (count_tokens is neither.)
_GENERATING_ROUTES = frozenset({"messages", "messages_stream"})

JsonObject = dict[str, JsonValue]
"""A JSON object as parsed from the upstream's answer."""

T = TypeVar("T")


# Fields count_tokens takes only behind a beta: counted when the call carries betas (it
# sends them to /v1/messages under the same betas; without one the upstream refuses them).
BETA_COUNT_TOKENS_FIELDS = frozenset({"context_management", "mcp_servers", "output_format"})


def count_tokens_body(
    params: Mapping[str, object], betas: tuple[str, ...] = ()
) -> dict[str, object]:
    """The subset of a Messages request that ``/v1/messages/count_tokens`` accepts (with
    ``betas``, the beta-only fields too)."""
    fields = COUNT_TOKENS_FIELDS | BETA_COUNT_TOKENS_FIELDS if betas else COUNT_TOKENS_FIELDS
    return {key: value for key, value in params.items() if key in fields}


def _is_error_body(payload: JsonValue) -> TypeGuard[JsonObject]:
    return (
        isinstance(payload, dict)
        and payload.get("type") == "error"
        and isinstance(payload.get("error"), dict)
    )


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP-date or garbage: fall back to the jittered backoff
        if value >= 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """A 2xx JSON answer: parsed, as the upstream sent it, and its ``request-id``."""

    payload: JsonObject
    raw: bytes
    request_id: str | None = None


class UpstreamError(Exception):
    """The upstream call failed for good.

    ``status`` is the HTTP status (0 for connection errors and timeouts), ``body`` an
    Anthropic-shaped error body (the upstream's own when it sent one), ``retryable`` whether
    the failure was transient (retries exhausted) rather than a final refusal, and
    ``maybe_served`` whether the request may have been served (and billed) anyway: a
    timeout or a connection lost after the request was sent.
    """

    def __init__(
        self,
        status: int,
        body: JsonObject,
        *,
        retryable: bool,
        maybe_served: bool = False,
        request_id: str | None = None,
    ) -> None:
        error = body.get("error")
        if not isinstance(error, dict):
            error = {}
        super().__init__(
            f"upstream {status or 'error'}: {error.get('type')}: {error.get('message')}"
        )
        self.status = status
        self.body = body
        self.retryable = retryable
        self.maybe_served = maybe_served
        self.request_id = request_id  # the upstream's, when it answered


@dataclass(frozen=True, slots=True)
class _Reply(Generic[T]):
    """What one attempt got back: the status and headers, the whole body (of a refusal;
    of any answer but a stream), and ``value``, what a 2xx answer gives the caller."""

    status: int
    headers: Mapping[str, str]
    raw: bytes = b""
    value: T | None = None


class UpstreamClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 600.0,
        count_timeout_s: float = 30.0,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        observe: Callable[[str, str, float], None] | None = None,
        on_rate_limited: Callable[[str, float], Awaitable[object]] | None = None,
        anthropic_version: str = ANTHROPIC_VERSION,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self.anthropic_version = anthropic_version  # "client": the caller's (else the default)
        self._headers = {
            "x-api-key": api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
        }
        self.timeout_s = timeout_s
        self.count_timeout_s = count_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._rand = rand
        self._observe = observe
        self.on_rate_limited = on_rate_limited  # (model, seconds): the upstream said 429

    def __repr__(self) -> str:  # keeps the key out of any repr that reaches a log
        return f"UpstreamClient(base_url={self.base_url!r})"

    def _headers_for(self, passthrough: Passthrough = NO_PASSTHROUGH) -> dict[str, str]:
        """The headers of one upstream call: the upstream key, the anthropic-version (the
        caller's when set to ``client`` and it sent one) and the caller's betas."""
        headers = dict(self._headers)
        if self.anthropic_version != CLIENT_VERSION:
            headers[VERSION_HEADER] = self.anthropic_version
        elif passthrough.version:
            headers[VERSION_HEADER] = passthrough.version
        if passthrough.betas:
            headers[BETA_HEADER] = format_betas(passthrough.betas)
        return headers

    async def count_tokens(
        self, params: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> int:
        """Input tokens of the fields of ``params`` that count_tokens accepts."""
        body = count_tokens_body(params, passthrough.betas)
        answer = await self.count_tokens_raw(body, passthrough)
        tokens = answer.payload.get("input_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise UpstreamError(
                200,
                anthropic_error("api_error", "count_tokens answer lacks input_tokens"),
                retryable=False,
                request_id=answer.request_id,
            )
        return tokens

    async def count_tokens_raw(
        self, body: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> UpstreamAnswer:
        """POST ``body`` as it is to /v1/messages/count_tokens (the proxy's route)."""
        return await self._post_raw(
            "count_tokens", "/v1/messages/count_tokens", body, self.count_timeout_s, passthrough
        )

    async def create_message(
        self, params: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> JsonObject:
        return (await self.create_message_raw(params, passthrough)).payload

    async def create_message_raw(
        self, params: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> UpstreamAnswer:
        """The answer parsed and as the upstream sent it (a proxy forwards those bytes
        rather than encoding the message again)."""
        return await self._post_raw("messages", "/v1/messages", params, self.timeout_s, passthrough)

    async def get_json(self, path: str, query: Mapping[str, str]) -> UpstreamAnswer:
        """GET ``path`` once (no retries: the caller has a fallback); raises
        :class:`UpstreamError` on any failure."""
        timeout = aiohttp.ClientTimeout(total=self.count_timeout_s)
        started = time.perf_counter()
        try:
            async with self._session.get(
                self.base_url + path, params=query, headers=self._headers_for(), timeout=timeout
            ) as response:
                reply: _Reply[None] = _Reply(
                    response.status, response.headers, await response.read()
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._record("models", "error", started)
            raise _lost("models", exc) from None
        self._record("models", str(reply.status), started)
        if not 200 <= reply.status < 300:
            raise _status_error(reply.status, reply.raw, reply.headers)
        return _answer(reply)

    @asynccontextmanager
    async def open_stream(
        self, params: Mapping[str, object], passthrough: Passthrough = NO_PASSTHROUGH
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST /v1/messages with ``stream: true``; yields the open 2xx response.

        Retries like the other calls (the same loop), but only until the first byte of a
        2xx answer: once events flow, a failure is the caller's to report (it may already
        have forwarded them).
        """
        url = self.base_url + "/v1/messages"
        data = jsonio.dumps({**params, "stream": True})
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.count_timeout_s)
        headers = self._headers_for(passthrough)

        async def send() -> _Reply[aiohttp.ClientResponse]:
            response = await self._session.post(
                url, data=data, headers=headers, params=passthrough.query, timeout=timeout
            )
            if 200 <= response.status < 300:
                return _Reply(response.status, response.headers, value=response)
            try:
                return _Reply(response.status, response.headers, await response.read())
            finally:
                response.release()

        reply = await self._attempts("messages_stream", send, params)
        assert reply.value is not None  # a 2xx reply of send() carries its response
        try:
            yield reply.value
        finally:
            reply.value.release()

    async def ping(self) -> bool:
        """Readiness: does the upstream answer HTTP (below 500) at all. Never raises."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.count_timeout_s)
            async with self._session.get(self.base_url + "/", timeout=timeout) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("upstream ping failed: %s", type(exc).__name__)
            return False

    def backoff_s(self, attempt: int, retry_after: float | None) -> float:
        """Delay before the attempt after ``attempt`` (1-based)."""
        delay = self._rand() * min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (attempt - 1))
        if retry_after is not None:
            delay = min(max(retry_after, delay), self.backoff_max_s * 2)
        return delay

    async def _post_raw(
        self,
        route: str,
        path: str,
        body: Mapping[str, object],
        timeout_s: float,
        passthrough: Passthrough,
    ) -> UpstreamAnswer:
        url = self.base_url + path
        data = jsonio.dumps(body)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        headers = self._headers_for(passthrough)

        async def send() -> _Reply[None]:
            async with self._session.post(
                url, data=data, headers=headers, params=passthrough.query, timeout=timeout
            ) as response:
                return _Reply(response.status, response.headers, await response.read())

        return _answer(await self._attempts(route, send, body))

    async def _attempts(
        self,
        route: str,
        send: Callable[[], Awaitable[_Reply[T]]],
        params: Mapping[str, object],
    ) -> _Reply[T]:
        """The one retry loop of every call: ``send()`` makes one attempt; this records
        it, retries what is retryable with backoff (honouring retry-after), tells
        ``on_rate_limited`` of a 429 on a generating route, logs, and answers the first
        2xx reply or raises :class:`UpstreamError`."""
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            started = time.perf_counter()
            try:
                reply = await send()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._record(route, "error", started)
                error = _lost(route, exc)
                if error.maybe_served:  # sent, then no answer: never sent a second time
                    raise error from None
                reason = type(exc).__name__
            else:
                self._record(route, str(reply.status), started)
                if 200 <= reply.status < 300:
                    return reply
                error = _status_error(reply.status, reply.raw, reply.headers)
                if not error.retryable:
                    log.info("upstream %s refused with HTTP %d (final)", route, reply.status)
                    raise error
                retry_after, reason = _retry_after_s(reply.headers), f"HTTP {reply.status}"
                if reply.status == 429 and route in _GENERATING_ROUTES:
                    await self._rate_limited(params, retry_after)
            await self._before_retry(route, attempt, reason, retry_after, error)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _before_retry(
        self,
        route: str,
        attempt: int,
        reason: str,
        retry_after: float | None,
        error: UpstreamError,
    ) -> None:
        """Wait before the next attempt, or raise ``error`` when this was the last."""
        remaining = self.max_attempts - attempt
        if remaining == 0:
            log.warning(
                "upstream %s failed on attempt %d (%s); no tries left", route, attempt, reason
            )
            raise error
        delay = self.backoff_s(attempt, retry_after)
        log.warning(
            "upstream %s failed on attempt %d (%s); retrying in %.2fs, %d tries left",
            route,
            attempt,
            reason,
            delay,
            remaining,
        )
        await self._sleep(delay)

    async def _rate_limited(self, params: Mapping[str, object], retry_after: float | None) -> None:
        """Tell every process that the upstream paused this model (never raises)."""
        if self.on_rate_limited is None:
            return
        try:
            await self.on_rate_limited(
                str(params.get("model", "")), retry_after if retry_after is not None else 1.0
            )
        except Exception:
            log.warning("could not record the upstream's pause", exc_info=True)

    def _record(self, route: str, status: str, started: float) -> None:
        if self._observe is not None:
            self._observe(route, status, time.perf_counter() - started)


def _lost(route: str, exc: aiohttp.ClientError | TimeoutError) -> UpstreamError:
    """The error of an attempt that got no answer. Not connected at all (refused, or the
    connect timed out): safe to retry. Sent but no answer on a generating route: a message
    may have been generated and billed (``maybe_served``)."""
    timed_out = isinstance(exc, TimeoutError)
    never_sent = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    maybe_served = route in _GENERATING_ROUTES and not never_sent
    error = UpstreamError(
        0,
        anthropic_error(
            "timeout_error" if timed_out else "api_error",
            f"upstream {'timed out' if timed_out else 'unreachable'}: {type(exc).__name__}",
        ),
        retryable=True,
        maybe_served=maybe_served,
    )
    if maybe_served:
        log.warning("upstream %s call lost after sending (%s)", route, type(exc).__name__)
    return error


def _answer(reply: _Reply[None]) -> UpstreamAnswer:
    request_id = reply.headers.get(UPSTREAM_REQUEST_ID)
    payload = _parse_json(reply.raw)
    if isinstance(payload, dict):
        return UpstreamAnswer(payload, reply.raw, request_id)
    raise UpstreamError(
        reply.status,
        anthropic_error("api_error", "upstream answered non-JSON"),
        retryable=False,
        request_id=request_id,
    )


def _status_error(status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
    payload = _parse_json(raw)
    body = (
        payload
        if _is_error_body(payload)
        else anthropic_error(STATUS_ERROR_TYPES.get(status, "api_error"), f"upstream HTTP {status}")
    )
    return UpstreamError(
        status,
        body,
        retryable=status in RETRYABLE_STATUSES,
        request_id=headers.get(UPSTREAM_REQUEST_ID),
    )


def _parse_json(raw: bytes) -> JsonValue:
    try:
        value: JsonValue = jsonio.loads(raw)
    except ValueError:
        return None
    return value
