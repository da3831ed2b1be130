"""The price table for ``usd_budgets``: US dollars per million tokens of each model.

Prices come from the ``genai-prices`` package's bundled data (Anthropic's models: dated
ids, cache write and read prices, long-context tiers), read offline: budgeter never asks it
to fetch updates. ``BUDGETER_PRICES`` overrides or adds models (:class:`PriceTable`).

A reservation is priced before the call at the dearest the request can turn out, in the
tier its input falls in: ``input * max(input, cache_write) + max_tokens * output``; it
settles at the real usage, ``input * input + output * output + cache_creation *
cache_write + cache_read * cache_read``, at the tier of the real input (input + cache
creation + cache read), all per million tokens (``lib/prices.lua``).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, field_validator

from budgeter.domain.price_arg import PriceArg, Rates, Tier, format_price_arg

if TYPE_CHECKING:
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import ModelPrice as GenaiPrice
    from genai_prices.types import TieredPrices

GENAI_PRICES_VERSION = version("genai-prices")
PROVIDER = "anthropic"  # the provider of genai-prices' data whose models budgeter prices


class _Rates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: NonNegativeFloat
    output: NonNegativeFloat
    cache_write: NonNegativeFloat | None = Field(
        default=None, description="Default: 1.25 * input (5-minute cache writes)."
    )
    cache_read: NonNegativeFloat | None = Field(default=None, description="Default: 0.1 * input.")

    def rates(self) -> Rates:
        write = self.cache_write if self.cache_write is not None else _derived(self.input * 1.25)
        read = self.cache_read if self.cache_read is not None else _derived(self.input * 0.1)
        return Rates(self.input, self.output, write, read)


def _derived(x: float) -> float:
    """A default price to 12 significant digits (0.3, not 0.30000000000000004)."""
    return float(f"{x:.12g}")


class PriceTier(_Rates):
    """The prices of a request whose input tokens (input + cache writes + cache reads) are
    more than ``above``: all its tokens, not only those past the threshold."""

    above: PositiveInt


class ModelPrice(_Rates):
    """US dollars per million tokens, with optional long-context tiers."""

    tiers: list[PriceTier] = Field(default_factory=list)

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, value: list[PriceTier]) -> list[PriceTier]:
        value = sorted(value, key=lambda t: t.above)
        if len({t.above for t in value}) != len(value):
            raise ValueError("two tiers with the same 'above'")
        return value

    def price_arg(self) -> PriceArg:
        return PriceArg(self.rates(), tuple(Tier(t.above, t.rates()) for t in self.tiers))

    def lua_arg(self) -> str:
        """The price argument admission/reserve.lua reads (``budgeter.domain.price_arg``)."""
        return format_price_arg(self.price_arg())


def _named(table: Mapping[str, ModelPrice], model: str) -> ModelPrice | None:
    """An exact entry, else the longest entry (not '*') that prefixes ``model``."""
    found = table.get(model)
    if found is not None:
        return found
    best = max(
        (name for name in table if name != "*" and model.startswith(name)), key=len, default=None
    )
    return None if best is None else table[best]


def price_of(table: Mapping[str, ModelPrice], model: str) -> ModelPrice | None:
    """The model's price: an exact entry, else the longest entry that prefixes it (so
    ``claude-sonnet-4-5`` prices ``claude-sonnet-4-5-20250929``), else ``*``, else None."""
    found = _named(table, model)
    return found if found is not None else table.get("*")


@functools.cache
def _snapshot() -> DataSnapshot:
    """genai-prices' bundled data, in a snapshot of our own: never its auto-updated one
    (``UpdatePrices``, which fetches over the network), whatever else in the process does."""
    from genai_prices import data
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=data.providers, from_auto_update=False)


def _at(value: Decimal | TieredPrices | None, input_tokens: int) -> float | None:
    """One price of genai-prices at a request of more than ``input_tokens`` input tokens."""
    if value is None or isinstance(value, Decimal):
        return None if value is None else float(value)
    price = value.base
    for tier in value.tiers:
        if input_tokens >= tier.start:
            price = tier.price
    return float(price)


def _thresholds(prices: GenaiPrice) -> list[int]:
    from genai_prices.types import TieredPrices

    found: set[int] = set()
    for value in (
        prices.input_mtok,
        prices.output_mtok,
        prices.cache_write_mtok,
        prices.cache_read_mtok,
    ):
        if isinstance(value, TieredPrices):
            found.update(t.start for t in value.tiers if t.start > 0)
    return sorted(found)


def _rates_of(prices: GenaiPrice, input_tokens: int) -> _Rates | None:
    got = _at(prices.input_mtok, input_tokens), _at(prices.output_mtok, input_tokens)
    if got[0] is None or got[1] is None:
        return None
    write = _at(prices.cache_write_mtok, input_tokens)
    read = _at(prices.cache_read_mtok, input_tokens)
    return _Rates(input=got[0], output=got[1], cache_write=write, cache_read=read)


def model_price_of(prices: GenaiPrice) -> ModelPrice | None:
    """genai-prices' prices of a model as a :class:`ModelPrice` (its tiers merged: each
    threshold of any price is a tier of all four); None without input and output prices."""
    base = _rates_of(prices, 0)
    if base is None:
        return None
    tiers = []
    for above in _thresholds(prices):
        rates = _rates_of(prices, above)
        if rates is not None:
            tiers.append(PriceTier(above=above, **rates.model_dump()))
    return ModelPrice(**base.model_dump(), tiers=tiers)


@functools.lru_cache(maxsize=1024)
def bundled_price(model: str, day: dt.date) -> ModelPrice | None:
    """The price genai-prices gives ``model`` (an Anthropic model id, dated or not) on
    ``day`` (UTC), or None when its data does not know the model."""
    try:
        _, info = _snapshot().find_provider_model(model, None, PROVIDER, None)
    except LookupError:
        return None
    when = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
    return model_price_of(info.get_prices(when))


def bundled_models() -> list[str]:
    """The ids of the Anthropic models genai-prices prices."""
    provider = _snapshot().find_provider(None, PROVIDER, None)
    return [m.id for m in provider.models]


class PriceTable:
    """Where a model's price comes from: ``overrides`` (``BUDGETER_PRICES``) by exact name
    or longest prefix, else genai-prices' bundled data (when ``bundled``), else the
    overrides' ``"*"``, else none (a usd budget then refuses the model)."""

    def __init__(
        self, overrides: Mapping[str, ModelPrice] | None = None, *, bundled: bool = True
    ) -> None:
        self.overrides = dict(overrides or {})
        self.bundled = bundled

    def price(self, model: str, day: dt.date | None = None) -> ModelPrice | None:
        """``model``'s price on ``day`` (UTC; default today)."""
        found = _named(self.overrides, model)
        if found is None and self.bundled:
            found = bundled_price(model, day or dt.datetime.now(dt.UTC).date())
        return found if found is not None else self.overrides.get("*")

    def models(self) -> list[str]:
        """The models priced by name: the overrides' (not '*') and genai-prices' ids."""
        named = [m for m in self.overrides if m != "*"]
        return sorted({*named, *(bundled_models() if self.bundled else [])})
