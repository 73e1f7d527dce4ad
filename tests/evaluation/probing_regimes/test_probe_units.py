"""Sparse probing in four regimes: the validation scheme, the quiver and its tie rule, the
regimes' splits (label noise on training labels only) and the probes, on fixtures with
known answers."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info

from evaluation.probing_regimes import methods, threads
from evaluation.probing_regimes.config import PAPER_TRAIN_SIZES, ProbeConfig
from evaluation.probing_regimes.datasets import ProbeDataset, encode_labels
from evaluation.probing_regimes.methods import (
    C_GRID,
    MethodResult,
    _logreg,
    _path_scores,
    logreg,
    rank_latents,
    run_baseline,
    sae_probe,
    tree_draws,
)
from evaluation.probing_regimes.quiver import cell, pick
from evaluation.probing_regimes.regimes import check_plan, corrupt_labels, trials
from evaluation.probing_regimes.threads import FIT_THREADS_ENV, fit_thread_limit, fit_threads
from evaluation.probing_regimes.validation import scheme, validation_auc, validation_splits


def test_paper_grids() -> None:
    assert PAPER_TRAIN_SIZES == (
        2, 3, 4, 5, 7, 10, 14, 20, 28, 38, 53, 74, 103, 143, 198, 275, 382, 531, 737, 1024
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# validation scheme


@pytest.mark.parametrize(
    ("n", "kind"),
    [(2, "train_auc"), (3, "train_auc"), (4, "leave_two_out"), (12, "leave_two_out"),
     (13, "six_fold"), (127, "six_fold"), (128, "holdout"), (1024, "holdout")],
)  # fmt: skip
def test_scheme_by_size(n: int, kind: str) -> None:
    assert scheme(n) == kind


def test_small_n_scores_on_training_data() -> None:
    assert validation_splits(np.array([0, 1, 1]), seed=0) is None


def test_leave_two_out_keeps_pairs_with_both_classes() -> None:
    y = np.array([0, 0, 1, 1, 1])  # 10 pairs, 2 x 3 = 6 of them mixed
    splits = validation_splits(y, seed=0)
    assert splits is not None and len(splits) == 6
    pairs = {tuple(sorted(va)) for _, va in splits}
    assert pairs == {p for p in combinations(range(5), 2) if y[p[0]] != y[p[1]]}
    for tr, va in splits:
        assert sorted([*tr, *va]) == list(range(5))  # the rest trains


def test_leave_two_out_at_twelve() -> None:
    splits = validation_splits(np.array([0, 1] * 6), seed=0)
    assert splits is not None and len(splits) == 36  # 6 x 6 mixed pairs of C(12, 2) = 66


def test_six_fold_is_stratified_and_covers_every_row() -> None:
    y = np.array([0] * 30 + [1] * 30)
    splits = validation_splits(y, seed=3)
    assert splits is not None and len(splits) == 6
    covered = np.sort(np.concatenate([va for _, va in splits]))
    assert covered.tolist() == list(range(60))
    assert all(y[va].sum() == 5 for _, va in splits)


def test_holdout_is_the_last_rows() -> None:
    y = np.array([0, 1] * 64)  # n = 128: int(0.2 * 128) = 25
    ((tr, va),) = validation_splits(y, seed=0)
    assert va.tolist() == list(range(103, 128)) and tr.tolist() == list(range(103))
    ((tr, va),) = validation_splits(np.array([0, 1] * 600), seed=0)  # capped at 100
    assert va.tolist() == list(range(1100, 1200))


def test_holdout_with_one_class_falls_back_to_training_auc() -> None:
    y = np.array([0, 1] * 50 + [1] * 28)  # the last 25 rows are all positive
    assert validation_splits(y, seed=0) is None


def test_validation_auc_known_answer() -> None:
    # A "fit" that scores by feature 0; leave-two-out pairs: every mixed pair is ordered
    # correctly except the one where the negative has the larger feature.
    X = np.array([[0.1], [0.5], [0.4], [0.8]])
    y = np.array([0, 0, 1, 1])

    def fit(_x: np.ndarray, _y: np.ndarray):  # noqa: ANN202
        return lambda x: x[:, 0]

    splits = validation_splits(y, seed=0)
    # mixed pairs: (0,2) ok, (0,3) ok, (1,2) wrong, (1,3) ok -> AUCs 1, 1, 0, 1
    assert validation_auc(fit, X, y, splits) == pytest.approx(0.75)
    assert validation_auc(fit, X, y, None) == pytest.approx(0.75)  # training AUC: 3 of 4


# ---------------------------------------------------------------------------------------------
# quiver and tie rule


def _r(method: str, val: float, test: float, sae: bool = False) -> MethodResult:
    return MethodResult(method, val, test, is_sae=sae)


TIED = [
    _r("logreg", 0.9, 0.80),
    _r("knn", 0.7, 0.99),
    _r("sae_l1_k16", 0.9, 0.95, sae=True),
    _r("sae_l1_k128", 0.6, 0.50, sae=True),
]


def test_tie_goes_to_the_baseline_by_default() -> None:
    c = cell(TIED)  # default rule: baseline
    assert c.with_sae.method == "logreg" and c.delta == 0.0
    assert c.without.method == "logreg" and c.sae_only.method == "sae_l1_k16"


def test_tie_rule_sae() -> None:
    c = cell(TIED, "sae")
    assert c.with_sae.method == "sae_l1_k16"
    assert c.delta == pytest.approx(0.15) and c.with_sae.sae_share == 1.0


def test_tie_rule_mean() -> None:
    c = cell(TIED, "mean")
    assert c.with_sae.test_auc == pytest.approx(0.875)
    assert c.with_sae.sae_share == 0.5 and c.delta == pytest.approx(0.075)


def test_strictly_better_sae_probe_is_chosen_under_every_rule() -> None:
    results = [_r("logreg", 0.8, 0.9), _r("sae_l1_k16", 0.85, 0.7, sae=True)]
    for rule in ("baseline", "sae", "mean"):
        c = cell(results, rule)
        assert c.with_sae.method == "sae_l1_k16" and c.delta == pytest.approx(-0.2)


def test_first_of_tied_baselines_is_chosen() -> None:
    assert pick([_r("a", 0.9, 0.1), _r("b", 0.9, 0.2)]).method == "a"
    with pytest.raises(ValueError, match="tie_rule='coin'"):
        pick(TIED, "coin")


# ---------------------------------------------------------------------------------------------
# regimes


def _dataset(n: int = 400, ood: bool = False) -> ProbeDataset:
    y = np.array([0, 1] * (n // 2))
    texts = [f"text {i}" for i in range(n)]
    d = ProbeDataset("toy", texts, y, "test")
    if ood:
        d.ood_texts, d.ood_labels = ["a", "b", "c", "d"], np.array([0, 1, 0, 1])
    return d


def test_label_noise_touches_training_labels_only() -> None:
    d = _dataset(400)
    config = ProbeConfig(noise_fractions=(0.0, 0.2, 0.5), max_train=200, min_test=100)
    found = trials(d, "noise", config)
    assert [t.value for t in found] == [0.0, 0.2, 0.5]
    for t in found:
        clean_train = d.labels[t.train_idx]
        assert len(t.train_idx) == 200
        assert int((t.y_train != clean_train).sum()) == int(200 * t.value)
        assert np.array_equal(t.y_test, d.labels[t.test_idx])  # test stays clean
        assert not set(t.train_idx) & set(t.test_idx)
    # The same rows at every noise level: only the labels move.
    assert all(np.array_equal(found[0].train_idx, t.train_idx) for t in found)


def test_corrupt_labels_does_not_modify_its_input() -> None:
    y = np.array([0, 1] * 10)
    noisy = corrupt_labels(y, 0.5, seed=1)
    assert (noisy != y).sum() == 10 and y.tolist() == [0, 1] * 10


def test_scarcity_skips_sizes_without_a_test_set_and_balances() -> None:
    d = _dataset(300)
    config = ProbeConfig(train_sizes=(2, 5, 200, 201))
    found = trials(d, "scarcity", config)
    assert [t.value for t in found] == [2.0, 5.0, 200.0]  # 201 > 300 - 100
    assert found[1].y_train.sum() == 3  # ceil(0.5 * 5) positives


def test_imbalance_sets_the_ratio_of_train_and_test() -> None:
    d = _dataset(2000)
    found = trials(d, "imbalance", ProbeConfig(imbalance_ratios=(0.2, 0.8)))
    assert len(found[0].train_idx) == 952  # int(min(1000 / 0.95, 1000 / 0.95)) - 100
    for t, ratio in zip(found, (0.2, 0.8), strict=True):
        assert t.y_train.mean() == pytest.approx(ratio, abs=0.002)
        assert t.y_test.mean() == pytest.approx(ratio, abs=0.01)


def test_shift_trains_in_distribution_and_tests_on_the_shifted_set() -> None:
    (t,) = trials(_dataset(400, ood=True), "shift", ProbeConfig(max_train=128))
    assert t.test_idx is None and t.y_test.tolist() == [0, 1, 0, 1]
    assert len(t.train_idx) == 128 and t.y_train.mean() == 0.5
    assert trials(_dataset(400), "shift", ProbeConfig()) == []


def test_plan_rejects_a_training_size_larger_than_the_data() -> None:
    with pytest.raises(ValueError, match=r"train_sizes \[400\] are larger than the data"):
        check_plan([_dataset(400)], ProbeConfig(regimes=("scarcity",), train_sizes=(4, 400)))
    with pytest.raises(ValueError, match="'toy' has 60 rows: too few for the noise regime"):
        check_plan([_dataset(300), _dataset(60)], ProbeConfig(regimes=("noise",)))
    with pytest.raises(ValueError, match="covariate-shift test set"):
        check_plan([_dataset(300)], ProbeConfig(regimes=("shift",)))


def test_one_class_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'spam': label column 'y' has one class \(\['1'\]\)"):
        encode_labels("spam", "y", ["1", "1"])
    assert encode_labels("d", "y", ["10", "9", "9"]).tolist() == [1, 0, 0]  # numbers as numbers


def test_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"regimes=scarcity,drought: unknown \['drought'\]"):
        ProbeConfig(regimes="scarcity,drought")
    with pytest.raises(ValueError, match="tie_rule='first'"):
        ProbeConfig(tie_rule="first")
    with pytest.raises(ValueError, match="noise_fractions: 0.6"):
        ProbeConfig(noise_fractions=(0.6,))


# ---------------------------------------------------------------------------------------------
# probes


def _separable(n: int, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    X = rng.normal(size=(n, d))
    X[:, 0] += 3 * y
    return X, y


@pytest.mark.parametrize("name", ["logreg", "pca_logreg", "knn", "trees", "mlp"])
def test_every_baseline_learns_a_separable_task(name: str) -> None:
    X, y = _separable(200)
    X_test, y_test = _separable(200, seed=1)
    result = run_baseline(name, X, y, X_test, y_test, seed=42)
    assert result.test_auc > 0.9 and result.val_auc > 0.9 and not result.is_sae


def test_tree_draws_follow_the_paper_generator() -> None:
    draws = tree_draws(42)
    assert len(draws) == 10 and draws == tree_draws(42) and draws != tree_draws(1)
    assert all(50 <= d["n_estimators"] <= 250 and 2 <= d["max_depth"] <= 5 for d in draws)


def test_rank_latents_normalises_by_mean_nonzero_activation() -> None:
    y = np.array([0, 0, 1, 1])
    Z = np.array(
        [
            [0.0, 100.0, 0.0],  # latent 1: huge but fires on both classes alike
            [0.0, 110.0, 0.0],
            [1.0, 100.0, 0.0],  # latent 0: small, fires only on positives
            [1.0, 90.0, 50.0],  # latent 2: large raw difference (25), one positive only
        ]
    )
    # normalised differences: latent 0: 1.0, latent 2: 0.5, latent 1: ~0.05
    assert rank_latents(Z, y).tolist() == [0, 2, 1]


def test_sae_probe_finds_the_informative_latent() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 100)
    Z = np.maximum(rng.normal(size=(200, 64)), 0)
    Z[:, 37] = 2.0 * y + 0.1 * rng.random(200)
    results = sae_probe(Z[:150], y[:150], Z[150:], y[150:], ks=(1, 16))
    assert [r.method for r in results] == ["sae_l1_k1", "sae_l1_k16"]
    assert results[0].params["latents"] == [37] and results[0].test_auc == 1.0
    assert all(r.is_sae for r in results)


def test_warm_started_path_scores_like_cold_fits_where_lbfgs_converges() -> None:
    # A well-conditioned, noisy task: every cold L2 fit converges, so the warm-started path
    # must reach the same optimum at every C and choose the same C.
    X, y = _separable(300, d=6, seed=4)
    X[:, 0] = X[:, 0] / 3 + np.random.default_rng(5).normal(size=300)  # overlap the classes
    splits = validation_splits(y, seed=42)
    warm, _ = _path_scores(X, y, splits, "l2", seed=42)
    cold = [
        validation_auc(
            lambda a, b, c=c: LogisticRegression(C=c, max_iter=1000).fit(a, b).decision_function,
            X,
            y,
            splits,
        )
        for c in C_GRID
    ]
    np.testing.assert_allclose(warm, cold, atol=1e-3)
    X_test, y_test = _separable(200, d=6, seed=6)
    result = logreg(X, y, X_test, y_test)
    assert result.params["C"] == C_GRID[int(np.argmax(cold))]


def test_l1_probe_path_is_sparse_at_small_c_and_dense_at_large_c() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 100)
    Z = np.maximum(rng.normal(size=(200, 16)), 0)
    Z[:, 3] += y  # the one informative latent
    model = _logreg(None, "l1", seed=42, warm_start=True)
    nonzero = []
    for c in sorted(C_GRID):
        model.set_params(C=c).fit(Z, y)
        nonzero.append(int(np.count_nonzero(model.coef_)))
    assert nonzero[0] == 0 and nonzero[-1] > 8  # C = 1e-5 keeps nothing, C = 1e5 nearly all
    first = next(i for i, n in enumerate(nonzero) if n > 0)
    model = _logreg(sorted(C_GRID)[first], "l1", seed=42).fit(Z, y)
    assert np.flatnonzero(model.coef_[0]).tolist() == [3]  # the first latent in is the signal


# ---------------------------------------------------------------------------------------------
# thread limits of the fits (evaluation/probing_regimes/threads.py)


def _thread_counts() -> dict[str, int]:
    return {
        f"{lib['user_api']}:{lib['filepath']}": lib["num_threads"]
        for lib in threadpool_info()
        if lib["user_api"] in ("blas", "openmp")
    }


def test_fits_run_with_one_thread_per_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FIT_THREADS_ENV, raising=False)
    seen: list[dict[str, int]] = []

    def spy(X, y, X_test, y_test, seed: int = 42) -> MethodResult:  # noqa: ANN001
        seen.append(_thread_counts())
        return MethodResult("spy", 0.5, 0.5)

    monkeypatch.setitem(methods.BASELINE_FUNCTIONS, "spy", spy)
    before = _thread_counts()
    X, y = _separable(40)
    run_baseline("spy", X, y, X, y, seed=42)
    assert seen and set(seen[0].values()) == {1}
    assert _thread_counts() == before  # the caller's limits come back after the fit


def test_sae_probe_fits_inside_the_thread_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FIT_THREADS_ENV, raising=False)
    seen: list[dict[str, int]] = []
    real = methods.logreg

    def spy(*args, **kwargs) -> MethodResult:  # noqa: ANN002, ANN003
        seen.append(_thread_counts())
        return real(*args, **kwargs)

    monkeypatch.setattr(methods, "logreg", spy)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    Z = np.maximum(rng.normal(size=(60, 8)), 0)
    sae_probe(Z, y, Z, y, ks=(2,))
    assert seen and set(seen[0].values()) == {1}


def test_fit_thread_limit_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FIT_THREADS_ENV, raising=False)
    assert fit_thread_limit() == 1
    monkeypatch.setenv(FIT_THREADS_ENV, "none")
    assert fit_thread_limit() is None
    monkeypatch.setenv(FIT_THREADS_ENV, "2")
    assert fit_thread_limit() == 2
    for bad in ("0", "two"):
        monkeypatch.setenv(FIT_THREADS_ENV, bad)
        with pytest.raises(ValueError, match=FIT_THREADS_ENV):
            fit_thread_limit()


def test_nested_limits_are_one_controller_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    controller = threads._thread_controller()
    real = controller.limit
    monkeypatch.setattr(controller, "limit", lambda **kw: calls.append(kw) or real(**kw))
    with fit_threads(1), fit_threads(1):
        pass
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["logreg", "pca_logreg", "knn", "mlp"])
def test_limited_threads_give_the_unlimited_results(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path (one thread) computes the same method as the libraries' defaults: the
    # same chosen setting and the same AUCs on a task where every fit converges.
    X, y = _separable(200, d=12, seed=3)
    X[:, 0] = X[:, 0] / 3 + np.random.default_rng(7).normal(size=200)  # overlap the classes
    X_test, y_test = _separable(200, d=12, seed=8)
    runs = {}
    for limit in ("none", "1"):
        monkeypatch.setenv(FIT_THREADS_ENV, limit)
        runs[limit] = run_baseline(name, X, y, X_test, y_test, seed=42)
    assert runs["1"].params == runs["none"].params
    assert runs["1"].val_auc == pytest.approx(runs["none"].val_auc, abs=1e-6)
    assert runs["1"].test_auc == pytest.approx(runs["none"].test_auc, abs=1e-6)


def test_limited_threads_give_the_unlimited_sae_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 100)
    Z = np.maximum(rng.normal(size=(200, 32)), 0)
    Z[:, 5] += y
    runs = {}
    for limit in ("none", "1"):
        monkeypatch.setenv(FIT_THREADS_ENV, limit)
        runs[limit] = sae_probe(Z[:150], y[:150], Z[150:], y[150:], ks=(4, 16))
    for fast, ref in zip(runs["1"], runs["none"], strict=True):
        assert fast.params == ref.params
        assert fast.test_auc == pytest.approx(ref.test_auc, abs=1e-6)


@pytest.mark.parametrize("n", [2, 10, 60, 200])
def test_pca_logreg_refits_only_the_chosen_dimension_with_the_same_result(n: int) -> None:
    # The reference: every d searched and refitted on all rows, the best validation AUC kept
    # (the first of equal ones), as pca_logreg did before it refitted the chosen d only.
    X, y = _separable(n, d=12, seed=9)
    X[:, 0] = X[:, 0] / 3 + np.random.default_rng(10).normal(size=n)
    X_test, y_test = _separable(100, d=12, seed=11)
    scaler = StandardScaler().fit(X)
    top = min(n, 12, 100)
    pca = PCA(n_components=top, random_state=42).fit(scaler.transform(X))
    P, P_test = pca.transform(scaler.transform(X)), pca.transform(scaler.transform(X_test))
    splits = validation_splits(y, 42)
    dims = np.unique(np.logspace(0, np.log2(top), num=10, base=2, dtype=int))
    best = None
    for d in [int(d) for d in dims] if splits is not None else [top]:
        make = (
            {"C": 1.0},
            lambda: _logreg(None, seed=42),
        )
        r = methods._search("pca_logreg", [make], make, P[:, :d], y, P_test[:, :d], y_test, splits)
        if best is None or r.val_auc > best.val_auc:
            best, best.params = r, {"n_components": d}
    result = run_baseline("pca_logreg", X, y, X_test, y_test, seed=42)
    assert best is not None and result.params == best.params
    assert result.val_auc == best.val_auc and result.test_auc == best.test_auc
