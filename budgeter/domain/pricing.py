"""The price table: US dollars per million tokens of each model, for ``usd_budgets``.

A reservation is priced before the call as ``input * max(input, cache_write) + max_tokens *
output`` (the dearest the request can turn out), and settled at the real usage:
``input * input + output * output + cache_creation * cache_write + cache_read *
cache_read``, all per million tokens.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat


class ModelPrice(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: NonNegativeFloat
    output: NonNegativeFloat
    cache_write: NonNegativeFloat | None = Field(
        default=None, description="Default: 1.25 * input (5-minute cache writes)."
    )
    cache_read: NonNegativeFloat | None = Field(default=None, description="Default: 0.1 * input.")

    def lua_arg(self) -> str:
        """'input output cache_write cache_read' as admission/reserve.lua reads it."""
        write = self.cache_write if self.cache_write is not None else self.input * 1.25
        read = self.cache_read if self.cache_read is not None else self.input * 0.1
        return " ".join(f"{x:.12g}" for x in (self.input, self.output, write, read))


# Anthropic's list prices (USD per million tokens); override or extend with BUDGETER_PRICES.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    name: ModelPrice(input=i, output=o)
    for name, i, o in [
        ("claude-opus-4-5", 5.0, 25.0),
        ("claude-opus-4-1", 15.0, 75.0),
        ("claude-opus-4-0", 15.0, 75.0),
        ("claude-sonnet-4-5", 3.0, 15.0),
        ("claude-sonnet-4-0", 3.0, 15.0),
        ("claude-haiku-4-5", 1.0, 5.0),
        ("claude-3-5-haiku-latest", 0.8, 4.0),
    ]
}


def price_of(table: dict[str, ModelPrice], model: str) -> ModelPrice | None:
    """The model's price: an exact entry, else the longest entry that prefixes it (so
    ``claude-sonnet-4-5`` prices ``claude-sonnet-4-5-20250929``), else ``*``, else None."""
    found = table.get(model)
    if found is not None:
        return found
    best = max(
        (name for name in table if name != "*" and model.startswith(name)), key=len, default=None
    )
    if best is not None:
        return table[best]
    return table.get("*")
