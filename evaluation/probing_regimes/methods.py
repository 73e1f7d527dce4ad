"""The probes: five baselines on raw activations and the SAE probes, each with the paper's
hyperparameter search (sae-probes ``utils_training.py``), scored by validation AUC
(evaluation/probing_regimes/validation.py) and then refit on the whole training set for test AUC.

Baselines:

- ``logreg``: L2 logistic regression on the raw activations, C ∈ logspace(5, −5, 10).
- ``pca_logreg``: standardise, PCA to d ∈ unique(2 ** linspace(0, log2(min(n, D, 100)), 10))
  (the PCA fitted on the whole training set, as the paper's code does), logistic regression.
- ``knn``: standardise, k ∈ unique(2 ** linspace(0, log2(kmax), 10)) with
  kmax = min(n − 1, 100, smallest training fold).
- ``trees``: gradient-boosted trees, scikit-learn's ``HistGradientBoostingClassifier``
  (already a dependency; the paper uses XGBoost). The paper's 10 random draws are made with
  the same generator and mapped onto its parameters: trees → ``max_iter``, depth →
  ``max_depth``, learning rate → ``learning_rate``, colsample_bytree → ``max_features``
  (per split, not per tree), reg_lambda → ``l2_regularization``, min_child_weight →
  ``min_samples_leaf``. ``subsample`` (rows) and ``reg_alpha`` (L1) have no counterpart:
  they are drawn, to keep the draws identical, and recorded, but unused.
- ``mlp``: standardise, one random draw of hidden layers (16/32/64 wide, 1–3 deep), learning
  rate logspace(−4, −2, 5), alpha logspace(−5, −2, 5); Adam, 1000 iterations.

SAE probe (:func:`sae_probe`): latents ranked by |mean(z|y=1) − mean(z|y=0)| on the training
set after dividing each latent by its mean non-zero |activation| there; the top k raw latents
feed an L1 logistic regression (saga, as the paper) with the same C grid.

How the C grid is searched (a deviation in cost, not in method): the paper fits every
(C, validation split) from zero with ``max_iter=1000``. Here each split is fitted once along
the grid, smallest C first, each fit warm-started from the previous one, and the refit on all
rows starts from the chosen C's solution on the last split. For ``logreg`` (lbfgs) this
reaches the same optimum sooner (cold lbfgs stops at its 1000-iteration cap at large C on
SmolLM2's raw residuals; warm, it converges). For the SAE probe saga never converges on raw
latents (SmolLM2 TopK latents are ~100 in size; saga hits its cap at every C ≥ 1 with or
without standardising), so its result at large C is set by the iteration budget: the path
gives each C :data:`L1_MAX_ITER_PER_C` = 100 epochs, ~1000 cumulated by the large-C end, as
the paper's cold fits get. Measured on 92_glue_sst2 (bench/bench_probe.py): the scarcity
regime's SAE probes went from 26.6 s at n = 14 and > 120 s at n = 53 (liblinear, cold, 1000
iterations) to 5.5 s for all six sizes. liblinear is not used: at n = 1024, k = 128 it took
~60 s per C.

At n ≤ 3 every method is fitted with its default setting and scored by training AUC.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from evaluation.probing_regimes.threads import fit_threads
from evaluation.probing_regimes.validation import Split, safe_auc, validation_auc, validation_splits

C_GRID = tuple(float(c) for c in np.logspace(5, -5, 10))
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass
class MethodResult:
    """One method on one (dataset, regime value): validation and test AUC, chosen setting."""

    method: str
    val_auc: float
    test_auc: float
    params: dict[str, object] = field(default_factory=dict)
    is_sae: bool = False


def _proba(model: object) -> Scorer:
    return lambda X: model.predict_proba(X)[:, 1]  # type: ignore[attr-defined]


def _search(
    method: str,
    candidates: list[tuple[dict[str, object], Callable[[], object]]],
    default: tuple[dict[str, object], Callable[[], object]],
    X: np.ndarray,
    y: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    splits: list[Split] | None,
    is_sae: bool = False,
) -> MethodResult:
    """Pick the first candidate with the best validation AUC, refit on all of X, test it."""
    if splits is None:
        params, make = default
        best_val = validation_auc(lambda a, b: _proba(make().fit(a, b)), X, y, None)
    else:
        best_val, params, make = -np.inf, default[0], default[1]
        for cand_params, cand_make in candidates:

            def fit(a: np.ndarray, b: np.ndarray, m: Callable[[], object] = cand_make) -> Scorer:
                return _proba(m().fit(a, b))  # type: ignore[attr-defined]

            score = validation_auc(fit, X, y, splits)
            if score > best_val:  # strict: the first of equal scores is kept
                best_val, params, make = score, cand_params, cand_make
    model = make().fit(X, y)  # type: ignore[attr-defined]
    test = safe_auc(y_test, _proba(model)(X_test))
    return MethodResult(method, float(best_val), test, dict(params), is_sae)


# Iterations per C of the L1 path: saga runs to its cap at every C of the grid on SAE latents
# (the paper's 1000 too); warm-started along the path, 100 per C give the large-C fits ~1000
# epochs in all at a tenth of the cost (bench/bench_probe.py).
L1_MAX_ITER_PER_C = 100
L2_MAX_ITER = 1000  # the paper's cap; lbfgs converges well within it once warm-started


def _logreg(
    C: float | None = None, penalty: str = "l2", seed: int = 42, warm_start: bool = False
) -> LogisticRegression:
    kwargs: dict[str, object] = {"random_state": seed, "warm_start": warm_start}
    if C is not None:
        kwargs["C"] = C
    if penalty == "l1":
        max_iter = L1_MAX_ITER_PER_C if warm_start else L2_MAX_ITER
        kwargs.update(l1_ratio=1.0, solver="saga", max_iter=max_iter)
    else:
        kwargs["max_iter"] = L2_MAX_ITER
    return LogisticRegression(**kwargs)


def _path_scores(
    X: np.ndarray, y: np.ndarray, splits: list[Split], penalty: str, seed: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray] | None]]:
    """Validation AUC of every C of :data:`C_GRID` (mean over ``splits``), each split fitted
    along the grid from the smallest C up with warm starts; and, per C, the last split's
    (coef, intercept), from which the refit on all rows starts."""
    ascending = np.argsort(C_GRID)
    scores = np.zeros((len(splits), len(C_GRID)))
    solutions: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(C_GRID)
    for s, (tr, va) in enumerate(splits):
        if len(np.unique(y[tr])) < 2:
            scores[s] = 0.5  # the paper's rule for a one-class training fold
            continue
        model = _logreg(None, penalty, seed, warm_start=True)
        for j in ascending:
            model.set_params(C=C_GRID[j]).fit(X[tr], y[tr])
            scores[s, j] = safe_auc(y[va], model.decision_function(X[va]))
            solutions[j] = (model.coef_.copy(), model.intercept_.copy())
    return scores.mean(axis=0), solutions


def logreg(X, y, X_test, y_test, seed: int = 42, penalty: str = "l2", method: str = "logreg"):  # noqa: ANN001, ANN201
    """L2 (or L1) logistic regression over the C grid: the grid searched as one warm-started
    path per validation split, then a refit on all rows from that split's solution."""
    splits = validation_splits(y, seed)
    if splits is None:
        default = ({"C": 1.0}, lambda: _logreg(None, penalty, seed))
        return _search(method, [], default, X, y, X_test, y_test, None, penalty == "l1")
    mean_scores, solutions = _path_scores(X, y, splits, penalty, seed)
    best = int(np.argmax(mean_scores))  # C_GRID descends: ties go to the larger C, as in the paper
    model = _logreg(C_GRID[best], penalty, seed, warm_start=True)
    start = solutions[best]
    if start is not None:
        model.coef_, model.intercept_ = start[0].copy(), start[1].copy()
    model.fit(X, y)
    test = safe_auc(y_test, model.decision_function(X_test))
    params = {"C": float(C_GRID[best])}
    return MethodResult(method, float(mean_scores[best]), test, params, penalty == "l1")


