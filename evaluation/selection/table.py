"""The per-version scores table: every selection score of every latent, computed once per
(version, config) and logged as the table ``tables/selection_scores.json`` of an eval run
(``eval=selection``) linked to the version like the other evals; the version gets the tag
``eval.selection.run_id``. The same version and config again reads the table back (found by
``eval_config_hash``), so steering and the analysis never recompute it.

    python -m evaluation.selection.table --model_uri models:/NAME/VERSION [--alpha 10 --k 1]
    mlflow run . -e selection_table --env-manager local -P model_uri=models:/NAME/VERSION

Every :class:`SelectionConfig` field is a flag (``--n_tokens 65536``, ``--batch_latents 128``).

Columns: ``latent``, ``max_activation``, ``firing_frequency`` (a logged ``latent_stats`` run's
for the same text when one exists, else the scan's own: same definition, same windows), ``input_score``, ``output_score``,
``dtc_in_place``, ``dtc_decoded_alone`` and ``lens_tokens`` (the top five logit-lens tokens).
Figures ``plots/dtc_distribution.png`` and ``plots/output_score_vs_dtc.png`` go with it.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, fields
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from torch import Tensor

from evaluation.interpretability.schema import EvalOutput
from evaluation.selection import plots
from evaluation.selection.config import SelectionConfig
from evaluation.selection.scores import INTERVENED_SCORES, compute_scores
from project.cli import config_from_overrides, parse_bool, run_entry_point
from project.hook_cache import HookCache
from project.lm import LoadedLM, check_layer, load_lm
from project.registry import load_version
from project.runs import (
    EVAL_LINK_TAG,
    config_hash,
    find_existing_run,
    find_finished_run,
    parent_run,
    resolve_versions,
    run_tags,
    version_site,
)
from project.saes import SparseAutoencoder
from project.tracking import DEFAULT_EXPERIMENT, configure_tracking, set_version_tag, ui_hint

logger = logging.getLogger(__name__)

EVAL_NAME = "selection"
EVAL_TYPE_ID = "selection"
TABLE = "selection_scores"
SCORE_COLUMNS = ("max_activation", "firing_frequency", "input_score", *INTERVENED_SCORES)
_LENS_SHOWN = 5


def scores_table(scores: dict[str, Tensor], lm: LoadedLM) -> dict[str, list[Any]]:
    """Column-oriented table of :func:`compute_scores`'s output (NaN stays NaN)."""
    F = len(scores["output_score"])
    table: dict[str, list[Any]] = {"latent": list(range(F))}
    for name in SCORE_COLUMNS:
        table[name] = [float(v) for v in scores[name].tolist()]
    table["lens_tokens"] = [
        " | ".join(lm.tokenizer.decode([t]) for t in row[:_LENS_SHOWN])
        for row in scores["lens_FL"].tolist()
    ]
    return table


def _metrics(scores: dict[str, Tensor], seconds: float) -> dict[str, dict[str, float]]:
    live = scores["firing_frequency"] > 0
    out: dict[str, float] = {
        "live_fraction": float(live.float().mean()),
        "input_score_coverage": float(torch.isfinite(scores["input_score"]).float().mean()),
        "selection_seconds": seconds,
    }
    for name in ("input_score", *INTERVENED_SCORES):
        values = scores[name][live & torch.isfinite(scores[name])]
        out[f"mean_{name}"] = float(values.mean()) if len(values) else math.nan
    out["frac_output_score_over_0.01"] = float(
        (scores["output_score"][live] >= 0.01).double().mean()
    )
    return {"selection": out}


def compute(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig,
    *,
    hook_cache: HookCache | None = None,
    latent_stats: dict[str, Tensor] | None = None,
) -> EvalOutput:
    """Every score of every latent, as an eval output (metrics + the scores table)."""
    started = time.perf_counter()
    scores = compute_scores(
        sae, lm, layer, config, latent_stats=latent_stats, hook_cache=hook_cache
    )
    return EvalOutput(
        metrics=_metrics(scores, time.perf_counter() - started),
        tables={TABLE: scores_table(scores, lm)},
    )


def read_scores(run_id: str) -> dict[str, Tensor]:
    """The score columns of a logged table, as float64 tensors indexed by latent."""
    # The client's load_table with the run's own experiment: the fluent one searches only the
    # active experiment, which need not be the run's.
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    df = client.load_table(experiment_id, f"tables/{TABLE}.json", run_ids=[run_id])
    df = df.sort_values("latent")
    return {
        name: torch.tensor(df[name].astype(float).to_numpy(), dtype=torch.float64)
        for name in SCORE_COLUMNS
    }


