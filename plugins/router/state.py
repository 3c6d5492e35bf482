"""What the router learns about each deployment, and how it orders them.

Pure bookkeeping, no I/O and no awaits: every method runs between two awaits of
the session that asks, so a choice and the in-flight count it bumps cannot be
interleaved with another session's choice.

The learned numbers are exponentially weighted moving averages, one sample per
attempt: the time to the first token (a cancelled attempt's wait is a lower
bound, and counts when it is worse than the estimate), the tokens per second
after it, and the error rate. An estimate *decays* with its age: it is read as
a blend of itself and an optimistic prior (the best estimate among the model's
deployments), the blend moving to the prior with `half_life_seconds`. A
deployment that was slow an hour ago therefore looks as good as the best one
again, gets a request, and is measured afresh.
"""

from __future__ import annotations

import collections
import math
import random
import time
from typing import Any, Iterable, Sequence

import attrs

__all__ = ["Learned", "DeploymentState", "order", "Tuning"]

#: Time-to-first-token samples kept per deployment, for `hedge_after = "p90"`.
SAMPLES = 256
#: Scores this close to the best (besides `near_best`) count as equal: a few
#: milliseconds of jitter say nothing about which replica is faster.
NEAR_SECONDS = 0.005
#: A stream this short says little about tokens per second.
TPS_MIN_TOKENS = 8


@attrs.frozen
class Tuning:
    """The plugin-wide knobs of the latency strategy."""

    alpha: float = 0.3
    half_life: float = 300.0
    explore: float = 0.05
    near_best: float = 0.2
    latency_tokens: int = 64
    eject_after: int = 3
    eject_seconds: float = 10.0


@attrs.define(eq=False)
class Learned:
    """One exponentially weighted estimate and when it last had a sample."""

    value: float | None = None
    at: float = 0.0

    def add(self, sample: float, alpha: float, now: float) -> None:
        self.value = sample if self.value is None else self.value + alpha * (sample - self.value)
        self.at = now

    def read(self, prior: float | None, half_life: float, now: float) -> float | None:
        """The estimate, drawn toward `prior` as it ages."""
        if self.value is None or prior is None:
            return self.value
        keep = 0.5 ** (max(0.0, now - self.at) / half_life)
        return prior + (self.value - prior) * keep


@attrs.define(eq=False)
class DeploymentState:
    """A deployment's settings (`spec`) and everything the router knows of it."""

    name: str
    spec: Any
    cost: float | None = None
    in_flight: int = 0
    requests: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    #: Skipped until this `time.monotonic()` (its circuit is open, or it failed
    #: `eject_after` times in a row).
    ejected_until: float = 0.0
    ejected_reason: str = ""
    ttft: Learned = attrs.field(factory=Learned)
    tps: Learned = attrs.field(factory=Learned)
    errors: Learned = attrs.field(factory=Learned)
    ttft_samples: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=SAMPLES))
    hedges_started: int = 0
    hedges_won: int = 0
    hedges_lost: int = 0
    explored: int = 0
    #: Tokens and dollars spent on attempts that lost a hedge.
    lost_prompt_tokens: int = 0
    lost_completion_tokens: int = 0
    lost_cost_usd: float = 0.0

    # -- what happened -------------------------------------------------------------

    def first_token(self, seconds: float, tuning: Tuning, now: float) -> None:
        self.ttft.add(seconds, tuning.alpha, now)
        self.ttft_samples.append(seconds)

    def waited(self, seconds: float, tuning: Tuning, now: float) -> None:
        """An attempt cancelled before its first token after `seconds`: its
        time to first token is at least that, so a worse wait counts."""
        if self.ttft.value is None or seconds > self.ttft.value:
            self.first_token(seconds, tuning, now)

    def finished(self, tokens: int, seconds: float, tuning: Tuning, now: float) -> None:
        self.successes += 1
        self.consecutive_failures = 0
        self.errors.add(0.0, tuning.alpha, now)
        if tokens >= TPS_MIN_TOKENS and seconds > 0.001:
            self.tps.add(tokens / seconds, tuning.alpha, now)

    def answered(self, tuning: Tuning, now: float) -> None:
        """It reached its first token: whatever follows, it is up."""
        self.consecutive_failures = 0

    def failed(self, tuning: Tuning, now: float, eject_for: float | None = None, reason: str = "") -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.errors.add(1.0, tuning.alpha, now)
        if eject_for is None and self.consecutive_failures >= tuning.eject_after:
            eject_for, reason = tuning.eject_seconds, reason or f"{self.consecutive_failures} failures in a row"
        if eject_for:
            self.ejected_until = max(self.ejected_until, now + eject_for)
            self.ejected_reason = reason

    # -- what it looks like ----------------------------------------------------------

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def percentile(self, p: float) -> float | None:
        if not self.ttft_samples:
            return None
        ordered = sorted(self.ttft_samples)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    def score(self, priors: tuple[float | None, float | None], tuning: Tuning, now: float) -> float:
        """Expected seconds to the first token and `latency_tokens` after it,
        divided by the chance of success. 0 for a deployment never measured,
        so that each is tried once."""
        ttft = self.ttft.read(priors[0], tuning.half_life, now)
        if ttft is None:
            return 0.0
        tps = self.tps.read(priors[1], tuning.half_life, now)
        seconds = ttft + (tuning.latency_tokens / tps if tps else 0.0)
        error = self.errors.read(0.0, tuning.half_life, now) or 0.0
        return seconds / max(0.05, 1.0 - error)

    def describe(self, priors: tuple[float | None, float | None], tuning: Tuning, now: float, total: int) -> dict[str, Any]:
        ttft = self.ttft.read(priors[0], tuning.half_life, now)
        tps = self.tps.read(priors[1], tuning.half_life, now)
        p90 = self.percentile(90)
        return {
            "name": self.name,
            "provider": self.spec.provider,
            "model": self.spec.model,
            "weight": self.spec.weight,
            "max_concurrent": self.spec.max_concurrent or None,
            "cost_per_million_tokens": self.cost,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "share": round(self.requests / total, 4) if total else 0.0,
            "successes": self.successes,
            "failures": self.failures,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "ttft_p90_ms": None if p90 is None else round(p90 * 1000, 1),
            "tokens_per_second": None if tps is None else round(tps, 1),
            "error_rate": round(self.errors.read(0.0, tuning.half_life, now) or 0.0, 4),
            "score": round(self.score(priors, tuning, now), 4),
            "ejected_for_seconds": round(max(0.0, self.ejected_until - now), 3),
            "ejected_reason": self.ejected_reason if self.ejected(now) else "",
            "explored": self.explored,
            "hedges": {"started": self.hedges_started, "won": self.hedges_won, "lost": self.hedges_lost},
            "hedge_losses": {
                "prompt_tokens": self.lost_prompt_tokens,
                "completion_tokens": self.lost_completion_tokens,
                "cost_usd": round(self.lost_cost_usd, 8),
            },
        }


