"""Entry point ``probe``: sparse probing in four regimes (Kantamneni et al., "Are Sparse
Autoencoders Useful? A Case Study in Sparse Probing"; ../shared/METHODS.md §7).

    mlflow run . -e probe --env-manager local -P model_uri=models:/NAME[/VERSION] \\
        -P regimes=scarcity,imbalance,noise,shift -P datasets=default

For every (model version, regime) one MLflow run, tagged like eval runs
(``saeflow.run_type=probe``, ``regime``, ``registered_model``, ``model_version``,
``model_uri``, ``training_run_id``, the version's tags, ``eval_config_hash``) and linked from
the version by the tag ``probe.<regime>.run_id``. Each run logs:

- tables ``tables/methods.json`` (every method's validation and test AUC per cell) and
  ``tables/quiver.json`` (per cell: the method each quiver chose and its test AUC, ΔAUC);
- metrics: ``auc_without_sae``, ``auc_with_sae``, ``delta_auc`` with a 95% bootstrap
  interval over datasets (``delta_auc_ci_low`` / ``_high``), ``share_sae_chosen`` (cells where
  the quiver picks an SAE probe), ``share_sae_wins_test`` (cells where the best SAE probe alone
  beats the baselines' quiver on test), ``auc_sae_only``, and ``delta_auc_tie_<rule>``: the
  mean ΔAUC re-counted under each tie rule;
- plots in the paper's form (evaluation/probing_regimes/plots.py).

Activations (last token, layer of the SAE) are harvested once per (LM, layer, dataset) and
cached; baselines do not depend on the SAE and are fitted once per regime for all versions.
Every input error (datasets, labels, sizes, URI, LM) fails before any activation is computed.
A (version, regime, config) with a FINISHED run is reused unless ``force=true``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, fields
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from tqdm.auto import tqdm

from evaluation.probing_regimes import activations as acts_mod
from evaluation.probing_regimes import plots
from evaluation.probing_regimes.config import TIE_RULES, ProbeConfig
from evaluation.probing_regimes.datasets import ProbeDataset, load_all
from evaluation.probing_regimes.methods import MethodResult, run_baseline, sae_probe
from evaluation.probing_regimes.quiver import cell
from evaluation.probing_regimes.regimes import Trial, check_plan
from evaluation.probing_regimes.threads import fit_threads
from project.cli import mark_work_started, parse_bool, run_entry_point
from project.lm import LoadedLM, check_layer, lm_fingerprint, load_lm
from project.registry import load_version
from project.runs import (
    config_hash,
    find_finished_run,
    parent_run,
    resolve_versions,
    run_tags,
    version_site,
)
from project.statistics import bootstrap_interval
from project.tracking import (
    DEFAULT_EXPERIMENT,
    RUN_TYPE_TAG,
    configure_tracking,
    set_version_tag,
    ui_hint,
)

log = logging.getLogger(__name__)

PROBE_RUN_TYPE = "probe"
BATCH_RUN_TYPE = "probe_batch"
VERSION_LINK_TAG = "probe.{regime}.run_id"
Cells = dict[tuple[str, float], list[MethodResult]]


def regime_config(config: ProbeConfig, regime: str) -> dict[str, Any]:
    """What one regime's result depends on (its own grid, not the other regimes')."""
    values = asdict(config)
    values["regimes"] = (regime,)
    return values


# ---------------------------------------------------------------------------------------------
# computing


def harvest_all(
    datasets: list[ProbeDataset], lm: LoadedLM, layer: int, config: ProbeConfig
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Activations of every dataset and its shift set, by dataset name."""
    fingerprint = lm_fingerprint(lm)
    out = {}
    for d in datasets:
        X = acts_mod.harvest(
            lm, layer, d.texts, config.max_seq_len, config.batch_size, d.name, fingerprint
        )
        X_ood = None
        if d.ood_texts is not None:
            X_ood = acts_mod.harvest(
                lm,
                layer,
                d.ood_texts,
                config.max_seq_len,
                config.batch_size,
                f"{d.name} (shift)",
                fingerprint,
            )
        out[d.name] = (X, X_ood)
    return out


