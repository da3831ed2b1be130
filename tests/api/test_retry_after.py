"""``retry-after`` of a DEFER (budgeter/api/proxy.py ``retry_after_s``): whole seconds
rounded up, so a client never comes back before the moment it may be admitted; at least
1 and at most 60 (the SDKs ignore larger values)."""

from __future__ import annotations

import pytest

from budgeter.api.proxy import retry_after_s

NOW = 1_764_201_600_000


@pytest.mark.parametrize(
    ("wait_ms", "seconds"),
    [
        (0, 1),
        (1, 1),
        (999, 1),
        (1000, 1),
        (1001, 2),
        (2000, 2),
        (2001, 3),
        (59_001, 60),
        (60_000, 60),
        (3_600_000, 60),
        (-5000, 1),
    ],
)
def test_a_wait_is_whole_seconds_rounded_up_within_1_to_60(wait_ms: int, seconds: int) -> None:
    assert retry_after_s(NOW + wait_ms, NOW) == seconds
