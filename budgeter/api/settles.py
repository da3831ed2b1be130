"""Settles that run after the answer went out.

The proxy answers a non-streamed call first and settles its reservation right after, so
the client does not wait for that Redis round trip. The reservation is held (and marked
sent) until then: if the process dies between the answer and the settle, the reaper
charges it in full, as for any call the upstream may have served. Each settle is a task
tracked here; the API's shutdown waits for every one of them (:meth:`drain`) before it
closes Redis, so a clean stop leaves none to the reaper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("budgeter.proxy")


class PendingSettles:
    """The settles started and not yet finished by this process."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, settle: Coroutine[Any, Any, None], *, reservation: str) -> None:
        """Run ``settle`` beside the next requests. A failure is logged (by its type only:
        no request content) and leaves the reservation to the reaper."""
        task = asyncio.ensure_future(settle)
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if finished.cancelled():
                log.warning("settle canceled", extra={"reservation": reservation})
            elif (exc := finished.exception()) is not None:
                log.warning(
                    "settle failed: %s; the reaper charges the reservation in full",
                    type(exc).__name__,
                    extra={"reservation": reservation},
                )

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every settle started (also those started meanwhile) has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
