"""Statistics every evaluation shares: the bootstrap interval of a mean (autointerp, sparse
probing, absorption, steering and probing log it beside their headline metrics). The analysis's
own statistics (τ_b, its intervals, Ψ) live in analysis/stats.py."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats


def bootstrap_interval(
    values: Sequence[float], seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """A BCa bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``); the
    percentile interval where BCa is undefined, (v, v) for constant values, NaN for < 2."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(data) < 2:
        return math.nan, math.nan
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns and returns NaN on degenerate resamples
            result = stats.bootstrap(
                (data,),
                np.mean,
                confidence_level=confidence,
                n_resamples=9999,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(low), float(high)
    return math.nan, math.nan
