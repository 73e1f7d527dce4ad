"""analysis/stats.py against scipy and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import (
    add_sparsity_rank,
    all_group_taus,
    bca_interval,
    group_tau,
    kendall_tau_b,
    permutation_p_value,
    psi_point,
    psi_with_uncertainty,
    tau_b_resamples,
)


def test_tau_b_equals_scipy_with_ties() -> None:
    x = [1, 2, 2, 3, 3, 3, 4, 5]
    y = [2, 1, 2, 2, 4, 3, 5, 5]
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)
    # With ties τ_b differs from τ_a (concordant - discordant over all pairs): the b variant.
    assert kendall_tau_b(x, y) != pytest.approx(stats.kendalltau(x, y, variant="c").statistic)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="differ in length"):
        kendall_tau_b([1, 2], [1, 2, 3])


def test_bca_interval_matches_a_direct_scipy_bootstrap() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=25)
    y = x + rng.normal(size=25)
    ours = bca_interval(x, y, n_resamples=400, seed=7)

    def tau(a: np.ndarray, b: np.ndarray) -> float:
        return stats.kendalltau(a, b, variant="b").statistic

    direct = stats.bootstrap(
        (x, y), tau, paired=True, vectorized=False, n_resamples=400, method="BCa",
        rng=np.random.default_rng(7),
    )  # fmt: skip
    assert ours.method == "BCa"
    assert ours.low == pytest.approx(direct.confidence_interval.low, abs=1e-9)
    assert ours.high == pytest.approx(direct.confidence_interval.high, abs=1e-9)
    assert ours.low < kendall_tau_b(x, y) < ours.high


def test_permutation_p_value_small_and_large() -> None:
    x = np.arange(6.0)
    # 6! = 720 < n_resamples, so the test is exact: perfect order has p = 2/6! (the identity
    # and its reverse are as extreme).
    assert permutation_p_value(x, x) == pytest.approx(2 / math.factorial(6))
    rng = np.random.default_rng(0)
    assert permutation_p_value(rng.normal(size=8), rng.normal(size=8)) > 0.05
    # Exact: the same p-value as scipy's exact permutation test.
    a, b = rng.normal(size=6), rng.normal(size=6)
    direct = stats.permutation_test(
        (b,), lambda v: stats.kendalltau(a, v).statistic, permutation_type="pairings",
        n_resamples=10_000,
    )  # fmt: skip
    assert permutation_p_value(a, b) == pytest.approx(direct.pvalue)


FIXTURE = pd.DataFrame(
    {
        "lm_name": ["a"] * 4 + ["b"] * 4,
        "architecture": ["topk", "topk", "relu", "relu"] * 2,
        "l0": [10, 20, 12, 25, 10, 20, 11, 30],
        "mu": [0.1, 0.3, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2],
        "g": [0.1, 0.2, 0.4, 0.3, 0.1, 0.2, 0.3, 0.4],
    }
)


def test_psi_matches_a_hand_computation() -> None:
    table = add_sparsity_rank(FIXTURE)
    assert table["sparsity_rank"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    psi = psi_point(table, "mu", "g")
    # Ψ_A, groups (LM, architecture), two SAEs each: τ = +1 if µ and g move together else -1.
    # a/topk: µ up g up → +1; a/relu: µ up g down → -1; b/topk: µ down g up → -1;
    # b/relu: µ down g up → -1. Mean: -0.5.
    assert psi["psi_A"] == pytest.approx(-0.5)
    # Ψ_B, groups (LM, rank): a/r0 = (topk .1,.1),(relu .2,.4) → +1; a/r1 (.3,.2),(.4,.3) → +1;
    # b/r0 (.5,.1),(.3,.3) → -1; b/r1 (.4,.2),(.2,.4) → -1. Mean 0.
    assert psi["psi_B"] == pytest.approx(0.0)
    # Ψ_C, groups by LM over their 4 SAEs.
    tau_a = stats.kendalltau([0.1, 0.3, 0.2, 0.4], [0.1, 0.2, 0.4, 0.3]).statistic
    tau_b = stats.kendalltau([0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]).statistic
    assert tau_b == pytest.approx(-1.0)
    assert psi["psi_C"] == pytest.approx((tau_a + tau_b) / 2)
    assert psi["psi"] == pytest.approx((psi["psi_A"] + psi["psi_B"] + psi["psi_C"]) / 3)


def test_psi_uncertainty_and_groups() -> None:
    table = add_sparsity_rank(FIXTURE)
    with_se = psi_with_uncertainty(table, "mu", "g", n_resamples=100, seed=0)
    assert with_se["psi_A"]["value"] == pytest.approx(-0.5)
    # SE of the mean over Ψ_A's four group τ's (+1, -1, -1, -1).
    assert with_se["psi_A"]["se"] == pytest.approx(np.std([1, -1, -1, -1], ddof=1) / 2)
    for values in with_se.values():
        assert values["ci_low"] <= values["ci_high"]
    skipped: list[str] = []
    one_alone = pd.concat([table, table.iloc[[0]].assign(lm_name="c", architecture="gated")])
    groups = all_group_taus(one_alone, "mu", "g", n_resamples=100, on_skip=skipped.append)
    assert {g.axis for g in groups} == {"A", "B", "C"}
    assert any("lm_name=c" in s and "1 SAE" in s for s in skipped)
    g = group_tau("C", "x", [1, 2, 3, 4, 5], [1, 3, 2, 5, 4], n_resamples=200)
    assert g.n == 5 and g.pairs == 10 and 0 < g.p_value <= 1


def test_fast_paths_agree_with_scipy_and_pandas() -> None:
    from analysis.stats import _psi_draws, tau_b_batch

    rng = np.random.default_rng(5)
    x_RN = rng.integers(0, 4, size=(50, 12)).astype(float)  # many ties
    y_RN = rng.integers(0, 4, size=(50, 12)).astype(float)
    expected = [
        stats.kendalltau(a, b, variant="b").statistic for a, b in zip(x_RN, y_RN, strict=True)
    ]
    np.testing.assert_allclose(tau_b_batch(x_RN, y_RN), expected, atol=1e-12)
    # A bootstrap "resample" that is the table itself gives the point values.
    table = add_sparsity_rank(FIXTURE)

    class Identity:
        def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
            return np.tile(np.arange(high), (size[0], 1))

    draws = _psi_draws(table, "mu", "g", 3, Identity())  # type: ignore[arg-type]
    point = psi_point(table, "mu", "g")
    for key, values in draws.items():
        np.testing.assert_allclose(values, point[key])


def test_resampled_tau_b_equals_scipy_on_every_resample_with_ties() -> None:
    from analysis.stats import tau_b_resamples

    rng = np.random.default_rng(11)
    for n in (4, 9, 70, 150):  # below and above the pair-sign batch limit (64)
        x = rng.integers(0, 5, size=n).astype(float)  # many ties, some all-tied resamples
        y = rng.integers(0, 3, size=n).astype(float)
        for draws in (n, n - 1):  # bootstrap resamples and jackknife (leave-one-out) rows
            idx_RN = rng.integers(0, n, size=(200, draws))
            fast = tau_b_resamples(x, y, idx_RN)
            slow = [kendall_tau_b(x[i], y[i]) for i in idx_RN]
            np.testing.assert_array_equal(fast, slow)  # bitwise, NaNs in the same places
            direct = [stats.kendalltau(x[i], y[i], variant="b").statistic for i in idx_RN]
            np.testing.assert_array_equal(fast, direct)
    small = rng.integers(0, 3, size=(100, 6)).astype(float)
    assert np.isnan(tau_b_resamples(small[0], small[1], np.zeros((1, 6), int))).all()
    with pytest.raises(ValueError, match=r"\[0, 6\), got 0 to 6"):
        tau_b_resamples(small[0], small[1], np.array([[0, 1, 2, 3, 4, 6]]))


def test_bca_interval_with_ties_beyond_the_batch_limit_matches_scipy() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, size=90).astype(float)
    y = x + rng.integers(0, 4, size=90)
    ours = bca_interval(x, y, n_resamples=300, seed=3)
    direct = stats.bootstrap(
        (x, y), lambda a, b: stats.kendalltau(a, b, variant="b").statistic, paired=True,
        vectorized=False, n_resamples=300, method="BCa", rng=np.random.default_rng(3),
    )  # fmt: skip
    assert ours.low == direct.confidence_interval.low
    assert ours.high == direct.confidence_interval.high


def test_psi_draws_equal_psi_of_each_resampled_table() -> None:
    from analysis.stats import _psi_draws

    rng = np.random.default_rng(4)
    n_per_lm = 12
    table = pd.DataFrame(
        {
            "lm_name": np.repeat(["a", "b"], n_per_lm),
            "architecture": np.tile(np.repeat(["relu", "topk", "gated"], 4), 2),
            "l0": rng.integers(5, 50, size=2 * n_per_lm),
            "mu": rng.integers(0, 4, size=2 * n_per_lm) / 4,  # ties
            "g": rng.integers(0, 3, size=2 * n_per_lm) / 3,
        }
    )
    table = add_sparsity_rank(table)
    draws = _psi_draws(table, "mu", "g", 30, np.random.default_rng(9))
    # The same draws by hand: SAEs resampled within each LM (same generator calls), then Ψ of
    # the resampled table, each resampled SAE keeping its groups.
    replay = np.random.default_rng(9)
    idx_by_lm = [
        block.index.to_numpy()[replay.integers(0, len(block), size=(30, len(block)))]
        for _, block in table.groupby("lm_name", sort=True)
    ]
    for r in range(30):
        resampled = table.iloc[np.concatenate([idx[r] for idx in idx_by_lm])]
        expected = psi_point(resampled.reset_index(drop=True), "mu", "g")
        for key, value in expected.items():
            np.testing.assert_allclose(draws[key][r], value, atol=1e-12, err_msg=f"{key} {r}")


def test_interval_falls_back_to_percentile_when_some_draws_have_no_tau() -> None:
    # Half the SAEs steer at 0: some resamples draw only zeros, where τ_b is undefined, which
    # makes scipy's BCa NaN. The interval is then the percentile one over the defined draws.
    mu = [0.671, 0.514, 0.761, 0.557, 0.725, 0.55, 0.596, 0.482, 0.671, 0.479]
    g = [0.5, 0.25, 0, 0, 0.188, 0, 0.375, 0, 0, 0]
    interval = bca_interval(mu, g, n_resamples=2000, seed=0)
    assert interval.method == "percentile" and 0 < interval.undefined_draws < 2000
    assert (
        interval.describe() == f"percentile ({interval.undefined_draws} of 2000 draws had no τ_b)"
    )
    assert interval.low < kendall_tau_b(mu, g) < interval.high
    # Where every draw has a τ_b, the BCa interval stays.
    assert bca_interval(mu, [0.1 * i for i in range(10)], n_resamples=500).method == "BCa"


def test_no_interval_when_more_draws_are_undefined_than_one_tail_holds() -> None:
    # A study's lift column (stop 31): one SAE of ten lifted the concept. A third of the
    # resamples miss it (constant lift, no τ_b); the percentiles of the others lay wholly
    # below τ_b, a "95% interval" that excluded the estimate. None is given instead.
    mu = [0.671, 0.557, 0.768, 0.55, 0.671, 0.582, 0.632, 0.529, 0.686, 0.554]
    lift = [0, 0, 0, 0, 0, 0, 0, 0.25, 0, 0]
    tau = kendall_tau_b(mu, lift)
    interval = bca_interval(mu, lift, n_resamples=1000, seed=0)
    assert interval.method == "none" and math.isnan(interval.low) and math.isnan(interval.high)
    assert interval.undefined_draws > 0.025 * 1000 and interval.n_draws == 1000
    assert interval.describe().startswith(f"none ({interval.undefined_draws} of 1000 draws")
    # What the defined draws alone would have said: an interval that misses τ_b.
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 10, (1000, 10))
    draws = tau_b_resamples(mu, lift, idx)
    low, high = np.percentile(draws[np.isfinite(draws)], [2.5, 97.5])
    assert not low <= tau <= high


def test_psi_groups_keep_layers_and_widths_apart() -> None:
    """Two layers of one LM: every Ψ group lies inside one (LM, layer, width) site."""
    one_layer = FIXTURE[FIXTURE["lm_name"] == "a"].assign(layer=4, d_sae=256)
    # The same SAEs' pattern at another layer, with µ reversed: pooled into one (LM,
    # architecture) group the pairs would cross layers.
    other = one_layer.assign(layer=10, mu=one_layer["mu"].to_numpy()[::-1])
    table = add_sparsity_rank(pd.concat([one_layer, other], ignore_index=True))
    psi = psi_point(table, "mu", "g")
    by_layer = [psi_point(add_sparsity_rank(t), "mu", "g") for t in (one_layer, other)]
    for axis in ("psi_A", "psi_B", "psi_C"):  # equal groups of each layer: the mean of both
        assert psi[axis] == pytest.approx((by_layer[0][axis] + by_layer[1][axis]) / 2)
    labels = [g.group for g in all_group_taus(table, "mu", "g", n_resamples=100)]
    assert "lm_name=a, layer=4, d_sae=256, architecture=topk" in labels
    assert sum(g.startswith("lm_name=a, layer=10, d_sae=256, sparsity_rank=") for g in labels) == 2
    # Widths too: two widths at one layer are two sites.
    wide = one_layer.assign(d_sae=512, mu=one_layer["mu"].to_numpy()[::-1])
    widths = add_sparsity_rank(pd.concat([one_layer, wide], ignore_index=True))
    assert psi_point(widths, "mu", "g")["psi_C"] == pytest.approx(psi["psi_C"])


def test_sparsity_ranks_come_from_the_full_grid() -> None:
    """One SAE left out for a missing metric does not shift its architecture's other ranks."""
    grid = pd.DataFrame(
        {
            "model_uri": [f"models:/m/{i}" for i in range(6)],
            "lm_name": ["a"] * 6,
            "architecture": ["relu"] * 3 + ["topk"] * 3,
            "target_l0": [16, 32, 64] * 2,
            "l0": [15.0, 30.0, 70.0, 16.0, 32.0, 64.0],
        }
    )
    complete = grid.drop(index=3)  # topk at L0 16 has no steer run
    ranked = add_sparsity_rank(complete, "l0", grid=grid)
    assert ranked["sparsity_rank"].tolist() == [0, 1, 2, 1, 2]  # topk 32 stays rank 1
    assert add_sparsity_rank(complete)["sparsity_rank"].tolist() == [0, 1, 2, 0, 1]  # the old way
    by_target = add_sparsity_rank(complete, "target_l0", grid=grid)
    assert by_target["sparsity_rank"].tolist() == [0, 1, 2, 1, 2]
    # By target the rank is the target's among the site's targets, whatever the grid.
    assert add_sparsity_rank(complete, "target_l0")["sparsity_rank"].tolist() == [0, 1, 2, 1, 2]


