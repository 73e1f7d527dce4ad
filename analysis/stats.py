"""Rank statistics of the study: Kendall τ_b, its intervals and p-values, and the Ψ decomposition.

METHODS §6. Everything here is a pure function of arrays (or of the joined table), so the
analysis entry point, the tests and a user's notebook compute the same numbers.

- ``kendall_tau_b``: ``scipy.stats.kendalltau`` (variant b, which corrects for ties); the
  batched forms (``tau_b_batch`` over rows, ``tau_b_resamples`` over bootstrap resamples)
  count the same integer pairs and combine them as scipy does, so they equal it bitwise.
- ``bca_interval``: a BCa bootstrap interval of τ_b over SAEs (``scipy.stats.bootstrap``,
  paired resampling of (µ, g)).
- ``group_tau``: τ_b inside one group with n, the number of pairs, a permutation p-value
  (``scipy.stats.permutation_test`` over pairings, two-sided) and a percentile bootstrap
  interval. (The paper's Table 1 reports a permutation p-value and interval per group; with
  groups of 5-6 SAEs a BCa interval is degenerate, so groups get percentile intervals.)
- ``psi``: Ψ_A (mean τ_b within each (LM, layer, width, architecture): sparsity varies), Ψ_B
  (within each (LM, layer, width, matched sparsity rank): architecture varies), Ψ_C (within
  each (LM, layer, width): all its SAEs), and Ψ = their mean. Each axis varies one design
  factor and holds the others (METHODS §6): SAEs of two layers or widths never share a group.
  Each with the standard error of the mean over its groups, a bootstrap interval from
  resampling SAEs within groups, and the number of groups used and dropped (no τ_b).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
AXES = ("A", "B", "C")
# Where an SAE sits: its LM, hook layer and width (d_sae). Every Ψ group lies inside one site,
# so an axis compares SAEs that differ in its one design factor only. A table without a site
# column (a hand-made one) is one site along it.
SITE_COLUMNS = ("lm_name", "layer", "d_sae")
# What each Ψ axis groups by (the columns of the joined table) and what varies inside a group.
AXIS_GROUPS: dict[str, tuple[str, ...]] = {
    "A": (*SITE_COLUMNS, "architecture"),  # sparsity varies
    "B": (*SITE_COLUMNS, "sparsity_rank"),  # architecture varies
    "C": SITE_COLUMNS,  # everything of one site varies
}
AXIS_MEANING = {
    "A": "within (LM, layer, width, architecture): sparsity varies",
    "B": "within (LM, layer, width, matched sparsity rank): architecture varies",
    "C": "within (LM, layer, width): all its SAEs",
}


def _tau_b_from_counts(
    con_minus_dis: np.ndarray, untied_x: np.ndarray, untied_y: np.ndarray
) -> np.ndarray:
    """τ_b from its integer pair counts, combined in scipy's order (so equal to
    ``scipy.stats.kendalltau`` to the last bit); NaN where x or y has no untied pair."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = con_minus_dis / np.sqrt(untied_x) / np.sqrt(untied_y)
    return np.where((untied_x > 0) & (untied_y > 0), np.clip(tau, -1.0, 1.0), np.nan)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b of two equally long sequences; NaN when either is constant."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.shape != y_arr.shape:
        raise ValueError(f"x and y differ in length: {x_arr.shape} vs {y_arr.shape}")
    if len(x_arr) < 2 or np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        return math.nan
    if len(x_arr) <= _PAIRWISE_MAX_N:  # scipy's call overhead is ~1 ms; pair signs cost µs
        return float(tau_b_batch(x_arr[None], y_arr[None])[0])
    return float(stats.kendalltau(x_arr, y_arr, variant="b").statistic)


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval and how it was made: ``method`` is ``BCa``, ``percentile`` (BCa
    was undefined because ``undefined_draws`` resamples had no τ_b, at most one tail's share)
    or ``none`` (too few SAEs, or more undefined draws than that: NaN bounds)."""

    low: float
    high: float
    method: str
    undefined_draws: int = 0
    n_draws: int = 0

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}

    def describe(self) -> str:
        if self.undefined_draws and self.method == "none":
            return (
                f"none ({self.undefined_draws} of {self.n_draws} draws had no τ_b: more than "
                "one tail)"
            )
        if self.undefined_draws:
            return f"{self.method} ({self.undefined_draws} of {self.n_draws} draws had no τ_b)"
        return self.method


_NO_INTERVAL = Interval(math.nan, math.nan, "none")


# Up to this many SAEs, τ_b of many resamples at once is computed from pair signs in numpy
# (O(n²) memory per resample, but no Python loop); beyond it, scipy per resample (O(n log n)).
_PAIRWISE_MAX_N = 64


@functools.lru_cache(maxsize=256)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def tau_b_batch(x_RN: np.ndarray, y_RN: np.ndarray) -> np.ndarray:
    """τ_b of each row pair (x_RN[r], y_RN[r]); NaN where a row is constant.

    τ_b = Σ_{i<j} sign(Δx)·sign(Δy) / sqrt(Σ sign(Δx)² · Σ sign(Δy)²), which is scipy's variant
    b (the denominators are the untied pairs of each variable)."""
    x_RN, y_RN = np.atleast_2d(np.asarray(x_RN, float)), np.atleast_2d(np.asarray(y_RN, float))
    n = x_RN.shape[-1]
    if n > _PAIRWISE_MAX_N:
        return np.array([kendall_tau_b(a, b) for a, b in zip(x_RN, y_RN, strict=True)])
    i, j = _pairs(n)
    sx_RP, sy_RP = np.sign(x_RN[:, i] - x_RN[:, j]), np.sign(y_RN[:, i] - y_RN[:, j])
    return _tau_b_from_counts((sx_RP * sy_RP).sum(-1), (sx_RP**2).sum(-1), (sy_RP**2).sum(-1))


# Up to this many SAEs, τ_b of bootstrap resamples comes from the n x n pair-sign matrix of
# the original SAEs (a few n² arrays in memory); beyond it, scipy per resample.
_RESAMPLE_MATRIX_MAX_N = 2048
# Bound on the (resamples x n) counts handled at once.
_RESAMPLE_CHUNK_ELEMENTS = 4_000_000


def _tie_group_sums(values: np.ndarray, counts_RN: np.ndarray) -> np.ndarray:
    """Σ (draws of the SAEs sharing one value)² per resample: Σ_k C_k² over tie groups k."""
    _, group = np.unique(values, return_inverse=True)
    order = np.argsort(group, kind="stable")
    sorted_groups = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    group_counts_RK = np.add.reduceat(counts_RN[:, order], starts, axis=1)
    return (group_counts_RK**2).sum(-1)


def tau_b_resamples(x: Sequence[float], y: Sequence[float], idx_RN: np.ndarray) -> np.ndarray:
    """τ_b of every resample (x[idx_RN[r]], y[idx_RN[r]]); NaN where a resample is constant.

    Equal to ``scipy.stats.kendalltau`` on each resample, in O(R·n²) BLAS work instead of
    R calls. A resample is its draw counts c_u of the original SAEs u: pairs of two draws of
    one SAE tie in both x and y, and pairs of SAEs u ≠ v occur c_u·c_v times, so (with
    S_uv = sign(x_u - x_v)·sign(y_u - y_v)) con - dis = ½ cᵀSc and the pairs untied in x are
    ½((Σc)² - Σ_k C_k²), C_k the draws of x's k-th tie group. All terms are integers, exact
    in float64, and combined as scipy combines them."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    idx_RN = np.atleast_2d(np.asarray(idx_RN))
    n, (n_resamples, draws) = len(x_arr), idx_RN.shape
    if x_arr.shape != y_arr.shape:
        raise ValueError(f"x and y differ in length: {x_arr.shape} vs {y_arr.shape}")
    if idx_RN.size and (idx_RN.min() < 0 or idx_RN.max() >= n):
        # A bad index would silently count as a draw of another resample's SAE.
        raise ValueError(
            f"resample indices must lie in [0, {n}), got {idx_RN.min()} to {idx_RN.max()}"
        )
    if n > _RESAMPLE_MATRIX_MAX_N:
        return np.array([kendall_tau_b(x_arr[i], y_arr[i]) for i in idx_RN])
    signs_NN = np.sign(x_arr[:, None] - x_arr[None, :]) * np.sign(y_arr[:, None] - y_arr[None, :])
    total = draws * (draws - 1) / 2
    out = np.empty(n_resamples)
    chunk = max(1, _RESAMPLE_CHUNK_ELEMENTS // max(n, draws))
    for lo in range(0, n_resamples, chunk):
        idx = idx_RN[lo : lo + chunk]
        rows = len(idx)
        offsets = (np.arange(rows) * n)[:, None]
        counts_RN = np.bincount((idx + offsets).ravel(), minlength=rows * n).reshape(rows, n)
        counts_RN = counts_RN.astype(float)
        con_minus_dis = ((counts_RN @ signs_NN) * counts_RN).sum(-1) / 2
        # Untied pairs = all pairs minus tied ones; ½(m² - ΣC_k²) = tot - ½(ΣC_k² - m).
        untied_x = total - (_tie_group_sums(x_arr, counts_RN) - draws) / 2
        untied_y = total - (_tie_group_sums(y_arr, counts_RN) - draws) / 2
        out[lo : lo + chunk] = _tau_b_from_counts(con_minus_dis, untied_x, untied_y)
    return out


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

    def tau_of_resampled_indices(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        taus = tau_b_resamples(x_arr, y_arr, np.moveaxis(np.atleast_2d(idx), axis, -1))
        return taus if np.ndim(idx) > 1 else taus[0]

    # scipy's paired bootstrap resamples the index array arange(n) and hands the statistic
    # the resampled (x, y); resampling that index array here draws the same resamples and
    # jackknife (same generator, same calls), and the statistic sees indices, which is
    # what tau_b_resamples needs.
    result = stats.bootstrap(
        (np.arange(len(x_arr)),),
        tau_of_resampled_indices,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=method,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    if not (math.isnan(low) or math.isnan(high)):
        return Interval(float(low), float(high), method)
    # Resamples whose y (or x) came out constant have no τ_b (many SAEs with steering score
    # 0 do that), and one NaN draw makes scipy's BCa NaN. Fall back to the percentile interval
    # of the draws that have a τ_b, and say so in the method.
    draws = np.asarray(result.bootstrap_distribution, dtype=float)
    finite = draws[np.isfinite(draws)]
    undefined = len(draws) - len(finite)
    tail = (1 - confidence) / 2
    if undefined > tail * len(draws):
        # More undefined draws than one tail holds: the defined ones are the resamples that
        # caught the few SAEs that vary, and their percentiles can exclude τ_b itself (one
        # nonzero lift of 10: 330 of 1000 undefined, "CI" -0.795 to -0.457 for τ_b -0.452).
        return Interval(math.nan, math.nan, "none", undefined, len(draws))
    low, high = np.percentile(finite, [100 * tail, 100 * (1 - tail)])
    return Interval(float(low), float(high), "percentile", undefined, len(draws))


# How permutation_p_value computed a p-value (the analyze run logs it beside the value).
P_EXACT, P_RANDOM, P_ASYMPTOTIC, P_NONE = (
    "exact_permutation",
    "random_permutations",
    "asymptotic_normal",
    "none",
)


def p_value_method(n: int, n_resamples: int = DEFAULT_RESAMPLES) -> str:
    """Which p-value ``permutation_p_value`` gives for ``n`` SAEs (``none`` below 3)."""
    if n < 3:
        return P_NONE
    if n > _PAIRWISE_MAX_N:
        return P_ASYMPTOTIC
    return P_EXACT if math.factorial(n) <= n_resamples else P_RANDOM


def permutation_p_value(
    x: Sequence[float], y: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> float:
    """Two-sided permutation p-value of τ_b (y shuffled against fixed x), scipy's definition:
    ``min(1, 2·min(P(null ≤ τ), P(null ≥ τ)))``. Exact (every permutation) when n! is at most
    ``n_resamples``, else ``n_resamples`` random permutations. Beyond 64 SAEs, where a
    permutation test costs seconds, the normal approximation of ``scipy.stats.kendalltau``
    (accurate at that size) is used."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x_arr)
    observed = kendall_tau_b(x_arr, y_arr)
    if n < 3 or math.isnan(observed):
        return math.nan
    method = p_value_method(n, n_resamples)
    if method == P_ASYMPTOTIC:
        return float(stats.kendalltau(x_arr, y_arr, variant="b").pvalue)
    exact = method == P_EXACT
    if exact:
        order_RN = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        order_RN = rng.permuted(np.tile(np.arange(n), (n_resamples, 1)), axis=1)
    null = tau_b_batch(np.broadcast_to(x_arr, order_RN.shape), y_arr[order_RN])
    eps = 1e-12  # ties of the statistic with itself count as "as extreme"
    less, greater = np.sum(null <= observed + eps), np.sum(null >= observed - eps)
    if exact:
        p_less, p_greater = less / len(null), greater / len(null)
    else:  # the observed arrangement counts as one of the draws (scipy's correction)
        p_less, p_greater = (less + 1) / (len(null) + 1), (greater + 1) / (len(null) + 1)
    return float(min(1.0, 2 * min(p_less, p_greater)))


def percentile_interval(
    x: Sequence[float],
    y: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """Percentile bootstrap interval of τ_b over resampled (x_i, y_i) pairs, all draws in one
    batch; resamples where τ_b is undefined (all ties) are left out."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x_arr) < 3 or math.isnan(kendall_tau_b(x_arr, y_arr)):
        return _NO_INTERVAL
    idx_RN = np.random.default_rng(seed).integers(0, len(x_arr), (n_resamples, len(x_arr)))
    draws = tau_b_resamples(x_arr, y_arr, idx_RN)
    draws = draws[~np.isnan(draws)]
    if len(draws) < 2:
        return _NO_INTERVAL
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(float(low), float(high), "percentile")


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
    interval = percentile_interval(x, y, n_resamples=n_resamples, seed=seed)
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


def _keys(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """``columns`` less the site columns ``table`` lacks (one site along those)."""
    return [c for c in columns if c in table.columns or c not in SITE_COLUMNS]


def add_sparsity_rank(
    table: pd.DataFrame, sparsity_column: str = "l0", grid: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Column ``sparsity_rank`` (0 = sparsest), so that rank r matches the r-th sparsity level
    of every architecture of a site (the paper's matched sparsity).

    Ranks come from ``grid``, every SAE of the study (default ``table`` itself) matched to
    ``table`` by ``model_uri``: an SAE left out of ``table`` for a missing metric must not
    shift the ranks of its architecture's other SAEs. By ``target_l0`` the rank is that of the
    target among the site's targets (one rank per target across architectures); by the
    measured ``l0``, the rank among the SAEs of its site and architecture."""
    grid = table if grid is None else grid
    site = _keys(grid, SITE_COLUMNS)
    if sparsity_column == "target_l0":
        ranks = grid.groupby(site, dropna=False)[sparsity_column].rank(method="dense")
    else:
        ranks = grid.groupby([*site, "architecture"], dropna=False)[sparsity_column].rank(
            method="first"
        )
    # An SAE with no sparsity value (an imported one without tags) is rank -1: a group alone.
    ranks = ranks.fillna(0).astype(int).sub(1)
    out = table.copy()
    if grid is table:
        out["sparsity_rank"] = ranks
    else:
        by_uri = dict(zip(grid["model_uri"], ranks, strict=True))
        out["sparsity_rank"] = out["model_uri"].map(by_uri).astype(int)
    return out


def groups_of(table: pd.DataFrame, axis: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) of every group of ``axis`` in a stable order."""
    keys = _keys(table, AXIS_GROUPS[axis])
    out = []
    for key, rows in table.groupby(keys, sort=True, dropna=False):
        values = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), rows))
    return out


def _axis_taus(table: pd.DataFrame, axis: str, x: str, y: str) -> list[float]:
    """τ_b of every group of ``axis`` with at least 2 SAEs and a defined τ."""
    return [tau for tau in _all_axis_taus(table, axis, x, y) if not math.isnan(tau)]


def _all_axis_taus(table: pd.DataFrame, axis: str, x: str, y: str) -> list[float]:
    """τ_b of every group of ``axis``; NaN for a group of one SAE or a constant x or y."""
    return [
        kendall_tau_b(rows[x].to_numpy(), rows[y].to_numpy()) if len(rows) >= 2 else math.nan
        for _, rows in groups_of(table, axis)
    ]


def axis_group_counts(table: pd.DataFrame, x: str, y: str) -> dict[str, tuple[int, int]]:
    """Per axis, (groups whose τ_b enters Ψ, groups dropped: one SAE or x or y constant)."""
    out = {}
    for axis in AXES:
        taus = _all_axis_taus(table, axis, x, y)
        used = sum(not math.isnan(t) for t in taus)
        out[axis] = (used, len(taus) - used)
    return out


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
    return (
        table.groupby(_keys(table, AXIS_GROUPS[axis]), sort=True, dropna=False).ngroup().to_numpy()
    )


def _psi_draws(
    table: pd.DataFrame, x: str, y: str, n_resamples: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Bootstrap draws of Ψ_A, Ψ_B, Ψ_C and Ψ: SAEs resampled with replacement within each LM.

    Every Ψ group lies inside one LM, so each LM is a block, and a resample of a block is its
    draw counts c_u of the block's SAEs u (an SAE keeps its group). As in
    ``tau_b_resamples``, with S_uv = sign(x_u - x_v)·sign(y_u - y_v) restricted to pairs of one
    group (and |sign| for τ_b's tie correction), group k's con - dis is ½ Σ_{u,v in k}
    c_u c_v S_uv: one matrix product per block and axis gives every draw and group at once. A
    resample that repeats one SAE pairs it with itself at sign 0, exactly as τ_b treats a tie.
    """
    codes = {axis: _group_codes(table, axis) for axis in AXES}
    x_all, y_all = table[x].to_numpy(float), table[y].to_numpy(float)
    taus: dict[str, list[np.ndarray]] = {axis: [] for axis in AXES}  # each (R, groups of LM)
    for _, block in table.groupby("lm_name", sort=True):
        rows = block.index.to_numpy()
        m = len(rows)
        sx_MM = np.sign(x_all[rows][:, None] - x_all[rows][None, :])
        sy_MM = np.sign(y_all[rows][:, None] - y_all[rows][None, :])
        products = (sx_MM * sy_MM, np.abs(sx_MM), np.abs(sy_MM))
        idx_RM = rng.integers(0, m, size=(n_resamples, m))
        offsets = (np.arange(n_resamples) * m)[:, None]
        counts_RM = np.bincount((idx_RM + offsets).ravel(), minlength=n_resamples * m)
        counts_RM = counts_RM.reshape(n_resamples, m).astype(float)
        for axis in AXES:
            local = np.unique(codes[axis][rows], return_inverse=True)[1]
            onehot_MK = np.eye(int(local.max()) + 1)[local]
            same_group_MM = local[:, None] == local[None, :]
            # Σ_{u,v in group k} c_u c_v P_uv = Σ_{u in k} c_u (C P_k)_u, P_k = P on same-group
            # pairs; halved to count unordered pairs (exact: every term is an integer).
            con_minus_dis, untied_x, untied_y = (
                ((counts_RM @ np.where(same_group_MM, p, 0.0)) * counts_RM) @ onehot_MK / 2
                for p in products
            )
            taus[axis].append(_tau_b_from_counts(con_minus_dis, untied_x, untied_y))
    draws: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no defined group: NaN
        for axis in AXES:
            draws[f"psi_{axis}"] = np.nanmean(np.concatenate(taus[axis], axis=1), axis=1)
        draws["psi"] = np.nanmean(np.stack([draws[f"psi_{a}"] for a in AXES]), axis=0)
    return draws


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
    with replacement within each LM (so every resample keeps every LM's groups); each axis
    also with ``groups_used`` and ``groups_dropped`` (groups whose τ_b is undefined)."""
    table = table.reset_index(drop=True)
    point = psi_point(table, x, y)
    draws = _psi_draws(table, x, y, n_resamples, np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    out: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        values = draws[key][~np.isnan(draws[key])]
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
    for axis, (used, dropped) in axis_group_counts(table, x, y).items():
        out[f"psi_{axis}"].update(groups_used=float(used), groups_dropped=float(dropped))
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
