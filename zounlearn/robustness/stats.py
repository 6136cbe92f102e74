"""The study's statistics: a mean with its 95% interval over seeds, a paired comparison, and the
verdict rule.

- `interval`: mean ± t(0.975, n - 1) s / sqrt(n), Student's t (scipy), s the sample standard
  deviation; one value has no interval (its bounds are NaN).
- `paired`: the same over the per-seed differences a_s - b_s of two arms run with the same
  seeds (same batches, directions and attacked examples), so that what the seeds share cancels.
- `verdict`: a claim that a difference is negative (or positive) "agrees" when the whole
  interval lies on its side of zero, "disagrees" when it lies on the other side, and is
  "not resolved at this size" when the interval contains zero or rests on fewer than
  MIN_PAIRS = 3 pairs (two equal differences of a discrete accuracy give a zero-width interval).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

NOT_RESOLVED = "not resolved at this size"
MIN_PAIRS = 3


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.mean:+.2f}"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean and its t-interval; NaN values are left out."""
    values = [float(v) for v in values if not math.isnan(v)]
    if not values:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    from scipy.stats import t

    half = t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The interval of the mean difference a - b over pairs (seeds); pairs with a NaN are left out."""
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs one value of each arm per seed, got {len(a)} and {len(b)}")
    return interval([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], level)


def verdict(difference: Interval, *, claim_negative: bool) -> str:
    """agrees / disagrees / not resolved at this size (module docstring)."""
    if difference.n < MIN_PAIRS or math.isnan(difference.low) or not difference.excludes_zero():
        return NOT_RESOLVED
    return "agrees" if (difference.high < 0) == claim_negative else "disagrees"
