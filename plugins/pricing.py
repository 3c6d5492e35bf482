"""The `pricing` plugin: what each session costs, in US dollars.

It registers one price function (`register_pricing`): as a session ends, the
runtime asks it for the cost of the session's `Usage` on its model, and the
answer becomes `usage.cost_usd` everywhere the usage goes (the session object,
the terminal event, the stream's usage chunk, the store, the usage ledger, a
budget). Prices are US dollars per million tokens, per model, from a price
table: the packaged `prices.toml` (list prices of common hosted models, 0 for
local ones) or a file of the operator's, with plugins.toml's `prices` over it.

A model is looked up by its exact name, then by the provider's own name for it
(an alias's target), then against the table's patterns in file order; the
answer is remembered per model name. A model found nowhere costs
`default_price`, or nothing is known (`cost_usd` null) and the status panel
names it. A session the response cache answered (`X-Cache: hit`) costs
`cache_hit_fraction` of its price: the upstream never saw it.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import math
import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs

from streamvisor.hooks import ConfigError, ModelNotFound, Session, Usage, hookimpl

__all__ = ["PricingPlugin", "Price", "PriceTable", "Settings", "load_prices"]

#: What the table's prices are per.
TOKENS_PER_PRICE = 1_000_000
#: Model names remembered (their price, or that they have none) at most; past
#: it a name is looked up every time. Only names that resolved reach a price
#: function, so this is more than any server serves.
MAX_REMEMBERED = 4096
#: Unpriced model names the status panel lists at most.
MAX_UNPRICED_SHOWN = 100
#: The keys of a price.
PRICE_KEYS = ("input", "output", "reasoning", "cached")
_GLOB = frozenset("*?[")


def _price_value(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a number >= 0 (US dollars per million tokens), got {value!r}")


@attrs.frozen
class Price:
    """US dollars per million tokens of one model."""

    input: float = attrs.field(validator=_price_value)
    output: float = attrs.field(validator=_price_value)
    #: Reasoning tokens (part of the completion); None: the output price.
    reasoning: float | None = attrs.field(default=None, validator=_price_value)
    #: Prompt tokens served from the provider's prompt cache; None: the input price.
    cached: float | None = attrs.field(default=None, validator=_price_value)

    def cost(self, usage: Usage) -> float:
        """US dollars for `usage`: cached prompt tokens and reasoning tokens at
        their own prices, the rest of the prompt and completion at input and
        output."""
        cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
        reasoning = min(max(usage.reasoning_tokens, 0), usage.completion_tokens)
        cached_price = self.input if self.cached is None else self.cached
        reasoning_price = self.output if self.reasoning is None else self.reasoning
        dollars = (
            (usage.prompt_tokens - cached) * self.input
            + cached * cached_price
            + (usage.completion_tokens - reasoning) * self.output
            + reasoning * reasoning_price
        )
        return dollars / TOKENS_PER_PRICE

    def to_json(self) -> dict[str, float]:
        return {
            "input": self.input,
            "output": self.output,
            "reasoning": self.output if self.reasoning is None else self.reasoning,
            "cached": self.input if self.cached is None else self.cached,
        }


def _fraction(instance: Any, attribute: Any, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be from 0 to 1, got {value!r}")


@attrs.frozen
class Settings:
    #: The price table: the packaged prices.toml when empty; a relative path is
    #: relative to the folder of plugins.toml.
    prices_file: str = ""
    #: Models priced here, over the file: `[plugins.pricing.prices."NAME"]`.
    prices: dict[str, Price] = attrs.field(factory=dict)
    #: What part of its price a session answered by the response cache costs.
    #: 0: the upstream was not called, so nothing was spent.
    cache_hit_fraction: float = attrs.field(default=0.0, validator=_fraction)
    #: The price of a model found nowhere in the table; unset, its cost is null.
    default_price: Price | None = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_prices(text: str, source: str) -> dict[str, Price]:
    """The `prices` table of a price file, in file order. A wrong entry is a
    `ConfigError` naming the file and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", "valid TOML", str(exc)) from None
    unknown = sorted(set(data) - {"prices"})
    if unknown:
        raise ConfigError(source, unknown[0], "only the table [prices]", "an unknown key")
    table = data.get("prices", {})
    if not isinstance(table, dict):
        raise ConfigError(source, "prices", "a table of models", type(table).__name__)
    prices: dict[str, Price] = {}
    for name, entry in table.items():
        key = f'prices."{name}"'
        if not isinstance(entry, dict):
            raise ConfigError(source, key, "a table with input and output", type(entry).__name__)
        for field, value in entry.items():
            if field not in PRICE_KEYS:
                raise ConfigError(source, f"{key}.{field}", f"one of {', '.join(PRICE_KEYS)}", "an unknown key")
            if not _number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(source, f"{key}.{field}", "a number >= 0 (US dollars per million tokens)", repr(value))
        for field in ("input", "output"):
            if field not in entry:
                raise ConfigError(source, f"{key}.{field}", "a number >= 0 (US dollars per million tokens)", "nothing (it is required)")
        prices[name] = Price(**{field: float(value) for field, value in entry.items()})
    return prices