def _steering_stats(
    mv: ModelVersion, sae: SparseAutoencoder, lm: LoadedLM, layer: int, config: SelectionConfig
) -> tuple[dict[str, Tensor] | None, str | None]:
    """The version's logged ``latent_stats`` table for the same text, when one exists; never
    measured here: the scan computes the same figures on the same windows, and measuring them
    twice would double the LM work of a fresh version."""
    from evaluation.selection.config import LatentStatsConfig
    from evaluation.selection.latent_stats import STATS_RUN_TYPE, latent_stats_for_version

    stats_config = LatentStatsConfig(
        corpus=config.corpus,
        text_column=config.text_column,
        n_tokens=config.n_tokens,
        context_size=config.context_size,
        lm_batch_size=config.lm_batch_size,
    )
    # latent_stats' own key; should it ever change, the scan's figures are used (same values).
    digest = config_hash(STATS_RUN_TYPE, asdict(stats_config), None, mv)
    if find_finished_run(mv, STATS_RUN_TYPE, digest) is None:
        return None, None
    stats, run_id, _ = latent_stats_for_version(mv, sae, lm, layer, stats_config)
    return stats, run_id


def scores_for_version(
    mv: ModelVersion,
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig | None = None,
    *,
    force: bool = False,
    hook_cache: HookCache | None = None,
) -> tuple[dict[str, Tensor], str, bool]:
    """(scores, run id, reused): the version's scores table for ``config``, read from its
    FINISHED selection run, else computed and logged as a new run linked to the version."""
    config = config or SelectionConfig()
    digest = config_hash(EVAL_NAME, config, None, mv)
    existing = None if force else find_existing_run(mv, EVAL_NAME, digest)
    link = EVAL_LINK_TAG.format(name=EVAL_NAME)
    if existing is not None:
        run_id = existing.info.run_id
        logger.info("selection scores of %s/%s: reusing run %s", mv.name, mv.version, run_id)
        set_version_tag(mv.name, mv.version, link, run_id)
        return read_scores(run_id), run_id, True
    stats, stats_run = _steering_stats(mv, sae, lm, layer, config)
    with mlflow.start_run(
        run_name=f"{EVAL_NAME}-{mv.name}-v{mv.version}",
        nested=mlflow.active_run() is not None,
        tags=run_tags(mv, EVAL_NAME, digest),
    ) as run:
        params = {k: str(v) for k, v in asdict(config).items()}
        params["latent_stats_run_id"] = stats_run or "scan"
        mlflow.log_params(params)
        output = compute(sae, lm, layer, config, hook_cache=hook_cache, latent_stats=stats)
        mlflow.log_metrics(output.flat_metrics())
        table = output.tables[TABLE]
        mlflow.log_table(table, f"tables/{TABLE}.json")
        scores = {name: torch.tensor(table[name], dtype=torch.float64) for name in SCORE_COLUMNS}
        live = scores["firing_frequency"] > 0
        title = f"{mv.name} v{mv.version}"
        figures = {
            "plots/dtc_distribution.png": plots.dtc_distribution(
                scores["dtc_in_place"], live, title=f"ΔC_k, {title}"
            ),
            "plots/output_score_vs_dtc.png": plots.output_vs_dtc(
                scores["output_score"],
                scores["dtc_in_place"],
                scores["dtc_decoded_alone"],
                live,
                title=title,
            ),
        }
        for path, figure in figures.items():
            mlflow.log_figure(figure, path)
            plots.plt.close(figure)
    set_version_tag(mv.name, mv.version, link, run.info.run_id)
    # Read back what was stored (JSON keeps ~10 significant digits), so a caller sees the
    # same values whether the table was just computed or reused.
    return read_scores(run.info.run_id), run.info.run_id, False


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what MLproject's ``selection_table`` entry must fit): the URI,
    ``--force`` and one ``--FIELD`` per :class:`SelectionConfig` field (None = default)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--force", type=parse_bool, default=False)
    for f in fields(SelectionConfig):
        parser.add_argument(f"--{f.name}", default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> SelectionConfig:
    """The :class:`SelectionConfig` the parsed flags name; ValueError naming a bad value."""
    names = [f.name for f in fields(SelectionConfig)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return config_from_overrides(SelectionConfig, overrides, EVAL_NAME)


def main() -> None:
    args = build_parser().parse_args()
    config = config_from_args(args)
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    versions = resolve_versions(args.model_uri)
    sites = {mv.version: version_site(mv) for mv in versions}
    lms: dict[str, LoadedLM] = {}
    for lm_name, layer in sites.values():
        lms.setdefault(lm_name, load_lm(lm_name))
        check_layer(lms[lm_name], layer)
    cache = HookCache()
    with parent_run():
        for mv in versions:
            lm_name, layer = sites[mv.version]
            started = time.perf_counter()
            _, run_id, reused = scores_for_version(
                mv,
                load_version(mv),
                lms[lm_name],
                layer,
                config,
                force=args.force,
                hook_cache=cache,
            )
            state = "reused" if reused else f"computed in {time.perf_counter() - started:.0f}s"
            print(f"selection scores models:/{mv.name}/{mv.version}: {state}, run {run_id}")
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
