"""The event loop every budgeter command runs on: uvloop where it is installed, else
asyncio's own (``BUDGETER_EVENT_LOOP``: ``auto``, ``uvloop`` or ``asyncio``)."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Coroutine
from typing import TypeVar

from budgeter.settings import SettingsError

T = TypeVar("T")
log = logging.getLogger("budgeter.loop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> tuple[LoopFactory | None, str]:
    """The loop factory for ``choice`` (None: asyncio's default) and a name for the log:
    ``uvloop 0.23.0``, ``asyncio`` or ``asyncio (uvloop is not installed)``."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "BUDGETER_EVENT_LOOP: uvloop is not installed (pip install uvloop, "
                "or BUDGETER_EVENT_LOOP=asyncio)"
            ) from None
        return None, "asyncio (uvloop is not installed)"
    factory: LoopFactory = uvloop.new_event_loop
    return factory, f"uvloop {getattr(uvloop, '__version__', '?')}"


def run(main: Coroutine[object, object, T], choice: str, *, process: bool) -> T:
    """``asyncio.run(main)`` on the chosen loop; the loop is logged at start (INFO for a
    long-running process, DEBUG for the other commands)."""
    try:
        factory, name = loop_factory(choice)
    except BaseException:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    log.log(logging.INFO if process else logging.DEBUG, "event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