def _split(trial: Trial, X: np.ndarray, X_ood: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    X_test = X_ood if trial.test_idx is None else X[trial.test_idx]
    assert X_test is not None
    return X[trial.train_idx], X_test


def run_baselines(trials: list[Trial], features: dict, config: ProbeConfig, regime: str) -> Cells:
    """Every baseline on every trial of a regime (noise: ``noise_baselines``)."""
    names = config.noise_baselines if regime == "noise" else config.baselines
    out: Cells = {}
    with fit_threads():  # once for the regime; run_baseline's own limit is then a no-op
        for trial in tqdm(trials, desc=f"{regime}: baselines", leave=False):
            X_train, X_test = _split(trial, *features[trial.dataset])
            out[(trial.dataset, trial.value)] = [
                run_baseline(name, X_train, trial.y_train, X_test, trial.y_test, config.seed)
                for name in names
            ]
    return out


def run_sae_probes(trials: list[Trial], latents: dict, config: ProbeConfig, regime: str) -> Cells:
    """The SAE probes (k of the regime's grid) on every trial of a regime."""
    ks = config.standard_ks if regime == "standard" else config.regime_ks
    out: Cells = {}
    with fit_threads():
        for trial in tqdm(trials, desc=f"{regime}: SAE probes", leave=False):
            Z_train, Z_test = _split(trial, *latents[trial.dataset])
            out[(trial.dataset, trial.value)] = sae_probe(
                Z_train, trial.y_train, Z_test, trial.y_test, ks, config.seed
            )
    return out


def summarise(
    baselines: Cells, saes: Cells, config: ProbeConfig
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """(methods table, quiver table, summary metrics) of one regime."""
    method_rows, quiver_rows = [], []
    for key in sorted(baselines, key=lambda k: (k[0], k[1])):
        results = [*baselines[key], *saes[key]]
        for r in results:
            method_rows.append(
                {
                    "dataset": key[0],
                    "value": key[1],
                    "method": r.method,
                    "sae": r.is_sae,
                    "val_auc": r.val_auc,
                    "test_auc": r.test_auc,
                    "params": str(r.params),
                }
            )
        c = cell(results, config.tie_rule)
        quiver_rows.append(
            {
                "dataset": key[0],
                "value": key[1],
                "method_without_sae": c.without.method,
                "auc_without_sae": c.without.test_auc,
                "method_with_sae": c.with_sae.method,
                "auc_with_sae": c.with_sae.test_auc,
                "sae_chosen": c.with_sae.sae_share,
                "method_sae_only": c.sae_only.method,
                "auc_sae_only": c.sae_only.test_auc,
                "delta_auc": c.delta,
            }
        )
    methods, quiver = pd.DataFrame(method_rows), pd.DataFrame(quiver_rows)
    # The same cells re-counted under every tie rule: ties decide small-n cells.
    recount = {
        f"delta_auc_tie_{rule}": float(
            np.mean([cell([*baselines[k], *saes[k]], rule).delta for k in baselines])
        )
        for rule in TIE_RULES
    }
    per_dataset = quiver.groupby("dataset")["delta_auc"].mean()
    low, high = bootstrap_interval(per_dataset.tolist(), seed=config.bootstrap_seed)
    metrics = {
        "auc_without_sae": float(quiver["auc_without_sae"].mean()),
        "auc_with_sae": float(quiver["auc_with_sae"].mean()),
        "auc_sae_only": float(quiver["auc_sae_only"].mean()),
        "delta_auc": float(quiver["delta_auc"].mean()),
        "delta_auc_ci_low": low,
        "delta_auc_ci_high": high,
        "share_sae_chosen": float(quiver["sae_chosen"].mean()),
        "share_sae_wins_test": float((quiver["auc_sae_only"] > quiver["auc_without_sae"]).mean()),
        "n_cells": float(len(quiver)),
        "n_datasets": float(quiver["dataset"].nunique()),
        **recount,
    }
    return methods, quiver, metrics


# ---------------------------------------------------------------------------------------------
# runs


def _probe_tags(mv: ModelVersion, regime: str, digest: str) -> dict[str, str]:
    tags = run_tags(mv, PROBE_RUN_TYPE, digest)
    tags.pop("eval", None)
    tags.update({RUN_TYPE_TAG: PROBE_RUN_TYPE, "regime": regime})
    return tags


def _log_run(
    mv: ModelVersion, regime: str, digest: str, config: ProbeConfig, baselines: Cells, saes: Cells
) -> tuple[str, dict[str, float]]:
    uri = f"models:/{mv.name}/{mv.version}"
    methods, quiver, metrics = summarise(baselines, saes, config)
    with mlflow.start_run(
        run_name=f"probe-{regime}-{mv.name}-v{mv.version}",
        nested=mlflow.active_run() is not None,
        tags=_probe_tags(mv, regime, digest),
    ) as run:
        params = {
            k: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
            for k, v in regime_config(config, regime).items()
        }
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_table(methods, "tables/methods.json")
        mlflow.log_table(quiver, "tables/quiver.json")
        title = f"{regime}: {uri} (tie rule {config.tie_rule})"
        figs = plots.figures(quiver, regime, title)
        for name, fig in figs.items():
            mlflow.log_figure(fig, name)
        plots.close(figs)
    set_version_tag(mv.name, mv.version, VERSION_LINK_TAG.format(regime=regime), run.info.run_id)
    log.info(
        "%s on %s: ΔAUC %.4f [%.4f, %.4f], SAE chosen in %.0f%% of %d cells (run %s)",
        regime,
        uri,
        metrics["delta_auc"],
        metrics["delta_auc_ci_low"],
        metrics["delta_auc_ci_high"],
        100 * metrics["share_sae_chosen"],
        metrics["n_cells"],
        run.info.run_id,
    )
    return run.info.run_id, metrics


def probe(
    model_uri: str,
    config: ProbeConfig,
    force: bool = False,
    lm: LoadedLM | None = None,
) -> list[dict[str, Any]]:
    """Probe every version ``model_uri`` names in every regime of ``config``.

    Returns one record per (version, regime): uri, regime, run_id, reused, metrics.

    Raises:
        ValueError: bad input (datasets, labels, sizes, URI, LM), before any activation.
    """
    datasets = load_all(config.datasets, config.max_rows)
    plan = check_plan(datasets, config)
    versions = resolve_versions(model_uri)
    sites = {mv.version: version_site(mv) for mv in versions}
    if len({s for s in sites.values()}) != 1:
        raise ValueError(
            f"{model_uri} has versions at different sites {sorted(set(sites.values()))}; "
            "probe one LM and layer at a time (models:/NAME/VERSION)"
        )
    lm_name, layer = next(iter(sites.values()))
    lm = lm if lm is not None else load_lm(lm_name)
    check_layer(lm, layer)
    for mv in versions:
        d_in = (mv.tags or {}).get("d_in")
        if d_in is not None and int(d_in) != lm.d_model:
            raise ValueError(
                f"models:/{mv.name}/{mv.version} has d_in {d_in}; {lm.name} has {lm.d_model}"
            )
    log.info(
        "probing %d version(s) on %d datasets: %s",
        len(versions),
        len(datasets),
        ", ".join(f"{r} {len(t)} cells" for r, t in plan.items()),
    )
    mark_work_started()

    todo: dict[str, list[tuple[ModelVersion, str]]] = {}
    records: list[dict[str, Any]] = []
    for regime in config.regimes:
        for mv in versions:
            digest = config_hash(f"probe.{regime}", regime_config(config, regime), None, mv)
            existing = (
                None if force else find_finished_run(mv, PROBE_RUN_TYPE, digest, regime=regime)
            )
            if existing is not None:
                set_version_tag(
                    mv.name,
                    mv.version,
                    VERSION_LINK_TAG.format(regime=regime),
                    existing.info.run_id,
                )
                records.append(
                    {
                        "uri": f"models:/{mv.name}/{mv.version}",
                        "regime": regime,
                        "run_id": existing.info.run_id,
                        "reused": True,
                        "metrics": dict(existing.data.metrics),
                    }
                )
                log.info(
                    "%s on %s: reusing FINISHED run %s", regime, mv.version, existing.info.run_id
                )
            else:
                todo.setdefault(regime, []).append((mv, digest))
    if not todo:
        return records

    started = time.perf_counter()
    features = harvest_all(datasets, lm, layer, config)
    log.info("activations ready in %.1fs", time.perf_counter() - started)
    latents: dict[str, dict] = {}  # by version: each SAE encodes every dataset once

    def latents_of(mv: ModelVersion) -> dict:
        if mv.version not in latents:
            sae = load_version(mv)
            latents[mv.version] = {
                name: (
                    acts_mod.encode(sae, X),
                    None if X_ood is None else acts_mod.encode(sae, X_ood),
                )
                for name, (X, X_ood) in features.items()
            }
        return latents[mv.version]

    launcher = os.environ.get("MLFLOW_RUN_ID")
    with parent_run():
        active = mlflow.active_run()
        if launcher and active is not None and active.info.run_id == launcher:
            mlflow.set_tag(RUN_TYPE_TAG, BATCH_RUN_TYPE)  # the `mlflow run` run holds the batch
        # Regime by regime, so each regime's runs are logged as soon as they are done.
        for regime, pending in todo.items():
            t0 = time.perf_counter()
            baselines = run_baselines(plan[regime], features, config, regime)
            log.info("%s: baselines in %.1fs", regime, time.perf_counter() - t0)
            for mv, digest in pending:
                t0 = time.perf_counter()
                saes = run_sae_probes(plan[regime], latents_of(mv), config, regime)
                log.info("%s: SAE probes in %.1fs", regime, time.perf_counter() - t0)
                run_id, metrics = _log_run(mv, regime, digest, config, baselines, saes)
                records.append(
                    {
                        "uri": f"models:/{mv.name}/{mv.version}",
                        "regime": regime,
                        "run_id": run_id,
                        "reused": False,
                        "metrics": metrics,
                    }
                )
    return records


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--force", type=parse_bool, default=False)
    defaults = ProbeConfig()
    for f in fields(ProbeConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, tuple):
            parser.add_argument(f"--{f.name}", type=str, default=",".join(map(str, default)))
        elif isinstance(default, int):
            parser.add_argument(f"--{f.name}", type=lambda s: int(float(s)), default=default)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(ProbeConfig)}
    config = ProbeConfig(**values)
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    records = probe(args.model_uri, config, force=args.force)
    for r in records:
        m = r["metrics"]
        print(
            f"{r['regime']:>10} {r['uri']}: {'reused' if r['reused'] else 'finished'}, run {r['run_id']}"
            f"  AUC without {m.get('auc_without_sae', float('nan')):.4f}"
            f" with {m.get('auc_with_sae', float('nan')):.4f}"
            f" ΔAUC {m.get('delta_auc', float('nan')):+.4f}"
            f" [{m.get('delta_auc_ci_low', float('nan')):+.4f}, {m.get('delta_auc_ci_high', float('nan')):+.4f}]"
            f" SAE chosen {m.get('share_sae_chosen', float('nan')):.2f}"
        )
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
