"""A bound on how long a caller waits for Redis to answer, set per task (context).

The Redis client's 60 s socket timeout, and its retries, are right for a worker and for a
100,000-request batch's one large MULTI/EXEC; they are wrong for an API request whose
client waits: behind a partition that holds the bytes (no reset) it would answer after
minutes. Inside :func:`reply_deadline` (the API sets one per request, see
budgeter/api/deadline.py) every read of a Redis reply (and every write), the handshake of
a new connection included, waits at most that many seconds (never longer than the socket
timeout: the bound is the connection's socket timeout while it applies), and a timeout is
not retried: the call raises redis-py's ``TimeoutError``, which the API answers
with its 503 for an unreachable Redis. A reply that timed out leaves its connection
half-read: redis-py disconnects it (the pool makes a new one for the next caller).

A bound is per read, so per Redis call: a call that gets no reply within it fails, one
that keeps getting replies (a long pipeline) does not. Tasks started inside inherit the
bound (contextvars), so does a round pipeline of script calls (budgeter/store/scripts.py):
it reads under the bound of the call that opened the round, whoever else joined it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_BOUND_S: ContextVar[float | None] = ContextVar("redis_reply_deadline_s", default=None)


def current() -> float | None:
    """Seconds a reply may take here; None: the client's socket timeout (and retries)."""
    return _BOUND_S.get()


@contextmanager
def reply_deadline(seconds: float | None) -> Iterator[None]:
    """Bound the Redis replies awaited inside (None: lift the bound)."""
    token = _BOUND_S.set(seconds)
    try:
        yield
    finally:
        _BOUND_S.reset(token)