def priors(states: Iterable[DeploymentState]) -> tuple[float | None, float | None]:
    """The optimistic priors estimates decay toward: the best time to first
    token and the best tokens per second among the model's deployments."""
    ttfts = [s.ttft.value for s in states if s.ttft.value is not None]
    tpss = [s.tps.value for s in states if s.tps.value is not None]
    return (min(ttfts) if ttfts else None, max(tpss) if tpss else None)


def _weighted_shuffle(states: Sequence[DeploymentState], rng: random.Random) -> list[DeploymentState]:
    """Weighted random order without replacement (Efraimidis-Spirakis keys); a
    weight of 0 goes last."""
    def key(state: DeploymentState) -> float:
        weight = state.spec.weight
        return rng.random() ** (1.0 / weight) if weight > 0 else -rng.random()

    return sorted(states, key=key, reverse=True)


def order(
    strategy: str, states: Sequence[DeploymentState], tuning: Tuning, rng: random.Random, now: float | None = None
) -> tuple[list[DeploymentState], str]:
    """The deployments to try, best first, and how the first was chosen:
    "best", or "explore" (the latency strategy tried another on purpose).
    Ejected deployments go last; the caller skips full ones."""
    now = time.monotonic() if now is None else now
    up = [s for s in states if not s.ejected(now)]
    down = sorted((s for s in states if s.ejected(now)), key=lambda s: s.ejected_until)
    how = "best"
    if strategy == "weighted":
        ranked = _weighted_shuffle(up, rng)
    elif strategy == "least_busy":
        ranked = sorted(up, key=lambda s: (s.in_flight, rng.random()))
    elif strategy == "cost":
        ranked = sorted(up, key=lambda s: (math.inf if s.cost is None else s.cost, rng.random()))
    else:
        ranked, how = _by_latency(up, tuning, rng, now)
    return ranked + down, how


def _by_latency(up: Sequence[DeploymentState], tuning: Tuning, rng: random.Random, now: float) -> tuple[list[DeploymentState], str]:
    if len(up) < 2:
        return list(up), "best"
    prior = priors(up)
    scored = sorted(((s.score(prior, tuning, now), rng.random(), s) for s in up), key=lambda t: (t[0], t[1]))
    ranked = [s for _, _, s in scored]
    best = scored[0][0]
    # Deployments about as good as the best share its traffic, by weight: two
    # equal replicas both serve, rather than whichever measured a hair faster.
    close = [s for score, _, s in scored if score <= best * (1.0 + tuning.near_best) + NEAR_SECONDS]
    if len(close) > 1:
        first = _weighted_shuffle(close, rng)[0]
        ranked.remove(first)
        ranked.insert(0, first)
    if tuning.explore and rng.random() < tuning.explore:
        others = ranked[1:]
        pick = others[rng.randrange(len(others))]
        ranked.remove(pick)
        ranked.insert(0, pick)
        return ranked, "explore"
    return ranked, "best"
