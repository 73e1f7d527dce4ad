"""The paper's validation scheme, chosen by training-set size n (sae-probes ``get_cv``):

- n ≤ 3: no split; a method is scored by its training AUC (``None`` here);
- n ≤ 12: leave-two-out (every pair of rows is a validation set);
- 12 < n < 128: six-fold stratified CV, shuffled with the seed;
- n ≥ 128: one holdout, the last min(int(0.2 n), 100) rows.

Folds are kept only if their validation part has both classes (an AUC needs both); where no
fold survives, scoring falls back to training AUC, as for n ≤ 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import combinations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

Split = tuple[np.ndarray, np.ndarray]


def scheme(n: int) -> str:
    """The name of the scheme for n training rows: train_auc, leave_two_out, six_fold, holdout."""
    if n <= 3:
        return "train_auc"
    if n <= 12:
        return "leave_two_out"
    if n < 128:
        return "six_fold"
    return "holdout"


def validation_splits(y: np.ndarray, seed: int) -> list[Split] | None:
    """(train indices, validation indices) pairs for labels ``y``; None means training AUC."""
    y = np.asarray(y)
    n = len(y)
    kind = scheme(n)
    if kind == "train_auc":
        return None
    if kind == "leave_two_out":
        every = np.arange(n)
        splits = [(np.setdiff1d(every, pair), np.array(pair)) for pair in combinations(range(n), 2)]
    elif kind == "six_fold":
        if np.bincount(y, minlength=2).max() < 6:
            # StratifiedKFold refuses when every class is smaller than the fold count.
            return None
        folds = StratifiedKFold(n_splits=6, shuffle=True, random_state=seed)
        splits = list(folds.split(np.zeros(n), y))
    else:
        val_size = min(int(0.2 * n), 100)
        splits = [(np.arange(n - val_size), np.arange(n - val_size, n))]
    kept = [(tr, va) for tr, va in splits if len(np.unique(y[va])) == 2]
    return kept or None


def safe_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC, or 0.5 when ``y`` has one class (a tie, not an error)."""
    if len(np.unique(y)) < 2:
        return 0.5
    return float(roc_auc_score(y, scores))


Fit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def validation_auc(fit: Fit, X: np.ndarray, y: np.ndarray, splits: list[Split] | None) -> float:
    """Mean validation AUC of ``fit`` (X, y → a scoring function) over ``splits``; training AUC
    when ``splits`` is None. A training fold with one class scores 0.5 (the paper's rule)."""
    if splits is None:
        return safe_auc(y, fit(X, y)(X)) if len(np.unique(y)) == 2 else 0.5
    scores = []
    for tr, va in splits:
        if len(np.unique(y[tr])) < 2:
            scores.append(0.5)
            continue
        scores.append(safe_auc(y[va], fit(X[tr], y[tr])(X[va])))
    return float(np.mean(scores)) if scores else math.nan