def pca_logreg(X, y, X_test, y_test, seed: int = 42, max_components: int = 100):  # noqa: ANN001, ANN201
    """Standardise, PCA (fitted on the whole training set), logistic regression."""
    scaler = StandardScaler().fit(X)
    Xs, Xs_test = scaler.transform(X), scaler.transform(X_test)
    top = min(X.shape[0], X.shape[1], max_components)
    pca = PCA(n_components=top, random_state=seed).fit(Xs)
    P, P_test = pca.transform(Xs), pca.transform(Xs_test)
    dims = np.unique(np.logspace(0, np.log2(top), num=10, base=2, dtype=int))
    splits = validation_splits(y, seed)
    dims_used = [int(d) for d in dims] if splits is not None else [top]

    def fit(a: np.ndarray, b: np.ndarray) -> Scorer:
        return _proba(_logreg(None, seed=seed).fit(a, b))

    # Each d scored on validation; only the chosen d is refitted on all rows for its test
    # AUC (refitting every d, as before, gave the same result for ~10x the refits).
    best_d, best_val = dims_used[0], validation_auc(fit, P[:, : dims_used[0]], y, splits)
    for d in dims_used[1:]:
        score = validation_auc(fit, P[:, :d], y, splits)
        if score > best_val:  # strict: the first of equal scores is kept
            best_d, best_val = d, score
    model = _logreg(None, seed=seed).fit(P[:, :best_d], y)
    test = safe_auc(y_test, _proba(model)(P_test[:, :best_d]))
    return MethodResult("pca_logreg", float(best_val), test, {"n_components": best_d})


