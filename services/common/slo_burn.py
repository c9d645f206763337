"""slo_burn as a pure decision: run counts per window in, page or not out (docs/alerts.md).

Multi-window, multi-burn-rate alerting: a pair (long window, short window, factor) burns when the burn rate —
the window's error ratio divided by the error budget, 1 - objective — exceeds the factor in both windows. The
long window says the budget is really going; the short one says it still is, so the alert resolves soon after
the burning stops. Ratios are compared exactly (as fractions of the decimal settings), so a burn rate of exactly
the factor does not page, however the floats round. Shared by the projector, which judges rules, and the API,
which checks a rule's parameters when it is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any


@dataclass(frozen=True, slots=True)
class Pair:
    long_minutes: float
    short_minutes: float
    factor: float

    @property
    def label(self) -> str:
        return f"{_span(self.long_minutes)}/{_span(self.short_minutes)} > {self.factor:g}x"


@dataclass(frozen=True, slots=True)
class Counts:
    """Finished runs of the objective's scope in one window, and how many of them failed."""

    failed: int
    total: int


@dataclass(frozen=True, slots=True)
class Decision:
    burning: bool
    pair: Pair | None  # the first pair that burns
    rates: dict[float, float]  # window minutes → burn rate


# The defaults of the SRE workbook's "multiwindow, multi-burn-rate alerts" for a 30-day objective: 2 % of the
# budget spent in an hour, or 5 % in six hours.
# An slo_burn rule with this flow_id watches every flow of its tenant (and environment) at once.
TENANT_WIDE = "*"
FAST = Pair(60, 5, 14.4)
SLOW = Pair(360, 30, 6.0)
PARAMS = ("objective", "period_days", "fast_long_minutes", "fast_short_minutes", "fast_factor",
          "slow_long_minutes", "slow_short_minutes", "slow_factor")  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "period_days": 30, "fast_long_minutes": FAST.long_minutes, "fast_short_minutes": FAST.short_minutes,
    "fast_factor": FAST.factor, "slow_long_minutes": SLOW.long_minutes, "slow_short_minutes": SLOW.short_minutes,
    "slow_factor": SLOW.factor,
}  # fmt: skip


def pairs(params: Mapping[str, Any]) -> tuple[Pair, Pair]:
    p = {**DEFAULTS, **params}
    return (Pair(p["fast_long_minutes"], p["fast_short_minutes"], p["fast_factor"]),
            Pair(p["slow_long_minutes"], p["slow_short_minutes"], p["slow_factor"]))  # fmt: skip


def windows(params: Mapping[str, Any]) -> list[float]:
    """Every window the rule needs counted, each once, in ascending order."""
    return sorted({m for pair in pairs(params) for m in (pair.long_minutes, pair.short_minutes)})


def _exact(value: float) -> Fraction:
    return Fraction(repr(value))  # the decimal that was written: 0.99 is 99/100, not the nearest binary float


def burn_rate(counts: Counts, objective: float) -> float:
    """Error ratio / error budget; 0 for a window with no finished run (nothing burnt)."""
    if counts.total == 0:
        return 0.0
    return float(Fraction(counts.failed, counts.total) / (1 - _exact(objective)))


def _exceeds(counts: Counts, objective: float, factor: float) -> bool:
    if counts.total == 0:
        return False
    return Fraction(counts.failed, counts.total) > _exact(factor) * (1 - _exact(objective))


def decide(objective: float, params: Mapping[str, Any], counts: Mapping[float, Counts]) -> Decision:
    """Burning when, for some pair, both its long and short window burn faster than its factor."""
    if not 0 < objective < 1:
        raise ValueError(f"objective must be between 0 and 1, not {objective}")
    rates = {m: burn_rate(counts[m], objective) for m in windows(params)}
    for pair in pairs(params):
        if _exceeds(counts[pair.long_minutes], objective, pair.factor) and _exceeds(
            counts[pair.short_minutes], objective, pair.factor
        ):
            return Decision(True, pair, rates)
    return Decision(False, None, rates)


def _span(minutes: float) -> str:
    return f"{minutes / 60:g}h" if minutes >= 60 and minutes % 60 == 0 else f"{minutes:g}m"
