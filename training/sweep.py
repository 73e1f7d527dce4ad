"""Entry point ``sweep``: one harvest, a grid of SAEs, one nested MLflow run and version each.

    mlflow run . -e sweep --env-manager local -P architectures=topk,relu -P target_l0s=16,64

The parent run holds the grid and a summary table; every (architecture, target_l0) pair trains
under its own nested run on the same in-memory activations, so the LM runs once per sweep.
L1 architectures (relu, gated) adapt λ during training so that L0 reaches each target (the
default, ``l1_coefficients=default``), or train with a fixed λ: give one ``l1_coefficients``
value per target (the λ grid).

One SAE that fails (a NaN loss, an error in its training) marks its own nested run FAILED and
the sweep goes on; at the end the parent run's tag ``saeflow.failed_saes`` lists the failed
ones, the summary table has a ``status`` column, and the entry point exits 3
(``PartialFailureError``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace

import mlflow

from project.cli import (
    PartialFailureError,
    add_dataclass_arguments,
    config_from_args,
    mark_work_started,
    run_entry_point,
)
from project.tracking import DEFAULT_EXPERIMENT, RUN_TYPE_TAG, configure_tracking, ui_hint
from training.config import L1_ARCHITECTURES, TrainConfig
from training.run import TrainResult, harvest_for, train_and_register
from training.train import prepare

log = logging.getLogger(__name__)

# Parent-run tag: comma-separated run names of the SAEs that failed ("" when none did).
FAILED_SAES_TAG = "saeflow.failed_saes"


@dataclass
class SweepConfig:
    """The grid, on top of the TrainConfig every SAE of the sweep shares."""

    architectures: str = "relu,topk,batchtopk,jumprelu,gated"
    target_l0s: str = "16,64"
    l1_coefficients: str = "default"  # one per target_l0 for relu/gated, or the arch default

    def grid(self, base: TrainConfig) -> list[TrainConfig]:
        """Every (architecture, target_l0) config, validated before anything runs."""
        architectures = [a.strip() for a in self.architectures.split(",") if a.strip()]
        try:
            targets = [int(t) for t in self.target_l0s.split(",") if t.strip()]
            lambdas = [
                float(x)
                for x in self.l1_coefficients.split(",")
                if x.strip() and self.l1_coefficients != "default"
            ]
        except ValueError as err:
            raise ValueError(
                f"target_l0s={self.target_l0s!r} / l1_coefficients={self.l1_coefficients!r} "
                "must be comma-separated numbers"
            ) from err
        if not architectures or not targets:
            raise ValueError(
                f"architectures={self.architectures!r} and target_l0s={self.target_l0s!r} "
                "must each name at least one value"
            )
        if lambdas and len(lambdas) != len(targets):
            raise ValueError(
                f"l1_coefficients has {len(lambdas)} values, target_l0s has {len(targets)}: "
                "give one λ per target L0 (or none)"
            )
        configs = []
        for architecture in architectures:
            for i, target in enumerate(targets):
                config = replace(base, architecture=architecture, target_l0=target)
                if lambdas and architecture in L1_ARCHITECTURES:
                    config.l1_coefficient = lambdas[i]
                config.validate()
                configs.append(config)
        return configs


def sae_run_name(config: TrainConfig) -> str:
    return f"{config.architecture}-l0{config.target_l0}"


def sweep(base: TrainConfig, grid: SweepConfig) -> list[TrainResult]:
    """Harvest once, then train and register every SAE of the grid in nested runs.

    Raises:
        PartialFailureError: some SAEs failed (their runs FAILED, the others registered);
            raised after the summary is logged, so the parent run also ends FAILED.
    """
    configs = grid.grid(base)
    lm = prepare(base)
    for config in configs:
        config.validate_for_width(lm.d_model)
    mark_work_started()
    results: list[TrainResult] = []
    with mlflow.start_run(run_name=f"sweep-{len(configs)}-saes"):
        mlflow.set_tag(RUN_TYPE_TAG, "sweep")
        mlflow.log_params({f"sweep_{k}": v for k, v in vars(grid).items()})
        mlflow.log_params(
            {
                k: v
                for k, v in base.as_params().items()
                if k not in {"architecture", "target_l0", "l1_coefficient"}
            }
        )
        harvested = harvest_for(base, lm)
        acts_ND = harvested.cache.load_all()
        outcomes: list[tuple[TrainConfig, str, TrainResult | None]] = []
        for config in configs:
            name = sae_run_name(config)
            run_id = ""
            try:
                # Leaving this block by an exception marks the nested run FAILED.
                with mlflow.start_run(run_name=name, nested=True) as run:
                    run_id = run.info.run_id
                    result = train_and_register(config, harvested, acts_ND)
            except Exception as err:  # noqa: BLE001 - one SAE's failure must not stop the rest
                log.exception("SAE %s failed (run %s); the sweep goes on", name, run_id)
                mlflow.set_tag(f"saeflow.error.{name}", f"{type(err).__name__}: {err}"[:5000])
                outcomes.append((config, run_id, None))
                continue
            results.append(result)
            outcomes.append((config, run_id, result))
        failed = [sae_run_name(c) for c, _, r in outcomes if r is None]
        mlflow.set_tag(FAILED_SAES_TAG, ",".join(failed))
        mlflow.log_table(
            {
                "architecture": [c.architecture for c, _, _ in outcomes],
                "target_l0": [c.target_l0 for c, _, _ in outcomes],
                "status": ["FAILED" if r is None else "FINISHED" for _, _, r in outcomes],
                "l0": [r.metrics["l0"] if r else None for _, _, r in outcomes],
                "explained_variance": [
                    r.metrics["explained_variance"] if r else None for _, _, r in outcomes
                ],
                "dead_fraction": [
                    r.metrics["dead_fraction"] if r else None for _, _, r in outcomes
                ],
                "model_uri": [
                    f"models:/{r.model_version.name}/{r.model_version.version}" if r else ""
                    for _, _, r in outcomes
                ],
                "training_run_id": [run_id for _, run_id, _ in outcomes],
            },
            "sweep_summary.json",
        )
        if failed:
            raise PartialFailureError(
                f"{len(failed)} of {len(configs)} SAEs failed: {', '.join(failed)} "
                f"(their runs are FAILED; the other {len(results)} are registered)",
                failed,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, TrainConfig, exclude=frozenset({"architecture", "target_l0"}))
    add_dataclass_arguments(parser, SweepConfig)
    args = parser.parse_args()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    try:
        results = sweep(config_from_args(TrainConfig, args), config_from_args(SweepConfig, args))
    except PartialFailureError:
        print(f"browse: {ui_hint(tracking_uri)}")  # the SAEs that finished are registered
        raise
    for r in results:
        v = r.model_version
        print(
            f"models:/{v.name}/{v.version}  {r.sae.cfg.architecture:10s} "
            f"L0 {r.metrics['l0']:7.2f}  EV {r.metrics['explained_variance']:.3f}"
        )
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