def knn(X, y, X_test, y_test, seed: int = 42):  # noqa: ANN001, ANN201
    """Standardise, k nearest neighbours over a log grid of k."""
    scaler = StandardScaler().fit(X)
    Xs, Xs_test = scaler.transform(X), scaler.transform(X_test)
    splits = validation_splits(y, seed)
    default = ({"n_neighbors": 1}, lambda: KNeighborsClassifier(n_neighbors=1))
    candidates = []
    if splits is not None:
        kmax = min(X.shape[0] - 1, 100, min(len(tr) for tr, _ in splits))
        ks = np.unique(np.logspace(0, np.log2(max(kmax, 1)), num=10, base=2, dtype=int))
        candidates = [
            ({"n_neighbors": int(k)}, lambda k=int(k): KNeighborsClassifier(n_neighbors=k))
            for k in ks
        ]
    return _search("knn", candidates, default, Xs, y, Xs_test, y_test, splits)


TREE_SPACE: dict[str, list[float]] = {
    "n_estimators": list(range(50, 300, 50)),
    "max_depth": list(range(2, 6)),
    "learning_rate": [float(v) for v in np.logspace(-3, -1, num=10)],
    "subsample": [float(v) for v in np.linspace(0.7, 1.0, num=5)],
    "colsample_bytree": [float(v) for v in np.linspace(0.7, 1.0, num=5)],
    "reg_alpha": [float(v) for v in np.logspace(-3, 1, num=10)],
    "reg_lambda": [float(v) for v in np.logspace(-3, 1, num=10)],
    "min_child_weight": list(range(1, 10)),
}


def tree_draws(seed: int, n_draws: int = 10) -> list[dict[str, float]]:
    """The paper's random draws of XGBoost parameters (same generator, same order)."""
    rng = random.Random(seed)
    return [{k: rng.choice(v) for k, v in TREE_SPACE.items()} for _ in range(n_draws)]


def _hgb(draw: dict[str, float] | None, seed: int) -> HistGradientBoostingClassifier:
    if draw is None:
        return HistGradientBoostingClassifier(early_stopping=False, random_state=seed)
    return HistGradientBoostingClassifier(
        max_iter=int(draw["n_estimators"]),
        max_depth=int(draw["max_depth"]),
        learning_rate=float(draw["learning_rate"]),
        max_features=float(draw["colsample_bytree"]),
        l2_regularization=float(draw["reg_lambda"]),
        min_samples_leaf=int(draw["min_child_weight"]),
        early_stopping=False,
        random_state=seed,
    )


def trees(X, y, X_test, y_test, seed: int = 42):  # noqa: ANN001, ANN201
    """Standardise, gradient-boosted trees, best of the paper's 10 random draws."""
    scaler = StandardScaler().fit(X)
    Xs, Xs_test = scaler.transform(X), scaler.transform(X_test)
    splits = validation_splits(y, seed)
    candidates = [(dict(d), lambda d=d: _hgb(d, seed)) for d in tree_draws(seed)]
    return _search(
        "trees", candidates, ({}, lambda: _hgb(None, seed)), Xs, y, Xs_test, y_test, splits
    )