def test_group_counts_say_how_many_groups_each_psi_averages() -> None:
    from analysis.stats import axis_group_counts

    table = add_sparsity_rank(FIXTURE)
    # One group of a single SAE (c/gated) and one where g is constant (b/relu made flat).
    flat = table.assign(
        g=np.where((table["lm_name"] == "b") & (table["architecture"] == "relu"), 0.3, table["g"])
    )
    extra = flat.iloc[[0]].assign(lm_name="c", architecture="gated", sparsity_rank=0)
    table = pd.concat([flat, extra], ignore_index=True)
    counts = axis_group_counts(table, "mu", "g")
    assert counts["A"] == (3, 2)  # a/topk, a/relu, b/topk; dropped b/relu (flat), c/gated (alone)
    assert counts["C"] == (2, 1)  # a, b; c alone
    with_se = psi_with_uncertainty(table, "mu", "g", n_resamples=100)
    assert (with_se["psi_A"]["groups_used"], with_se["psi_A"]["groups_dropped"]) == (3, 2)
    assert "groups_used" not in with_se["psi"]


def test_p_value_method_names_how_the_p_value_was_computed() -> None:
    from analysis.stats import p_value_method

    assert p_value_method(2) == "none"
    assert p_value_method(6, n_resamples=2000) == "exact_permutation"  # 720 orders
    assert p_value_method(10, n_resamples=2000) == "random_permutations"
    assert p_value_method(65) == "asymptotic_normal"
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=70), rng.normal(size=70)
    assert permutation_p_value(x, y) == pytest.approx(stats.kendalltau(x, y).pvalue)
