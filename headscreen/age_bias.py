"""A scanner's brain-age bias: the median gap (predicted - true age) of healthy heads, with
its 95 % bootstrap interval.

A site's scanner shifts a model's predicted brain age as a whole (its contrast moves the
features the age head reads). Two places correct for it with this one estimate: a
bundle's age output (`headscreen train --refit-age --dataset`, model_training.age_refit)
and a scanner's site reference (`headscreen calibrate`, daemon.reference). The median,
so that one mistyped age cannot move it; the interval, so that noise is not corrected:
a bias is taken only where its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["AgeBias", "age_bias", "excludes_zero"]

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class AgeBias:
    offset_years: float  # median gap: what a correction subtracts from each predicted age
    ci95: tuple[float, float]  # percentile bootstrap interval of the median (NaN with fewer than 2 heads)
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval tells the bias from no bias (False where it is NaN)."""
        return excludes_zero(self.ci95)


def excludes_zero(interval: tuple[float, float]) -> bool:
    """Whether an interval lies wholly on one side of 0 (False where it is NaN)."""
    low, high = interval
    return low > 0 or high < 0


def age_bias(gaps: Sequence[float] | np.ndarray) -> AgeBias:
    """The median of `gaps` (predicted - true, years) and its bootstrap interval (scipy's,
    percentile method, 2,000 resamples, seeded so one set of heads always gives one answer)."""
    values = np.asarray(gaps, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("gaps: must be finite and not empty")
    interval = (math.nan, math.nan)
    if values.size >= 2:
        ci = stats.bootstrap((values,), np.median, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                             method="percentile", random_state=np.random.default_rng(0)).confidence_interval
        interval = (float(ci.low), float(ci.high))
    return AgeBias(offset_years=float(np.median(values)), ci95=interval, n=int(values.size))
