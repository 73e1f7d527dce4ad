"""The four regimes (and the standard setting) as lists of trials: which rows train, which
rows test, and which labels the probes see (sae-probes ``utils_data.py`` / ``run_baselines.py``).

- ``scarcity``: balanced training sets of n rows for n in ``train_sizes`` (n > rows − min_test
  skipped), tested on the rest (balanced as far as the rows allow);
- ``imbalance``: positive share r of both training and test sets, n = min(max_total − min_test,
  max_train) with max_total the largest set that every ratio in 0.05 … 0.95 can fill;
- ``noise``: a balanced training set of n = min(rows − min_test, max_train) rows with a share f
  of its labels flipped; the test labels stay clean;
- ``shift``: n = min(rows, max_train) balanced in-distribution training rows, tested on the
  dataset's covariate-shift set (datasets without one are skipped);
- ``standard``: as noise with f = 0 (the SAE probes get the paper's full k sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.probing_regimes.config import PAPER_IMBALANCE_RATIOS, ProbeConfig
from evaluation.probing_regimes.datasets import ProbeDataset


@dataclass
class Trial:
    """One cell of a regime: a dataset at one value of the regime's axis."""

    dataset: str
    regime: str
    value: float
    train_idx: np.ndarray  # rows of the dataset
    y_train: np.ndarray  # the labels the probes are trained on (noisy in the noise regime)
    test_idx: np.ndarray | None  # rows of the dataset; None: the covariate-shift test set
    y_test: np.ndarray  # clean


def train_test_indices(
    y: np.ndarray, num_train: int, num_test: int, pos_ratio: float = 0.5, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's sampler: ceil(r·n) positives and the rest negatives for training, drawn
    without replacement, then the test set from the remaining rows at the same ratio (capped
    by what remains); both shuffled. ValueError if the training set cannot be filled."""
    rng = np.random.RandomState(seed)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    pos_train = int(np.ceil(pos_ratio * num_train))
    neg_train = num_train - pos_train
    if pos_train > len(pos) or neg_train > len(neg):
        raise ValueError(
            f"a training set of {num_train} rows at positive ratio {pos_ratio:g} needs "
            f"{pos_train} positives and {neg_train} negatives; the data has {len(pos)} and {len(neg)}"
        )
    pos_test = int(np.ceil(pos_ratio * num_test))
    neg_test = num_test - pos_test
    train_pos = rng.choice(pos, size=pos_train, replace=False)
    train_neg = rng.choice(neg, size=neg_train, replace=False)
    rest_pos, rest_neg = np.setdiff1d(pos, train_pos), np.setdiff1d(neg, train_neg)
    test_pos = rng.choice(rest_pos, size=min(pos_test, len(rest_pos)), replace=False)
    test_neg = rng.choice(rest_neg, size=min(neg_test, len(rest_neg)), replace=False)
    train = rng.permutation(np.concatenate([train_pos, train_neg]))
    test = rng.permutation(np.concatenate([test_pos, test_neg]))
    return train, test


def corrupt_labels(y: np.ndarray, fraction: float, seed: int = 42) -> np.ndarray:
    """A copy of ``y`` with int(len(y) · fraction) labels, chosen at random, flipped."""
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"noise fraction {fraction!r} must lie in [0, 0.5]")
    rng = np.random.RandomState(seed)
    flip = rng.choice(len(y), size=int(len(y) * fraction), replace=False)
    noisy = np.array(y, copy=True)
    noisy[flip] = 1 - noisy[flip]
    return noisy


def imbalance_sizes(y: np.ndarray, config: ProbeConfig) -> tuple[int, int]:
    """(num_train, num_test) of the imbalance regime: the largest total every ratio of the
    paper's grid can fill, less ``min_test`` rows for testing, at most ``max_train``."""
    low, high = min(PAPER_IMBALANCE_RATIOS), max(PAPER_IMBALANCE_RATIOS)
    n_pos = int(np.sum(y))
    n_neg = len(y) - n_pos
    max_total = int(min(n_neg / (1 - low), n_pos / high))
    num_train = min(max_total - config.min_test, config.max_train)
    return num_train, max(config.min_test, max_total - num_train - 1)


def trials(dataset: ProbeDataset, regime: str, config: ProbeConfig) -> list[Trial]:
    """The trials of one regime on one dataset (possibly none: see the module docstring)."""
    y, size, seed = dataset.labels, dataset.size, config.seed
    out: list[Trial] = []

    def add(value: float, n: int, num_test: int, ratio: float = 0.5, noise: float = 0.0) -> None:
        train, test = train_test_indices(y, n, num_test, ratio, seed)
        y_train = corrupt_labels(y[train], noise, seed) if noise else y[train]
        if len(np.unique(y[test])) < 2:
            return  # a test set with one class has no AUC
        out.append(Trial(dataset.name, regime, value, train, y_train, test, y[test]))

    if regime == "scarcity":
        for n in config.train_sizes:
            if n <= size - config.min_test:
                add(float(n), n, size - n - 1)
    elif regime == "imbalance":
        n, num_test = imbalance_sizes(y, config)
        if n >= 2:
            for ratio in config.imbalance_ratios:
                add(float(ratio), n, num_test, ratio=ratio)
    elif regime in ("noise", "standard"):
        n = min(size - config.min_test, config.max_train)
        if n >= 2:
            for fraction in config.noise_fractions if regime == "noise" else (0.0,):
                add(float(fraction), n, size - n - 1, noise=fraction)
    elif regime == "shift":
        if dataset.ood_labels is not None and len(np.unique(dataset.ood_labels)) == 2:
            n = min(size, config.max_train)
            train, _ = train_test_indices(y, n, 0, 0.5, seed)
            out.append(Trial(dataset.name, regime, 0.0, train, y[train], None, dataset.ood_labels))
    else:
        raise ValueError(f"unknown regime {regime!r}")
    return out


def check_plan(datasets: list[ProbeDataset], config: ProbeConfig) -> dict[str, list[Trial]]:
    """All trials by regime, or a ValueError naming the value when a requested size cannot run
    on any dataset, a dataset gives a regime nothing to run, or shift has no test set."""
    largest = max(d.size for d in datasets)
    if "scarcity" in config.regimes:
        too_big = [n for n in config.train_sizes if n > largest - config.min_test]
        if too_big:
            raise ValueError(
                f"probe train_sizes {too_big} are larger than the data: the largest dataset "
                f"has {largest} rows and {config.min_test} are kept for testing "
                f"(max_rows={config.max_rows}, min_test={config.min_test})"
            )
    plan: dict[str, list[Trial]] = {}
    for regime in config.regimes:
        plan[regime] = []
        for dataset in datasets:
            found = trials(dataset, regime, config)
            if not found and regime != "shift":
                raise ValueError(
                    f"probing dataset {dataset.name!r} has {dataset.size} rows: too few for "
                    f"the {regime} regime, which keeps {config.min_test} rows for testing "
                    "(lower min_test or drop the dataset)"
                )
            plan[regime].extend(found)
        if regime == "shift" and not plan[regime]:
            raise ValueError(
                "the shift regime needs a dataset with a covariate-shift test set; none of "
                f"{[d.name for d in datasets]} has one (sae-probes ships "
                f"{', '.join(n.removesuffix('_OOD') for n in _ood_names())})"
            )
    return plan


def _ood_names() -> list[str]:
    from project import sae_probes

    try:
        return sae_probes.ood_dataset_names()
    except ValueError:
        return []
