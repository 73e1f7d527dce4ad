"""Figures logged with the scores table: the ΔC_k distribution over latents with the selected
tails shaded (the DTC paper's Figure 3), and the output score against DTC."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402


def dtc_distribution(dtc_F: Tensor, live_F: Tensor, q: float = 0.95, title: str = "") -> Figure:
    """Histogram of ΔC_k over live latents; the UP tail (≥ q-quantile) and the DOWN tail
    (≤ (1 − q)-quantile) shaded."""
    values = dtc_F[live_F.bool() & torch.isfinite(dtc_F)].double()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if len(values) == 0:
        ax.text(0.5, 0.5, "no live latent", ha="center", transform=ax.transAxes)
        return fig
    up, down = float(torch.quantile(values, q)), float(torch.quantile(values, 1 - q))
    ax.hist(values.numpy(), bins=80, color="0.35")
    lo, hi = float(values.min()), float(values.max())
    ax.axvspan(up, hi, color="tab:red", alpha=0.25, label=f"UP tail (q={q:g})")
    ax.axvspan(lo, down, color="tab:blue", alpha=0.25, label=f"DOWN tail (q={q:g})")
    ax.set_yscale("log")
    ax.set_xlabel("ΔC_k (intervened − clean token confidence)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"ΔC_k over {len(values)} live latents")
    ax.legend()
    fig.tight_layout()
    return fig


def output_vs_dtc(
    output_F: Tensor, dtc_F: Tensor, dtc_alone_F: Tensor, live_F: Tensor, title: str = ""
) -> Figure:
    """Scatter of the output score against ΔC_k (both interventions) over live latents."""
    keep = live_F.bool() & torch.isfinite(output_F) & torch.isfinite(dtc_F)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(dtc_F[keep].numpy(), output_F[keep].numpy(), s=4, alpha=0.5, label="in place")
    ax.scatter(
        dtc_alone_F[keep].numpy(), output_F[keep].numpy(), s=4, alpha=0.5, label="decoded alone"
    )
    ax.set_xlabel("ΔC_k")
    ax.set_ylabel("output score S_out")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title or "output score vs Delta Token Confidence")
    ax.legend()
    fig.tight_layout()
    return fig
