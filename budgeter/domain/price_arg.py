"""The price argument: a model's prices as ``admission/reserve.lua`` takes them (and
records them in the reservation, where ``admission/settle.lua`` reads them back), formatted
(``format_price_arg``) and parsed (``parse_price_arg``) in one place.

Format: numbers separated by one space, US dollars per million tokens::

    <input> <output> <cache_write> <cache_read>
      [ <above> <input> <output> <cache_write> <cache_read>]...   (on the same line)

the base prices, then zero or more long-context tiers in ascending order of ``above``:
a request whose input tokens (input + cache writes + cache reads, as Anthropic counts
them) are more than ``above`` is priced, all of it, at that tier's four prices (the last
tier it is over). ``''`` means the model has no price. The Lua side is
``lib/prices.lua``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

PRICES_PER_TIER = 4  # input, output, cache_write, cache_read
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Rates:
    """US dollars per million tokens of each kind."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    def __post_init__(self) -> None:
        for value in self.values():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"a price must be a finite number >= 0, not {value!r}")

    def values(self) -> tuple[float, float, float, float]:
        return (self.input, self.output, self.cache_write, self.cache_read)


@dataclass(frozen=True, slots=True)
class Tier:
    """The rates of every request whose input tokens are more than ``above``."""

    above: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class PriceArg:
    """A model's base rates and its long-context tiers (ascending ``above``)."""

    base: Rates
    tiers: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        last = 0
        for tier in self.tiers:
            if tier.above <= last:
                raise ValueError("tier thresholds must be integers > 0 in ascending order")
            last = tier.above

    def rates_at(self, input_tokens: int) -> Rates:
        """The rates of a request with ``input_tokens`` input tokens (cache included)."""
        found = self.base
        for tier in self.tiers:
            if input_tokens > tier.above:
                found = tier.rates
        return found


def _number(x: float) -> str:
    """The shortest text that reads back as the same double ('3' for 3.0, '0.3')."""
    text = repr(float(x))
    return text.removesuffix(".0")


def format_price_arg(arg: PriceArg) -> str:
    parts = [_number(x) for x in arg.base.values()]
    for tier in arg.tiers:
        parts.append(str(tier.above))
        parts.extend(_number(x) for x in tier.rates.values())
    return " ".join(parts)


def parse_price_arg(text: str) -> PriceArg:
    """The prices ``text`` gives; ValueError when it is not in the format above."""
    parts = text.split(" ")
    if len(parts) < PRICES_PER_TIER or (len(parts) - PRICES_PER_TIER) % (PRICES_PER_TIER + 1):
        raise ValueError(f"not a price argument: {text!r}")
    try:
        base = _rates(parts[:PRICES_PER_TIER])
        tiers = []
        for i in range(PRICES_PER_TIER, len(parts), PRICES_PER_TIER + 1):
            above = parts[i]
            if not _INTEGER.fullmatch(above):
                raise ValueError(f"a tier threshold must be an integer, not {above!r}")
            tiers.append(Tier(int(above), _rates(parts[i + 1 : i + 1 + PRICES_PER_TIER])))
        return PriceArg(base, tuple(tiers))
    except ValueError as exc:
        raise ValueError(f"not a price argument: {text!r} ({exc})") from None


def _rates(parts: list[str]) -> Rates:
    for x in parts:
        if not _NUMBER.fullmatch(x):
            raise ValueError(f"a price must be a decimal number, not {x!r}")
    return Rates(*(float(x) for x in parts))
