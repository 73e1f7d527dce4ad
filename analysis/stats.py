"""Rank statistics of the study: Kendall τ_b, its intervals and p-values, and the Ψ decomposition.

METHODS §6. Everything here is a pure function of arrays (or of the joined table), so the
analysis entry point, the tests and a user's notebook compute the same numbers.

- ``kendall_tau_b``: ``scipy.stats.kendalltau`` (variant b, which corrects for ties).
- ``bca_interval``: a BCa bootstrap interval of τ_b over SAEs (``scipy.stats.bootstrap``,
  paired resampling of (µ, g)).
- ``group_tau``: τ_b inside one group with n, the number of pairs, a permutation p-value
  (``scipy.stats.permutation_test`` over pairings, two-sided) and a percentile bootstrap
  interval. (The paper's Table 1 reports a permutation p-value and interval per group; with
  groups of 5-6 SAEs a BCa interval is degenerate, so groups get percentile intervals.)
- ``psi``: Ψ_A (mean τ_b within each (LM, architecture): sparsity varies), Ψ_B (within each
  (LM, matched sparsity rank): architecture varies), Ψ_C (within each LM: all its SAEs), and
  Ψ = their mean. Each with the standard error of the mean over its groups and a bootstrap
  interval from resampling SAEs within groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
AXES = ("A", "B", "C")
# What each Ψ axis groups by (the columns of the joined table) and what varies inside a group.
AXIS_GROUPS: dict[str, tuple[str, ...]] = {
    "A": ("lm_name", "architecture"),  # sparsity varies
    "B": ("lm_name", "sparsity_rank"),  # architecture varies
    "C": ("lm_name",),  # everything of one LM varies
}
AXIS_MEANING = {
    "A": "within architecture (sparsity varies)",
    "B": "within matched sparsity rank (architecture varies)",
    "C": "within LM (all its SAEs)",
}


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b of two equally long sequences; NaN when either is constant."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.shape != y_arr.shape:
        raise ValueError(f"x and y differ in length: {x_arr.shape} vs {y_arr.shape}")
    if len(x_arr) < 2 or np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        return math.nan
    return float(stats.kendalltau(x_arr, y_arr, variant="b").statistic)


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


_NO_INTERVAL = Interval(math.nan, math.nan, "none")


# Up to this many SAEs, τ_b of many resamples at once is computed from pair signs in numpy
# (O(n²) memory per resample, but no Python loop); beyond it, scipy per resample (O(n log n)).
_PAIRWISE_MAX_N = 64


def tau_b_batch(x_RN: np.ndarray, y_RN: np.ndarray) -> np.ndarray:
    """τ_b of each row pair (x_RN[r], y_RN[r]); NaN where a row is constant.

    τ_b = Σ_{i<j} sign(Δx)·sign(Δy) / sqrt(Σ sign(Δx)² · Σ sign(Δy)²), which is scipy's variant
    b (the denominators are the untied pairs of each variable)."""
    x_RN, y_RN = np.atleast_2d(np.asarray(x_RN, float)), np.atleast_2d(np.asarray(y_RN, float))
    n = x_RN.shape[-1]
    if n > _PAIRWISE_MAX_N:
        return np.array([kendall_tau_b(a, b) for a, b in zip(x_RN, y_RN, strict=True)])
    i, j = np.triu_indices(n, k=1)
    sx_RP, sy_RP = np.sign(x_RN[:, i] - x_RN[:, j]), np.sign(y_RN[:, i] - y_RN[:, j])
    denominator = np.sqrt((sx_RP**2).sum(-1) * (sy_RP**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (sx_RP * sy_RP).sum(-1) / denominator, np.nan)


def _tau_statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """τ_b along ``axis`` for scipy's vectorised bootstrap (NaN for constant resamples)."""
    x2, y2 = np.moveaxis(np.atleast_2d(x), axis, -1), np.moveaxis(np.atleast_2d(y), axis, -1)
    out = tau_b_batch(x2.reshape(-1, x2.shape[-1]), y2.reshape(-1, y2.shape[-1]))
    return out.reshape(x2.shape[:-1]) if x.ndim > 1 else out[0]


