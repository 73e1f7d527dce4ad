"""Entry point ``analyze``: does higher interpretability go with better steering? (METHODS §6)

    mlflow run . -e analyze --env-manager local -P interp_metric=autointerp_score \\
        -P utility_metric=steering_score -P selection=none

Reads the eval and steer runs through the MLflow client — one study's own runs
(``study_run_id``), else every run of the chosen experiments, refusing to pool runs of
different configs or judges (``eval_group`` / ``steer_group`` pick one) — joins them per model
version (analysis/collect.py), and logs one run (``saeflow.run_type=analyze``) with:
metrics ``tau_b`` (+ ``_ci_low``/``_ci_high``, a bootstrap interval whose method is the tag
``tau_b_ci_method``, and ``_p_value``, whose method is the tag ``tau_b_p_method``), ``psi_A``,
``psi_B``, ``psi_C``, ``psi`` (each with ``_se`` and an interval; each axis with
``_groups_used`` / ``_groups_dropped``), ``n_saes``; with a selection other than ``none`` the
same for µ against the steering gain (``gain_tau_b``, ``gain_psi``...); where the steer runs
also logged the companion score (``steering_score_lift`` beside ``steering_score``, or the other
way round) the same again under ``lift_`` (or ``score_``); tags ``eval_group`` and
``steer_group`` (the config groups read); artifacts ``study_table.csv`` (with each SAE's eval and
steer run ids), ``group_taus.csv``, ``missing.csv``, the plots and ``report.html``
(self-contained, open it from the MLflow UI's artifact view). Random-init controls are listed,
never correlated. SAEs missing a metric are listed in the report. Fewer than three complete
SAEs, or runs of several config groups, is a clear error before anything is logged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from threadpoolctl import threadpool_limits  # installed with scikit-learn, a dependency

from analysis.collect import NO_SELECTION, StudyData, collect, study_run_ids
from analysis.report import (
    Report,
    plot_group_taus,
    plot_mu_vs_g,
    plot_steering_by_selection,
    render_html,
)
from analysis.stats import (
    SITE_COLUMNS,
    add_sparsity_rank,
    all_group_taus,
    bca_interval,
    kendall_tau_b,
    p_value_method,
    permutation_p_value,
    psi_with_uncertainty,
)
from project.cli import (
    BadInputError,
    add_dataclass_arguments,
    config_from_args,
    mark_work_started,
    run_entry_point,
)
from project.tracking import DEFAULT_EXPERIMENT, RUN_TYPE_TAG, configure_tracking, ui_hint

log = logging.getLogger(__name__)

ANALYZE_RUN_TYPE = "analyze"
MIN_SAES = 3
STEER_MODES = ("latent", "concept")
SPARSITY_COLUMNS = ("l0", "target_l0")
# The AxBench steering score and the same harmonic mean with concept lift over the unsteered
# answer in place of the concept rating: where the steer runs logged both, the report gives
# τ_b of each, side by side; the companion's metrics carry its prefix.
LIFT_METRIC = "steering_score_lift"
COMPANIONS = {"steering_score": (LIFT_METRIC, "lift_"), LIFT_METRIC: ("steering_score", "score_")}


@dataclass
class AnalyzeConfig:
    """What to correlate.

    - ``experiments``: comma-separated experiment names (``all`` = every experiment).
    - ``interp_metric``: µ, any metric logged by an eval run (default SAEBench's autointerp).
    - ``utility_metric``: g, a metric of the steer runs (default the AxBench steering score;
      ``steering_score_lift``: the same with concept lift over the unsteered answer in place of
      the concept rating). The other of the two, where logged, is reported beside it.
    - ``steer_mode``: which steer runs (``latent``: the interpretability-vs-utility paper's
      latent-first protocol; ``concept``).
    - ``selection``: the steer runs' latent selection; with one other than ``none`` the
      steering gain over ``none`` is correlated too (the paper's Table 3).
    - ``sparsity``: ``l0`` (the measured held-out L0 a version is tagged with) or
      ``target_l0``, used to match sparsity ranks for Ψ_B.
    - ``n_resamples``, ``seed``: bootstrap and permutation draws.
    - ``study_run_id``: analyse exactly the eval and steer runs this study run lists in its
      ``study_runs.json`` (reused ones included); with it ``experiments`` stays ``all``.
    - ``eval_group``, ``steer_group``: the config group (judge and config) to read where the
      runs found span several; the refusal names the groups.
    """

    experiments: str = "all"
    interp_metric: str = "autointerp_score"
    utility_metric: str = "steering_score"
    steer_mode: str = "latent"
    selection: str = NO_SELECTION
    sparsity: str = "l0"
    n_resamples: int = 2000
    seed: int = 0
    study_run_id: str = ""
    eval_group: str = ""
    steer_group: str = ""

    def validate(self) -> None:
        if self.steer_mode not in STEER_MODES:
            raise ValueError(f"steer_mode {self.steer_mode!r} is not one of {STEER_MODES}")
        if self.sparsity not in SPARSITY_COLUMNS:
            raise ValueError(f"sparsity {self.sparsity!r} is not one of {SPARSITY_COLUMNS}")
        if self.n_resamples < 100:
            raise ValueError(f"n_resamples must be at least 100, got {self.n_resamples}")
        for name in ("interp_metric", "utility_metric", "selection"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.study_run_id.strip() and self.experiment_names():
            raise ValueError(
                f"study_run_id={self.study_run_id!r} names the runs to read, experiments="
                f"{self.experiments!r} too; give one (experiments=all with a study run id)"
            )

    def companion(self) -> tuple[str, str]:
        """(metric, prefix) of the score reported beside ``utility_metric``; ("", "") if none."""
        return COMPANIONS.get(self.utility_metric, ("", ""))

    def experiment_names(self) -> list[str]:
        names = [e.strip() for e in self.experiments.split(",") if e.strip()]
        return [] if names in ([], ["all"]) else names


@dataclass
class PhaseTimes:
    """Wall and process CPU seconds per phase of one analyze call (the bench prints them; CPU
    beside wall tells what a loaded machine added)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


@dataclass
class AnalysisResult:
    run_id: str | None
    report: Report
    report_path: str
    times: PhaseTimes = field(default_factory=PhaseTimes)


def _check_enough(data: StudyData, config: AnalyzeConfig) -> None:
    n = len(data.table)
    if n >= MIN_SAES:
        return
    lines = [f"{uri}: {why}" for uri, why in data.missing[:20]]
    raise BadInputError(
        f"only {n} SAE(s) have both {config.interp_metric!r} (eval runs) and "
        f"{config.utility_metric!r} (steer runs, mode {config.steer_mode}, selection "
        f"{config.selection}); Kendall τ needs at least {MIN_SAES}. "
        + (("Missing: " + "; ".join(lines)) if lines else "No eval or steer runs were found.")
        + " Run `evaluate` and `steer` on more versions first."
    )


@dataclass
class Correlation:
    """τ_b of x vs y over the SAEs (``headline``: value, interval, p-value, n), how its
    interval and p-value were made (``methods``), the Ψ's and the per-group τ's."""

    headline: dict[str, float]
    methods: dict[str, str]
    psi: dict[str, dict[str, float]]
    groups: list

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return _flat(self.headline, self.psi, prefix)

    def tags(self, prefix: str = "") -> dict[str, str]:
        return {f"{prefix}{k}": v for k, v in self.methods.items()}


def correlation(
    table: pd.DataFrame, x: str, y: str, config: AnalyzeConfig, notes: list[str]
) -> Correlation:
    """Headline τ_b with its interval and p-value, the Ψ's, and the per-group τ's of x vs y."""
    # One BLAS thread: the statistics make hundreds of small matrix products (at most
    # 2,000 x n by n x n, n SAEs), where waking threads costs more than it saves; on this
    # 2-core machine under load, Ψ's draws took 1.6-2.3 s with two threads, 0.13 s with one.
    with threadpool_limits(limits=1, user_api="blas"):
        return _correlation(table, x, y, config, notes)


def canonical_order(rows: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """``rows`` in an order fixed by the SAEs' own values. The bootstrap and permutation draws
    pick rows by position; in the store's order (a Ray study numbers versions as they finish)
    the same SAEs gave another interval and p-value in another store."""
    columns = [c for c in (*SITE_COLUMNS, "architecture", "target_l0", x, y) if c in rows.columns]
    return rows.sort_values(columns, kind="mergesort") if columns else rows


def _correlation(
    table: pd.DataFrame, x: str, y: str, config: AnalyzeConfig, notes: list[str]
) -> Correlation:
    rows = canonical_order(table.dropna(subset=[x, y]), x, y)
    tau = kendall_tau_b(rows[x], rows[y])
    interval = bca_interval(rows[x], rows[y], n_resamples=config.n_resamples, seed=config.seed)
    headline = {
        "n_saes": float(len(rows)),
        "tau_b": tau,
        "tau_b_p_value": permutation_p_value(
            rows[x], rows[y], n_resamples=config.n_resamples, seed=config.seed
        ),
        **interval.as_dict("tau_b"),
        "tau_b_ci_undefined_draws": float(interval.undefined_draws),
    }
    methods = {
        "tau_b_ci_method": interval.method,
        "tau_b_p_method": p_value_method(len(rows), config.n_resamples),
    }
    if interval.undefined_draws and interval.method == "none":
        notes.append(
            f"τ_b({x}, {y}): {interval.undefined_draws} of {interval.n_draws} bootstrap draws had "
            f"no τ_b (constant {x} or {y}), more than one tail of the interval: the other draws "
            "all hold the few SAEs that vary, so no interval is given."
        )
    elif interval.undefined_draws:
        notes.append(
            f"τ_b({x}, {y}): {interval.undefined_draws} of {interval.n_draws} bootstrap draws had "
            f"no τ_b (constant {x} or {y}), so BCa was undefined: the interval is the "
            "percentile interval of the other draws."
        )
    if math.isnan(tau):
        notes.append(f"τ_b({x}, {y}) is undefined: one of them is constant over the SAEs.")
    psi = psi_with_uncertainty(
        rows, x, y, n_resamples=max(100, config.n_resamples // 4), seed=config.seed
    )
    for key, value in psi.items():
        if math.isnan(value["value"]):
            notes.append(f"{key} is undefined: no group of that axis has two SAEs with a τ.")
    groups = all_group_taus(
        rows, x, y, n_resamples=config.n_resamples, seed=config.seed, on_skip=notes.append
    )
    return Correlation(headline, methods, psi, groups)


def _flat(headline: dict[str, float], psi: dict[str, dict[str, float]], prefix: str = "") -> dict:
    out = {f"{prefix}{k}": v for k, v in headline.items()}
    for key, values in psi.items():
        out[f"{prefix}{key}"] = values["value"]
        for part in ("se", "ci_low", "ci_high", "groups_used", "groups_dropped"):
            if part in values:
                out[f"{prefix}{key}_{part}"] = values[part]
    return {k: v for k, v in out.items() if not math.isnan(v)}


def ci_text(low: float, high: float) -> str:
    """``low – high`` to 3 places, or why there is no interval."""
    if math.isnan(low) or math.isnan(high):
        return "none (too few bootstrap draws have a τ_b)"
    return f"{low:.3f} – {high:.3f}"


def _gain_summary(
    metric: str, with_gain: pd.DataFrame, result: Correlation, column: str
) -> dict[str, object]:
    """One row of the gain table: µ against the selection's gain in ``metric``."""
    h = result.headline
    return {
        "g": metric,
        "n": len(with_gain),
        "tau_b": h["tau_b"],
        "95% CI": ci_text(h["tau_b_ci_low"], h["tau_b_ci_high"]),
        "CI method": result.methods["tau_b_ci_method"],
        "psi": result.psi["psi"]["value"],
        "mean gain %": float(with_gain[column].mean()),
    }


def _score_row(metric: str, result: Correlation) -> dict[str, object]:
    """One row of the side-by-side table of τ_b per steering score."""
    h = result.headline
    return {
        "g": metric,
        "n SAEs": int(h["n_saes"]),
        "τ_b": h["tau_b"],
        "95% CI": ci_text(h["tau_b_ci_low"], h["tau_b_ci_high"]),
        "CI method": result.methods["tau_b_ci_method"],
        "p": h["tau_b_p_value"],
        "p method": result.methods["tau_b_p_method"],
        "Ψ": result.psi["psi"]["value"],
    }


def _ranked(data: StudyData, config: AnalyzeConfig) -> pd.DataFrame:
    """The complete SAEs with ``sparsity_rank`` from the whole grid (incomplete SAEs too)."""
    column = "l0" if config.sparsity == "l0" else "target_l0"
    frames = []
    for frame in (data.table, data.grid):
        frame = frame.copy()
        if config.sparsity == "target_l0" or frame["l0"].isna().any():
            frame["l0"] = frame["l0"].fillna(frame["target_l0"])
        frames.append(frame)
    table, grid = frames
    return add_sparsity_rank(table, column, grid=grid if len(grid) else None)


def analyze(config: AnalyzeConfig, client: MlflowClient | None = None) -> AnalysisResult:
    """Collect, compute, log one analyze run; see the module docstring.

    Raises:
        ValueError: bad input (config, unknown experiment or study run, runs of several
            config groups: :class:`analysis.collect.MixedRunsError`, fewer than three SAEs),
            before anything is logged.
    """
    config.validate()
    client = client or MlflowClient()
    times = PhaseTimes()
    companion, prefix = config.companion()
    with times.phase("collect"):
        run_ids = (
            study_run_ids(client, config.study_run_id.strip())
            if config.study_run_id.strip()
            else None
        )
        data = collect(
            client,
            experiments=config.experiment_names(),
            interp_metric=config.interp_metric,
            utility_metric=config.utility_metric,
            steer_mode=config.steer_mode,
            selection=config.selection,
            run_ids=run_ids,
            eval_group=config.eval_group.strip(),
            steer_group=config.steer_group.strip(),
            companion_metric=companion,
        )
    _check_enough(data, config)
    mark_work_started()
    notes: list[str] = []
    table = _ranked(data, config)
    with times.phase("statistics"):
        main = correlation(table, "mu", "g", config, notes)
    headline, psi, groups = main.headline, main.psi, main.groups
    metrics, tags = main.metrics(), main.tags()
    gain: list[dict[str, object]] = []
    side_by_side = [_score_row(config.utility_metric, main)]
    if config.selection != NO_SELECTION:
        with_gain = table.dropna(subset=["gain"])
        if len(with_gain) >= MIN_SAES:
            with times.phase("statistics"):
                gain_result = correlation(with_gain, "mu", "gain", config, notes)
            metrics.update(gain_result.metrics("gain_"))
            tags.update(gain_result.tags("gain_"))
            gain.append(_gain_summary(config.utility_metric, with_gain, gain_result, "gain"))
        else:
            notes.append(
                f"steering gain of {config.selection!r}: only {len(with_gain)} SAE(s) have a "
                "non-zero selection=none score to compare with (the others are listed under "
                "Left out); not correlated."
            )
    if companion:
        with_companion = table.dropna(subset=[companion])
        if len(with_companion) >= MIN_SAES:
            with times.phase("statistics"):
                result = correlation(with_companion, "mu", companion, config, notes)
            metrics.update(result.metrics(prefix))
            tags.update(result.tags(prefix))
            side_by_side.append(_score_row(companion, result))
            companion_gain = table.dropna(subset=[f"{companion}_gain"])
            if config.selection != NO_SELECTION and len(companion_gain) >= MIN_SAES:
                with times.phase("statistics"):
                    result = correlation(companion_gain, "mu", f"{companion}_gain", config, notes)
                metrics.update(result.metrics(f"{prefix}gain_"))
                tags.update(result.tags(f"{prefix}gain_"))
                gain.append(_gain_summary(companion, companion_gain, result, f"{companion}_gain"))
        elif len(with_companion):
            notes.append(
                f"only {len(with_companion)} SAE(s) logged {companion}; its τ_b is not computed."
            )
    sites = table.groupby([c for c in SITE_COLUMNS if c in table], dropna=False).ngroups
    if sites > 1:
        notes.append(
            f"The SAEs come from {sites} (LM, layer, width) sites: τ_b pools them; every Ψ "
            "group lies inside one site."
        )
    if len(data.controls):
        notes.append(
            f"{len(data.controls)} random-init control(s) left out of every τ (listed in the "
            "table artifact controls.csv)."
        )
    if len(table) < 20:
        notes.append(
            f"With {len(table)} SAEs the interval of τ_b is wide: it can tell a strong link from "
            "none, not a paper-sized τ of 0.3 from 0."
        )
    tags.update(eval_group=data.eval_group, steer_group=data.steer_group)
    report = Report(
        title="saeflow: interpretability vs steering utility",
        headline=headline,
        psi=psi,
        groups=groups,
        table=table,
        missing=data.missing,
        notes=notes,
        gain=gain,
        settings={k: str(v) for k, v in asdict(config).items()},
        methods=main.methods,
        side_by_side=side_by_side,
        run_groups={"eval runs": data.eval_group, "steer runs": data.steer_group},
    )
    with times.phase("plots"):
        report.figures.append(plot_mu_vs_g(table, config.interp_metric, config.utility_metric))
        if groups:
            report.figures.append(plot_group_taus(groups))
        bars = plot_steering_by_selection(data.steering_by_selection)
        if bars is not None:
            report.figures.append(bars)

    with (
        times.phase("report and logging"),
        mlflow.start_run(run_name="analyze") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tag(RUN_TYPE_TAG, ANALYZE_RUN_TYPE)
        mlflow.set_tags(tags)
        mlflow.log_params({k: str(v) for k, v in asdict(config).items()})
        mlflow.log_metrics(metrics)
        out = Path(tmp)
        table.to_csv(out / "study_table.csv", index=False)
        pd.DataFrame([g.as_dict() for g in groups]).to_csv(out / "group_taus.csv", index=False)
        pd.DataFrame(data.missing, columns=["model_uri", "missing"]).to_csv(
            out / "missing.csv", index=False
        )
        data.controls.to_csv(out / "controls.csv", index=False)
        for figure in report.figures:
            (out / figure.name).write_bytes(figure.png)
        (out / "report.html").write_text(render_html(report), encoding="utf-8")
        mlflow.log_artifacts(str(out))
        report_path = f"{run.info.artifact_uri}/report.html"
    return AnalysisResult(
        run_id=run.info.run_id, report=report, report_path=report_path, times=times
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, AnalyzeConfig)
    config = config_from_args(AnalyzeConfig, parser.parse_args())
    config.validate()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    result = analyze(config)
    h = result.report.headline
    print(
        f"τ_b = {h['tau_b']:.3f} (95% CI {ci_text(h['tau_b_ci_low'], h['tau_b_ci_high'])}) "
        f"over {int(h['n_saes'])} SAEs; Ψ = {result.report.psi['psi']['value']:.3f}"
    )
    print(f"report: {result.report_path}")
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
