"""Model prices: what the tokens of one model response cost, from a table the operator may override."""
from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Mapping

MILLION = Decimal(1_000_000)
MICRO_DOLLAR = Decimal("0.000001")  # what a cost column holds (Numeric(14, 6))
DEFAULT_KEY = "default"
# The token counts a response's `usage` reports, each with the price field that applies to it.
PRICED_TOKENS = {"input_tokens": "input", "output_tokens": "output", "cache_creation_input_tokens": "cache_write",
                 "cache_read_input_tokens": "cache_read"}


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens. A 1-hour cache write costs twice the input price (a 5-minute one,
    `cache_write`, 1.25 times) unless the table says otherwise."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal
    cache_write_1h: Decimal | None = None

    def of(self, usage: Mapping[str, int]) -> Decimal:
        """The cost of these token counts, rounded up to the micro-dollar (a sum of many small answers
        is never rounded down to nothing)."""
        long_writes = min(usage.get("cache_write_1h_tokens", 0), usage.get("cache_creation_input_tokens", 0))
        total = sum((Decimal(usage.get(name, 0)) * getattr(self, field) for name, field in PRICED_TOKENS.items()),
                    Decimal(0))
        long_price = self.cache_write_1h if self.cache_write_1h is not None else self.input * 2
        total += Decimal(long_writes) * (long_price - self.cache_write)
        return (total / MILLION).quantize(MICRO_DOLLAR, rounding=ROUND_CEILING)


def _price(input: str, output: str, cache_write: str, cache_read: str) -> Price:
    return Price(Decimal(input), Decimal(output), Decimal(cache_write), Decimal(cache_read))


# Anthropic's list prices (per million tokens) as of 2026-12; keys are model-id prefixes, the longest match wins.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-5": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4": _price("15", "75", "18.75", "1.50"),  # Opus 4 and 4.1
    "claude-3-opus": _price("15", "75", "18.75", "1.50"),
    "claude-sonnet-4": _price("3", "15", "3.75", "0.30"),  # Sonnet 4 and 4.5
    "claude-3-7-sonnet": _price("3", "15", "3.75", "0.30"),
    "claude-3-5-sonnet": _price("3", "15", "3.75", "0.30"),
    "claude-haiku-4-5": _price("1", "5", "1.25", "0.10"),
    "claude-3-5-haiku": _price("0.80", "4", "1", "0.08"),
    "claude-3-haiku": _price("0.25", "1.25", "0.30", "0.03"),
    # Any other model (a new one, an alias, a name the upstream did not send) costs what the dearest one does.
    DEFAULT_KEY: _price("15", "75", "18.75", "1.50"),
}
FIELDS = ("input", "output", "cache_write", "cache_read")


class PriceTable:
    """Finds a model's price by the longest matching prefix of its id; unknown models get the default."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        if DEFAULT_KEY not in prices:
            raise ValueError(f'the price table needs a "{DEFAULT_KEY}" entry for unknown models')
        self.prices = dict(prices)
        self._prefixes = sorted((k for k in prices if k != DEFAULT_KEY), key=len, reverse=True)

    def price(self, model: str | None) -> Price:
        for prefix in self._prefixes:
            if model and model.startswith(prefix):
                return self.prices[prefix]
        return self.prices[DEFAULT_KEY]

    def cost(self, model: str | None, usage: Mapping[str, int]) -> Decimal:
        return self.price(model).of(usage)

    @classmethod
    def parse(cls, text: str) -> "PriceTable":
        """The default table with the overrides in `text` on top: a JSON object of model-id prefix (or
        "default") to {"input", "output", "cache_write", "cache_read"[, "cache_write_1h"]}, dollars per
        million tokens. Raises ValueError, saying what is wrong."""
        prices = dict(DEFAULT_PRICES)
        if not text.strip():
            return cls(prices)
        try:
            overrides = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(overrides, dict):
            raise ValueError("must be a JSON object of model-id prefix to prices")
        for model, entry in overrides.items():
            if not isinstance(entry, dict) or not set(FIELDS) <= entry.keys() <= {*FIELDS, "cache_write_1h"}:
                raise ValueError(f"{model!r} must have exactly {', '.join(FIELDS)} (and optionally cache_write_1h)")
            values = {name: _dollars(model, name, value) for name, value in entry.items()}
            prices[model] = Price(**values)
        return cls(prices)


def _dollars(model: str, name: str, value) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{model!r} {name} must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{model!r} {name} must be a number, got {value!r}") from None
    if not amount.is_finite() or not 0 <= amount <= 1_000_000:
        raise ValueError(f"{model!r} {name} must be between 0 and 1000000 dollars per million tokens")
    return amount
