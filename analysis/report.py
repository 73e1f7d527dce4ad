"""The study's plots and its one-file HTML report (images embedded, readable in the MLflow UI).

Plots (PNG, matplotlib's Agg backend so no display is needed):
- ``mu_vs_g.png``: µ against g, coloured by architecture, marker size by sparsity (L0);
- ``tau_by_group.png``: τ_b of every Ψ group with its interval;
- ``steering_by_architecture.png``: steering score by architecture × selection (the paper's
  Figure 4).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.stats import AXIS_MEANING, GroupTau  # noqa: E402

# METHODS §6: the interpretability-vs-utility paper (90 SAEs, 30 per LLM, 16k wide).
PAPER = {
    "tau_b": "0.2979 (95% CI 0.159–0.419)",
    "psi_A": "0.2575",
    "psi_B": "0.1651",
    "psi_C": "0.3272",
    "psi": "0.2499",
    "gain_tau_b": "−0.0692 (CI −0.20–0.07), Ψ = −0.0568 (after DTC selection)",
}


@dataclass
class Figure:
    name: str
    png: bytes


@dataclass
class Report:
    """Everything the HTML page shows; the entry point also logs its parts separately."""

    title: str
    headline: dict[str, float]
    psi: dict[str, dict[str, float]]
    groups: list[GroupTau]
    table: pd.DataFrame
    missing: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    gain: list[dict[str, object]] = field(default_factory=list)  # one row per steering score
    settings: dict[str, str] = field(default_factory=dict)
    # How the headline interval and p-value were made (tau_b_ci_method, tau_b_p_method).
    methods: dict[str, str] = field(default_factory=dict)
    # τ_b per steering score (the chosen one first; its companion where runs logged it).
    side_by_side: list[dict[str, object]] = field(default_factory=list)
    run_groups: dict[str, str] = field(default_factory=dict)  # the config groups read


def _png(fig: plt.Figure) -> bytes:
    # The figures lay themselves out (layout="tight"): bbox_inches="tight" would draw every
    # figure twice, which for ~200 labelled groups cost seconds.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_mu_vs_g(table: pd.DataFrame, mu_label: str, g_label: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="tight")
    l0 = table["l0"].to_numpy(dtype=float)
    finite = l0[np.isfinite(l0)]
    scale = (
        30 + 170 * (np.log(l0) - np.log(finite.min())) / max(np.ptp(np.log(finite)), 1e-9)
        if len(finite)
        else 60
    )
    sizes = np.where(np.isfinite(l0), scale, 60)
    for architecture, rows in table.groupby("architecture", sort=True):
        mask = (table["architecture"] == architecture).to_numpy()
        ax.scatter(rows["mu"], rows["g"], s=sizes[mask], alpha=0.75, label=str(architecture))
    ax.set_xlabel(mu_label)
    ax.set_ylabel(g_label)
    ax.set_title("interpretability µ vs steering utility g (marker size: L0)")
    # A fixed corner: loc="best" tests every candidate spot against every point.
    ax.legend(fontsize=8, loc="upper left")
    return Figure("mu_vs_g.png", _png(fig))


def plot_group_taus(groups: Sequence[GroupTau]) -> Figure:
    width, height = 6.5, 0.16 * max(len(groups), 4) + 1
    fig, ax = plt.subplots(figsize=(width, height))
    # Group values without their column names ("lm-0 relu", not "lm_name=lm-0, architecture=
    # relu"): drawing glyphs is most of this plot's time, and the title says what they are.
    labels = [
        f"Ψ_{g.axis} {' '.join(part.split('=', 1)[-1] for part in g.group.split(', '))} (n={g.n})"
        for g in groups
    ]
    taus = np.array([g.tau_b for g in groups], dtype=float)
    low = np.array([g.ci_low for g in groups], dtype=float)
    high = np.array([g.ci_high for g in groups], dtype=float)
    y = np.arange(len(groups))
    err = np.vstack([np.nan_to_num(taus - low), np.nan_to_num(high - taus)])
    ax.errorbar(taus, y, xerr=np.clip(err, 0, None), fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top, no empty margin rows
    ax.set_xlabel("Kendall τ_b within group (95% bootstrap interval)")
    ax.set_title(
        "groups (within LM, layer, width): Ψ_A architecture · Ψ_B sparsity rank · Ψ_C all",
        fontsize=8,
        loc="left",
    )
    ax.set_xlim(-1.05, 1.05)
    # Margins from the widest label, measured once: a layout engine measures every tick label
    # several times, which with ~200 groups was a third of this plot's time.
    probe = fig.text(0, 0, max(labels, key=len), fontsize=7)
    label_inches = probe.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    probe.remove()
    fig.subplots_adjust(
        left=min(0.7, (label_inches + 0.2) / width),
        right=1 - 0.15 / width,
        bottom=0.55 / height,
        top=1 - 0.3 / height,
    )
    return Figure("tau_by_group.png", _png(fig))


def plot_steering_by_selection(by_selection: pd.DataFrame) -> Figure | None:
    if by_selection.empty:
        return None
    means = by_selection.groupby(["architecture", "selection"])["steering_score"].mean().unstack()
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="tight")
    means.plot.bar(ax=ax, rot=0)
    ax.set_ylabel("mean steering score")
    ax.set_title("steering score by architecture × selection")
    return Figure("steering_by_architecture.png", _png(fig))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table_html(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row[c])}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: Report) -> str:
    """A self-contained page: numbers, the paper's beside them, tables, embedded plots."""
    h = report.headline
    psi_rows = [
        {
            "axis": f"Ψ_{key.removeprefix('psi_')}" if key != "psi" else "Ψ",
            "meaning": AXIS_MEANING.get(key.removeprefix("psi_"), "mean of the three axes"),
            "value": v["value"],
            "SE": v["se"],
            "95% CI": f"{_fmt(v['ci_low'])} – {_fmt(v['ci_high'])}",
            "groups used": int(v["groups_used"]) if "groups_used" in v else "",
            "groups dropped (no τ_b)": int(v["groups_dropped"]) if "groups_dropped" in v else "",
            "paper": PAPER.get(key, ""),
        }
        for key, v in report.psi.items()
    ]
    images = "".join(
        f'<figure><img alt="{f.name}" src="data:image/png;base64,'
        f'{base64.b64encode(f.png).decode()}"><figcaption>{f.name}</figcaption></figure>'
        for f in report.figures
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    missing = _table_html([{"model version": uri, "missing": why} for uri, why in report.missing])
    settings = _table_html([{"setting": k, "value": v} for k, v in report.settings.items()])
    gain = (
        f"<h2>µ against the steering gain of the selection</h2>{_table_html(report.gain)}"
        f"<p>Paper: τ_b {PAPER['gain_tau_b']}.</p>"
        if report.gain
        else ""
    )
    scores = (
        f"<h2>τ_b per steering score</h2>{_table_html(report.side_by_side)}"
        if len(report.side_by_side) > 1
        else ""
    )
    ci_method = report.methods.get("tau_b_ci_method", "BCa")
    interval = (
        "no bootstrap interval: too few resamples have a τ_b"
        if ci_method == "none"
        else f"95% {html.escape(ci_method)} bootstrap interval {_fmt(h['tau_b_ci_low'])} – "
        f"{_fmt(h['tau_b_ci_high'])}"
    )
    p_method = report.methods.get("tau_b_p_method", "").replace("_", " ")
    groups = _table_html([{"runs": k, "config group": v} for k, v in report.run_groups.items()])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
font-size:90%}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>{html.escape(report.title)}</h1>
<p><b>Kendall τ_b</b> over {int(h["n_saes"])} SAEs: <b>{_fmt(h["tau_b"])}</b>
({interval}; p = {_fmt(h["tau_b_p_value"])}, {html.escape(p_method)}).
Paper: {PAPER["tau_b"]} over 90 SAEs.</p>
{scores}
<h2>Decomposition</h2>{_table_html(psi_rows)}
<h2>Per-group τ_b</h2>{_table_html([g.as_dict() for g in report.groups])}
{gain}
<h2>Plots</h2>{images}
<h2>SAEs</h2>{_table_html(report.table.to_dict("records"))}
<h2>Left out (missing a metric)</h2>{missing}
<h2>Notes</h2><ul>{notes}</ul>
<h2>Settings</h2>{settings}
<h2>Runs read</h2>{groups}
</body></html>
"""