class PriceTable:
    """Exact names, then patterns in order; a pattern is a name with `*`, `?` or `[`."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.exact = {name: price for name, price in prices.items() if _GLOB.isdisjoint(name)}
        self.patterns = [(name, price) for name, price in prices.items() if not _GLOB.isdisjoint(name)]

    def __len__(self) -> int:
        return len(self.exact) + len(self.patterns)

    def find(self, names: tuple[str, ...]) -> Price | None:
        """The price of the first name found exactly, else of the first pattern
        (in order) that one of the names matches."""
        for name in names:
            price = self.exact.get(name)
            if price is not None:
                return price
        for pattern, price in self.patterns:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return price
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


class PricingPlugin:
    Settings = Settings
    streamvisor_contract = "1.2"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = PriceTable({})
        self.source = "the packaged prices.toml"
        self.runtime: Any = None
        #: Model name -> its price, or None when it has none.
        self._known: dict[str, Price | None] = {}
        self.unpriced: dict[str, int] = {}
        self.priced_sessions = 0
        self.unpriced_sessions = 0
        self.cache_hits = 0

    # -- hooks ------------------------------------------------------------------------------

    @hookimpl
    def register_pricing(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        source = runtime.config.source
        if self.settings.prices_file:
            path = self._path(self.settings.prices_file, source)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(source, "plugins.pricing.prices_file", "a readable price file", f"{path}: {exc.strerror or exc}") from None
            self.source = str(path)
        else:
            text = importlib.resources.files(__package__).joinpath("prices.toml").read_text(encoding="utf-8")
        # plugins.toml's own prices come first: they override the file's, and
        # their patterns are tried before the file's.
        prices = {**self.settings.prices, **{k: v for k, v in load_prices(text, self.source).items() if k not in self.settings.prices}}
        self.table = PriceTable(prices)
        register(self.price)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("prices", self.status)

    # -- the price function -----------------------------------------------------------------

    def price(self, model: str, usage: Usage, session: Session | None) -> float | None:
        """What `usage` on `model` costs, in US dollars; None without a price."""
        price = self.lookup(model)
        if price is None:
            if session is not None:
                self.unpriced_sessions += 1
                if model in self.unpriced or len(self.unpriced) < MAX_UNPRICED_SHOWN:
                    self.unpriced[model] = self.unpriced.get(model, 0) + 1
            return None
        cost = price.cost(usage)
        if session is not None:
            self.priced_sessions += 1
            if _header(session.headers, "X-Cache") == "hit":
                self.cache_hits += 1
                cost *= self.settings.cache_hit_fraction
        # Past a trillionth of a dollar the digits are float noise, not money.
        return round(cost, 12)

    def lookup(self, model: str) -> Price | None:
        """The model's price: its exact name, the provider's name for it, then the
        patterns; `default_price` when none has it."""
        if model in self._known:
            return self._known[model]
        try:
            target = None if self.runtime is None else self.runtime.providers.resolve(model).target
            served = True
        except ModelNotFound:
            # An estimate for a name no provider serves (yet): answered, not remembered.
            target, served = None, False
        names = (model, target) if target and target != model else (model,)
        price = self.table.find(names)
        if price is None:
            price = self.settings.default_price
        if served and len(self._known) < MAX_REMEMBERED:
            self._known[model] = price
        return price

    @staticmethod
    def _path(value: str, config_source: str) -> Path:
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        source = Path(config_source)
        base = source.parent if source.suffix == ".toml" else Path.cwd()
        return (base / path).resolve()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        table = self.table
        return {
            "source": self.source,
            "models": len(table.exact),
            "patterns": len(table.patterns),
            "overrides": sorted(self.settings.prices),
            "cache_hit_fraction": self.settings.cache_hit_fraction,
            "default_price": None if self.settings.default_price is None else self.settings.default_price.to_json(),
            "priced_sessions": self.priced_sessions,
            "cache_hit_sessions": self.cache_hits,
            "unpriced_sessions": self.unpriced_sessions,
            "unpriced_models": dict(sorted(self.unpriced.items())),
        }
