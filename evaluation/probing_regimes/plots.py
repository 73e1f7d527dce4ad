"""Figures in the paper's form, from a regime's quiver table (one row per cell).

- scarcity / imbalance / noise: mean test AUC over datasets against the regime's axis, for
  the quiver without SAE probes, with them, and the best SAE probe alone;
- shift: bars per dataset (without SAE probes, SAE probe alone, with);
- every regime: with-SAE against without-SAE test AUC, one point per cell, and the diagonal.
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

AXIS_LABELS = {
    "scarcity": "training examples n",
    "imbalance": "positive share of training and test sets",
    "noise": "share of training labels flipped",
}
SERIES = (
    ("auc_without_sae", "baselines (quiver)", "tab:blue"),
    ("auc_with_sae", "baselines + SAE probes (quiver)", "tab:orange"),
    ("auc_sae_only", "SAE probe alone", "tab:green"),
)


def _title(ax: plt.Axes, title: str) -> None:
    """A title wrapped to its figure's width (a model URI and tie rule overflow narrow plots)."""
    chars_per_line = int(ax.figure.get_figwidth() * 11)  # ~11 characters per inch at size 9
    ax.set_title(textwrap.fill(title, chars_per_line, break_on_hyphens=False), fontsize=9)


def regime_curve(quiver: pd.DataFrame, regime: str, title: str) -> Figure:
    """Mean test AUC over datasets against the regime's axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    means = quiver.groupby("value")[[s for s, _, _ in SERIES]].mean().sort_index()
    for column, label, color in SERIES:
        ax.plot(means.index, means[column], marker="o", label=label, color=color)
    if regime == "scarcity":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(AXIS_LABELS.get(regime, "value"))
    ax.set_ylabel(f"test ROC-AUC (mean of {quiver['dataset'].nunique()} datasets)")
    _title(ax, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def shift_bars(quiver: pd.DataFrame, title: str) -> Figure:
    """Per dataset: test AUC on the covariate-shift set, three bars."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(quiver)), 4))
    x = np.arange(len(quiver))
    width = 0.27
    for i, (column, label, color) in enumerate(SERIES):
        ax.bar(x + (i - 1) * width, quiver[column], width, label=label, color=color)
    ax.set_xticks(x, quiver["dataset"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test ROC-AUC on the shifted set")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    _title(ax, title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def with_vs_without(quiver: pd.DataFrame, title: str) -> Figure:
    """One point per cell: with SAE probes (y) against without (x)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    chosen = quiver["sae_chosen"] > 0
    ax.scatter(
        quiver.loc[~chosen, "auc_without_sae"],
        quiver.loc[~chosen, "auc_with_sae"],
        s=14,
        color="tab:blue",
        label="a baseline chosen",
    )
    ax.scatter(
        quiver.loc[chosen, "auc_without_sae"],
        quiver.loc[chosen, "auc_with_sae"],
        s=14,
        color="tab:orange",
        label="an SAE probe chosen",
    )
    low = float(min(quiver["auc_without_sae"].min(), quiver["auc_with_sae"].min(), 0.5))
    ax.plot([low, 1], [low, 1], color="gray", lw=0.8)
    ax.set_xlabel("test AUC without SAE probes")
    ax.set_ylabel("test AUC with SAE probes")
    _title(ax, title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(quiver: pd.DataFrame, regime: str, title: str) -> dict[str, Figure]:
    """Artifact name → figure for one regime's quiver table."""
    out = {f"plots/{regime}_with_vs_without.png": with_vs_without(quiver, title)}
    if regime in AXIS_LABELS:
        out[f"plots/{regime}_auc.png"] = regime_curve(quiver, regime, title)
    elif regime in ("shift", "standard"):
        out[f"plots/{regime}_bars.png"] = shift_bars(quiver, title)
    return out


def close(figs: dict[str, Figure]) -> None:
    for fig in figs.values():
        plt.close(fig)
