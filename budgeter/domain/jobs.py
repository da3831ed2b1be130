"""What every part of budgeter agrees on about a job's life: its terminal states and the
bounds of its deadline."""

from __future__ import annotations

from typing import Literal

TerminalState = Literal["succeeded", "errored", "canceled", "expired"]
TERMINAL_STATES: tuple[TerminalState, ...] = ("succeeded", "errored", "canceled", "expired")
"""Every submitted job ends in exactly one of these (queue/ack.lua writes them)."""

DEFAULT_TTL_MS = 24 * 3600 * 1000
"""A batch's deadline when the producer names none: 24 hours after it was submitted."""
MAX_DEADLINE_S = 7 * 86_400
"""The longest deadline a producer may ask for (``budgeter-deadline-seconds``, the CLI's
``--deadline-seconds``): 7 days."""
