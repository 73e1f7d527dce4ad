"""ProbeConfig: which datasets, which regimes, the regime grids and the quiver's tie rule.

The paper's grids (Kantamneni et al., sae-probes ``utils_data.py``) are module constants;
the defaults of :class:`ProbeConfig` thin them so that four regimes on the default subset
finish in minutes on a 2-core CPU. Pass the paper's values to reproduce its grids exactly:

| field | CPU default | paper |
|---|---|---|
| ``train_sizes`` (scarcity) | 2, 4, 14, 53, 198, 1024 | 20 log-spaced values 2 … 1024 |
| ``imbalance_ratios`` | 0.05, 0.2, 0.5, 0.8, 0.95 | 0.05 … 0.95 step 0.05 (19) |
| ``noise_fractions`` | 0, 0.1, 0.2, 0.3, 0.4, 0.5 | 0 … 0.5 step 0.05 (11) |
| ``baselines`` | logreg, pca_logreg, knn, mlp | the five, with ``trees`` |
| ``noise_baselines`` | logreg | logreg |
| ``max_rows`` | 1500 rows per dataset | 5000 (1500 for the shift training set) |
| ``max_seq_len`` | 256 tokens (left-truncated) | 1024 |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from project.checks import check_int, check_ints

REGIMES = ("scarcity", "imbalance", "noise", "shift", "standard")
DEFAULT_REGIMES = ("scarcity", "imbalance", "noise", "shift")
BASELINES = ("logreg", "pca_logreg", "knn", "trees", "mlp")
# Validation ties between methods: who gets the cell (see evaluation/probing_regimes/quiver.py).
TIE_RULES = ("baseline", "sae", "mean")


def paper_train_sizes() -> tuple[int, ...]:
    """The scarcity grid of the paper: round(2 ** linspace(1, 10, 20)), deduplicated."""
    points = np.unique(np.round(np.logspace(1, 10, num=20, base=2)).astype(int))
    return tuple(int(p) for p in points)


PAPER_TRAIN_SIZES = paper_train_sizes()
PAPER_IMBALANCE_RATIOS = tuple(round(float(r), 2) for r in np.linspace(0.05, 0.95, 19))
PAPER_NOISE_FRACTIONS = tuple(round(float(f), 2) for f in np.linspace(0, 0.5, 11))
PAPER_STANDARD_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PAPER_REGIME_KS = (16, 128)


def _tuple(values: object, kind: type) -> tuple:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    return tuple(kind(float(v)) if kind is int else kind(v) for v in values)  # type: ignore[arg-type]


@dataclass
class ProbeConfig:
    """Everything a probing run depends on (logged whole as run params).

    ``datasets``: ``default`` (the CPU subset of :data:`evaluation.probing_regimes.datasets.DEFAULT_DATASETS`),
    ``all`` (the paper's 113), or comma-separated names: sae-probes tags (``96_spam_is``),
    ``hf:NAME[@CONFIG]:TEXT_COL:LABEL_COL[:SPLIT]``, local ``PATH.csv|.jsonl|.tsv|.parquet
    [:TEXT_COL:LABEL_COL]``. ``tie_rule``: who gets a cell when an SAE probe and a baseline
    tie on validation AUC — ``baseline`` (default: an SAE probe must be strictly better, as an
    argmax over [baselines, SAE probes] in that order gives), ``sae``, or ``mean`` (the test
    AUCs of all tied methods are averaged).
    """

    datasets: str = "default"
    regimes: tuple[str, ...] = DEFAULT_REGIMES
    # Trees are opt-in on a CPU: 10 draws x every validation fold of HistGradientBoosting
    # cost ~100x a logistic regression (minutes per cell at n <= 53 on a shared 2-core box).
    baselines: tuple[str, ...] = ("logreg", "pca_logreg", "knn", "mlp")
    noise_baselines: tuple[str, ...] = ("logreg",)  # the paper's noise regime
    train_sizes: tuple[int, ...] = (2, 4, 14, 53, 198, 1024)
    imbalance_ratios: tuple[float, ...] = (0.05, 0.2, 0.5, 0.8, 0.95)
    noise_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    regime_ks: tuple[int, ...] = PAPER_REGIME_KS
    standard_ks: tuple[int, ...] = PAPER_STANDARD_KS
    max_train: int = 1024  # n of the imbalance, noise, shift and standard regimes (at most)
    min_test: int = 100  # rows kept for testing; scarcity skips n > rows - min_test
    max_rows: int = 1500
    max_seq_len: int = 256
    batch_size: int = 32
    tie_rule: str = "baseline"
    seed: int = 42
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        self.regimes = _tuple(self.regimes, str)
        self.baselines = _tuple(self.baselines, str)
        self.noise_baselines = _tuple(self.noise_baselines, str)
        self.train_sizes = _tuple(self.train_sizes, int)
        self.imbalance_ratios = _tuple(self.imbalance_ratios, float)
        self.noise_fractions = _tuple(self.noise_fractions, float)
        self.regime_ks = _tuple(self.regime_ks, int)
        self.standard_ks = _tuple(self.standard_ks, int)
        unknown = [r for r in self.regimes if r not in REGIMES]
        if unknown or not self.regimes:
            raise ValueError(
                f"probe regimes={','.join(self.regimes) or '(none)'}: unknown {unknown}; "
                f"valid: {', '.join(REGIMES)}"
            )
        for name in ("baselines", "noise_baselines"):
            values = getattr(self, name)
            unknown = [b for b in values if b not in BASELINES]
            if unknown or not values:
                raise ValueError(
                    f"probe {name}={','.join(values) or '(none)'}: unknown {unknown}; "
                    f"valid: {', '.join(BASELINES)}"
                )
        if self.tie_rule not in TIE_RULES:
            raise ValueError(f"probe tie_rule={self.tie_rule!r} is not one of {TIE_RULES}")
        for name in ("train_sizes", "regime_ks", "standard_ks"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"probe {name} is empty")
            for v in values:
                check_int(name, v, 1)
        for n in self.train_sizes:
            check_int("train_sizes", n, 2)  # a probe needs one example of each class
        for r in self.imbalance_ratios:
            if not 0 < r < 1:
                raise ValueError(f"probe imbalance_ratios: {r!r} must lie in (0, 1)")
        for f in self.noise_fractions:
            if not 0 <= f <= 0.5:
                raise ValueError(f"probe noise_fractions: {f!r} must lie in [0, 0.5]")
        check_ints(
            self,
            {"max_train": 2, "min_test": 2, "max_rows": 4, "max_seq_len": 2, "batch_size": 1},
        )
