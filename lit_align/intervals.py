"""Point estimates with 95 % intervals, shared by ``lit-align evaluate`` and the frontier report: the Student-t interval
of a mean, the Wilson score interval of a proportion, and the percentile bootstrap of any statistic."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval, standard error (NaN where it does not apply) and sample count."""

    value: float
    low: float
    high: float
    n: int
    se: float = math.nan

    def columns(self, name: str) -> dict[str, float | int]:
        row: dict[str, float | int] = {name: self.value, f"{name}_low": self.low, f"{name}_high": self.high}
        if not math.isnan(self.se):
            row[f"{name}_se"] = self.se
        row[f"{name}_n"] = self.n
        return row


def t_quantile(probability: float, df: int) -> float:
    """The Student-t quantile (scipy's ``t.ppf``)."""
    from scipy.stats import t

    return float(t.ppf(probability, df))


def mean_interval(values: Sequence[float]) -> Estimate:
    """Mean, standard error s/√n and the Student-t interval mean ± t_{0.975, n−1}·s/√n; NaN bounds for n < 2."""
    data = torch.as_tensor(list(values), dtype=torch.float64)
    n = data.numel()
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    se = float(data.std(correction=1)) / math.sqrt(n)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * se
    return Estimate(mean, mean - half, mean + half, n, se)


def wilson_interval(successes: float, n: int) -> Estimate:
    """A proportion with the Wilson score interval (Wilson 1927): centre (p̂ + z²/2n)/(1 + z²/n), half-width
    z·√(p̂(1−p̂)/n + z²/4n²)/(1 + z²/n), z the normal 0.975 quantile."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + CONFIDENCE / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Estimate(p, centre - half, centre + half, n)


def bootstrap_interval(
    statistic: Callable[[list[int]], float], n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Estimate:
    """``statistic`` of all ``n`` items and its percentile bootstrap interval: ``statistic(indices)`` recomputed on
    ``resamples`` resamples of the indices with replacement (seeded), the 2.5 % and 97.5 % quantiles."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    value = statistic(list(range(n)))
    generator = random.Random(seed)
    replicates = sorted(statistic([generator.randrange(n) for _ in range(n)]) for _ in range(resamples))
    tail = (1 - CONFIDENCE) / 2
    low = replicates[int(math.floor(tail * (resamples - 1)))]
    high = replicates[int(math.ceil((1 - tail) * (resamples - 1)))]
    return Estimate(value, low, high, n)
