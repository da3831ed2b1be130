"""The API's bound on Redis: a request whose Redis call gets no reply within
``BUDGETER_API_REDIS_DEADLINE_SECONDS`` answers 503 ``overloaded_error`` with
``retry-after``, the answer it gives when Redis refuses or resets connections.

Behind a partition that holds the bytes (no reset), the Redis client would otherwise wait
on its 60 s socket timeout and its retries, minutes in all. The bound is per Redis reply
(see :mod:`budgeter.store.reply_deadline`): a request waits at most that long for each of
its calls, and a call that timed out is not tried again; its connection is disconnected.

- Batch creation waits longer for its one large MULTI/EXEC: the bound plus
  :data:`BATCH_REPLY_S_PER_REQUEST` per request (:func:`batch_deadline_s`), so Redis
  busy with a 100,000-request batch is not taken for Redis gone.
- ``/v1/messages``: a reservation that gets no reply in time answers 503 and the upstream
  is not called. What follows the upstream call is bounded too: a settle that gets no
  reply in time leaves its reservation to the reaper, which charges it in full (as after
  a crash). One bound for all of the API, on purpose: the script calls of concurrent
  requests share one pipeline per event-loop round (budgeter/store/scripts.py), read
  under the bound of the call that opened the round.
"""

from __future__ import annotations

from aiohttp import web

from budgeter.api.appkeys import SETTINGS
from budgeter.api.errors import Handler
from budgeter.settings import Settings
from budgeter.store.reply_deadline import reply_deadline

# 100,000 requests: the bound + 50 s, up to the client's 60 s socket timeout (measured on
# loopback: the EXEC of 100,000 jobs answered within 0.5 s; a busy Redis, slower)
BATCH_REPLY_S_PER_REQUEST = 0.0005


def batch_deadline_s(settings: Settings, requests: int) -> float:
    """How long batch creation waits for a Redis reply (its MULTI/EXEC grows with it)."""
    return settings.api_redis_deadline_seconds + requests * BATCH_REPLY_S_PER_REQUEST


@web.middleware
async def redis_deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every Redis reply the request waits on, authentication included, is bounded."""
    with reply_deadline(request.app[SETTINGS].api_redis_deadline_seconds):
        return await handler(request)
