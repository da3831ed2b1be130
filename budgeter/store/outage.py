"""Redis being away is one condition, not a stream of tracebacks.

Every loop of a process (worker lanes, picks, maintenance, heartbeats, API handlers) that
fails because Redis cannot be reached reports it here: one WARNING line per retry
interval for the whole process ("Redis at URL unreachable: ...; retrying in 5 s"), and
one INFO line when a connection succeeds again. Any other failure is logged as before,
with its traceback.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("budgeter.redis")

RETRY_INTERVAL_S = 5.0
WARN = logging.WARNING
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # refused, reset, closed
    BusyLoadingError,  # restarted, still loading its data (a RedisConnectionError too)
    RedisTimeoutError,
    ConnectionError,  # the builtin: a socket error that escaped redis-py
)


def unreachable_cause(exc: BaseException | None) -> BaseException | None:
    """The error in ``exc`` or what it was raised from that says Redis could not be
    reached; None when there is none (a failure of another kind)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, UNREACHABLE):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def is_unreachable(exc: BaseException | None) -> bool:
    return unreachable_cause(exc) is not None


class RedisOutage:
    """The process's view of whether Redis answers, and its rate-limited log lines."""

    def __init__(
        self, *, interval_s: float = RETRY_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.where = "Redis"  # "Redis at redis://host:port/db", set by redis_from_settings
        self.down = False
        self.reported = 0
        self._last: float | None = None
        self._lock = threading.Lock()

    def describe(self, url: str) -> None:
        self.where = f"Redis at {url}"

    def unreachable(self, exc: BaseException) -> bool:
        """Note a failed call; logs (and answers True) at most once per interval."""
        with self._lock:
            self.down = True
            now = self.clock()
            if self._last is not None and now - self._last < self.interval_s:
                return False
            self._last = now
            self.reported += 1
        reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        log.warning(
            "%s unreachable: %s; retrying in %g s", self.where, reason[:300], self.interval_s
        )
        return True

    def reachable(self) -> None:
        """A connection succeeded: after an outage, say so once."""
        if not self.down:
            return
        with self._lock:
            was_down, self.down, self._last = self.down, False, None
        if was_down:
            log.info("%s reachable again", self.where)


OUTAGE = RedisOutage()


def log_failure(
    logger: logging.Logger,
    message: str,
    *,
    extra: Mapping[str, object] | None = None,
    level: int = logging.ERROR,
) -> None:
    """Log the exception being handled: a Redis outage as :data:`OUTAGE`'s one line per
    interval, anything else as ``message`` at ``level`` with its traceback."""
    cause = unreachable_cause(sys.exc_info()[1])
    if cause is not None:
        OUTAGE.unreachable(cause)
        return
    logger.log(level, message, extra=extra, exc_info=True)