def bca_interval(
    x: Sequence[float],
    y: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    method: str = "BCa",
) -> Interval:
    """Bootstrap interval of τ_b(x, y), resampling (x_i, y_i) pairs; NaNs if undefined."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x_arr) < 3 or math.isnan(kendall_tau_b(x_arr, y_arr)):
        return _NO_INTERVAL
    result = stats.bootstrap(
        (x_arr, y_arr),
        _tau_statistic,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=method,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return Interval(float(low), float(high), method)


def permutation_p_value(
    x: Sequence[float], y: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> float:
    """Two-sided permutation p-value of τ_b (y shuffled against x; exact for small n)."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x_arr) < 3 or math.isnan(kendall_tau_b(x_arr, y_arr)):
        return math.nan
    # One sample permuted against fixed x: n! distinct pairings, enumerated exactly when that
    # is no more than n_resamples.
    result = stats.permutation_test(
        (y_arr,),
        lambda b, axis=-1: _tau_statistic(np.broadcast_to(x_arr, b.shape), b, axis),
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


@dataclass(frozen=True)
class GroupTau:
    """τ_b inside one group of SAEs, with what a reader needs to weigh it."""

    axis: str
    group: str
    n: int
    pairs: int
    tau_b: float
    p_value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def group_tau(
    axis: str,
    group: str,
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> GroupTau:
    n = len(x)
    interval = bca_interval(x, y, n_resamples=n_resamples, seed=seed, method="percentile")
    return GroupTau(
        axis=axis,
        group=group,
        n=n,
        pairs=n * (n - 1) // 2,
        tau_b=kendall_tau_b(x, y),
        p_value=permutation_p_value(x, y, n_resamples=n_resamples, seed=seed),
        ci_low=interval.low,
        ci_high=interval.high,
    )


def add_sparsity_rank(table: pd.DataFrame, sparsity_column: str = "l0") -> pd.DataFrame:
    """Column ``sparsity_rank``: the rank (0 = sparsest) of each SAE's sparsity among the SAEs of
    its (LM, architecture), so that rank r matches the r-th sparsity level of every
    architecture (the paper's matched sparsity)."""
    out = table.copy()
    out["sparsity_rank"] = (
        out.groupby(["lm_name", "architecture"])[sparsity_column]
        .rank(method="first")
        .astype(int)
        .sub(1)
    )
    return out


def groups_of(table: pd.DataFrame, axis: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) of every group of ``axis`` in a stable order."""
    keys = list(AXIS_GROUPS[axis])
    out = []
    for key, rows in table.groupby(keys, sort=True):
        values = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), rows))
    return out


def _axis_taus(table: pd.DataFrame, axis: str, x: str, y: str) -> list[float]:
    """τ_b of every group of ``axis`` with at least 2 SAEs and a defined τ."""
    taus = []
    for _, rows in groups_of(table, axis):
        if len(rows) >= 2:
            tau = kendall_tau_b(rows[x].to_numpy(), rows[y].to_numpy())
            if not math.isnan(tau):
                taus.append(tau)
    return taus


def psi_point(table: pd.DataFrame, x: str, y: str) -> dict[str, float]:
    """Ψ_A, Ψ_B, Ψ_C (means of within-group τ_b) and Ψ (their mean, over defined axes)."""
    out = {}
    for axis in AXES:
        taus = _axis_taus(table, axis, x, y)
        out[f"psi_{axis}"] = float(np.mean(taus)) if taus else math.nan
    defined = [out[f"psi_{a}"] for a in AXES if not math.isnan(out[f"psi_{a}"])]
    out["psi"] = float(np.mean(defined)) if defined else math.nan
    return out


def _group_codes(table: pd.DataFrame, axis: str) -> np.ndarray:
    """The group number of each row for ``axis`` (rows in table order)."""
    return table.groupby(list(AXIS_GROUPS[axis]), sort=True).ngroup().to_numpy()


def _psi_of_sample(
    idx: np.ndarray, codes: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """psi_point of the rows ``idx`` (a bootstrap sample, repeats allowed), without pandas."""
    out = {}
    for axis, code in codes.items():
        sample_codes = code[idx]
        taus = []
        for group in np.unique(sample_codes):
            members = idx[sample_codes == group]
            if len(members) >= 2:
                tau = tau_b_batch(x[members][None], y[members][None])[0]
                if not math.isnan(tau):
                    taus.append(tau)
        out[f"psi_{axis}"] = float(np.mean(taus)) if taus else math.nan
    defined = [out[f"psi_{a}"] for a in AXES if not math.isnan(out[f"psi_{a}"])]
    out["psi"] = float(np.mean(defined)) if defined else math.nan
    return out


def psi_with_uncertainty(
    table: pd.DataFrame,
    x: str,
    y: str,
    *,
    n_resamples: int = 500,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Each Ψ with ``value``, ``se`` (standard error of the mean over its groups; for Ψ the
    bootstrap standard deviation) and a percentile bootstrap interval from resampling SAEs
    with replacement within each LM (so every resample keeps every LM's groups)."""
    table = table.reset_index(drop=True)
    point = psi_point(table, x, y)
    rng = np.random.default_rng(seed)
    codes = {axis: _group_codes(table, axis) for axis in AXES}
    x_values, y_values = table[x].to_numpy(float), table[y].to_numpy(float)
    lm_rows = [rows.index.to_numpy() for _, rows in table.groupby("lm_name", sort=True)]
    draws: dict[str, list[float]] = {key: [] for key in point}
    for _ in range(n_resamples):
        idx = np.concatenate([rows[rng.integers(0, len(rows), len(rows))] for rows in lm_rows])
        for key, value in _psi_of_sample(idx, codes, x_values, y_values).items():
            draws[key].append(value)
    alpha = (1 - confidence) / 2
    out: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        values = np.asarray([v for v in draws[key] if not math.isnan(v)])
        if key == "psi":
            se = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        else:
            taus = _axis_taus(table, key.removeprefix("psi_"), x, y)
            se = float(np.std(taus, ddof=1) / math.sqrt(len(taus))) if len(taus) > 1 else math.nan
        low, high = (
            (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))
            if len(values) > 1
            else (math.nan, math.nan)
        )
        out[key] = {"value": value, "se": se, "ci_low": low, "ci_high": high}
    return out


def all_group_taus(
    table: pd.DataFrame,
    x: str,
    y: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    on_skip: Callable[[str], None] | None = None,
) -> list[GroupTau]:
    """Per-group τ_b for every axis; groups of one SAE are reported through ``on_skip``."""
    out = []
    for axis in AXES:
        for label, rows in groups_of(table, axis):
            if len(rows) < 2:
                if on_skip is not None:
                    on_skip(f"Ψ_{axis} group {label}: 1 SAE, no pair to rank")
                continue
            out.append(
                group_tau(
                    axis,
                    label,
                    rows[x].to_numpy(),
                    rows[y].to_numpy(),
                    n_resamples=n_resamples,
                    seed=seed,
                )
            )
    return out