MLP_LAYERS = (
    (16,),
    (32,),
    (64,),
    (16, 16),
    (32, 32),
    (64, 64),
    (16, 16, 16),
    (32, 32, 32),
    (64, 64, 64),
)
MLP_LRS = tuple(float(v) for v in np.logspace(-4, -2, num=5))
MLP_ALPHAS = tuple(float(v) for v in np.logspace(-5, -2, num=5))


def mlp_draw(seed: int) -> dict[str, object]:
    """The paper's one random MLP setting (numpy RandomState, same order of draws)."""
    rng = np.random.RandomState(seed)
    layers = MLP_LAYERS[rng.randint(len(MLP_LAYERS))]
    lr = MLP_LRS[rng.randint(len(MLP_LRS))]
    alpha = float(rng.choice(MLP_ALPHAS))
    return {"hidden_layer_sizes": layers, "learning_rate_init": lr, "alpha": alpha}


def mlp(X, y, X_test, y_test, seed: int = 42):  # noqa: ANN001, ANN201
    """Standardise, a one-draw MLP search (the paper's n_iter = 1)."""
    scaler = StandardScaler().fit(X)
    Xs, Xs_test = scaler.transform(X), scaler.transform(X_test)
    splits = validation_splits(y, seed)
    draw = mlp_draw(seed)

    def make(params: dict[str, object]) -> Callable[[], MLPClassifier]:
        return lambda: MLPClassifier(max_iter=1000, random_state=seed, **params)  # type: ignore[arg-type]

    default_params: dict[str, object] = {"hidden_layer_sizes": (32,)}
    return _search(
        "mlp",
        [(draw, make(draw))],
        (default_params, make(default_params)),
        Xs,
        y,
        Xs_test,
        y_test,
        splits,
    )


BASELINE_FUNCTIONS = {
    "logreg": logreg,
    "pca_logreg": pca_logreg,
    "knn": knn,
    "trees": trees,
    "mlp": mlp,
}


def run_baseline(
    name: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int
) -> MethodResult:
    """One baseline by name (a key of :data:`BASELINE_FUNCTIONS`), convergence warnings muted,
    BLAS and OpenMP limited to one thread (evaluation/probing_regimes/threads.py)."""
    with warnings.catch_warnings(), fit_threads():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        return BASELINE_FUNCTIONS[name](X, y, X_test, y_test, seed=seed)


# ---------------------------------------------------------------------------------------------
# SAE probes


def rank_latents(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Latent indices by |mean(z|y=1) − mean(z|y=0)|, each latent first divided by its mean
    non-zero |activation| on these rows (so rarely-firing, strong latents are not favoured
    for their scale); descending, ties by index."""
    Z = np.asarray(Z, dtype=np.float64)
    nonzero = (Z != 0).sum(axis=0)
    scale = np.abs(Z).sum(axis=0) / (nonzero + 1e-6)
    Zn = Z / (scale + 1e-6)
    diff = Zn[y == 1].mean(axis=0) - Zn[y == 0].mean(axis=0)
    return np.argsort(-np.abs(diff), kind="stable")


def sae_probe(
    Z: np.ndarray,
    y: np.ndarray,
    Z_test: np.ndarray,
    y_test: np.ndarray,
    ks: tuple[int, ...],
    seed: int = 42,
) -> list[MethodResult]:
    """One L1 logistic-regression probe per k on the top-k ranked latents (``sae_l1_k{k}``),
    BLAS and OpenMP limited as in :func:`run_baseline`."""
    order = rank_latents(Z, y)
    results = []
    with warnings.catch_warnings(), fit_threads():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        for k in ks:
            top = order[: min(k, Z.shape[1])]
            result = logreg(
                Z[:, top], y, Z_test[:, top], y_test, seed=seed, penalty="l1", method=f"sae_l1_k{k}"
            )
            result.params["latents"] = [int(i) for i in top[:16]]
            results.append(result)
    return results
