"""project/statistics.py: the bootstrap interval every evaluation logs."""

from __future__ import annotations

import math

import numpy as np

from project.statistics import bootstrap_interval


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0.5, 1.0, size=100)
    low, high = bootstrap_interval(values.tolist(), seed=1)
    assert low < values.mean() < high
    assert 0.02 < high - low < 0.1  # ≈ ±1.96 · 0.144 / √100
    assert bootstrap_interval(values.tolist(), seed=1) == (low, high)  # seeded
    assert bootstrap_interval([0.7] * 5, seed=1) == (0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_interval([0.7], seed=1))
    wide_low, wide_high = bootstrap_interval(values[:10].tolist(), seed=1)
    assert wide_high - wide_low > high - low
