"""Entry point ``sweep``: one harvest, a grid of SAEs, one nested MLflow run and version each.

    mlflow run . -e sweep --env-manager local -P architectures=topk,relu -P target_l0s=16,64

The parent run holds the grid and a summary table; every (architecture, target_l0) pair trains
under its own nested run on the same in-memory activations, so the LM runs once per sweep.
L1 architectures (relu, gated) only approximate a target L0: give one ``l1_coefficients``
value per target (the λ grid), or leave it empty for their default λ.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace

import mlflow

from project.cli import add_dataclass_arguments, config_from_args, run_entry_point
from project.tracking import DEFAULT_EXPERIMENT, RUN_TYPE_TAG, configure_tracking, ui_hint
from training.config import L1_ARCHITECTURES, TrainConfig
from training.run import TrainResult, harvest_for, train_and_register
from training.train import prepare

log = logging.getLogger(__name__)


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


def sweep(base: TrainConfig, grid: SweepConfig) -> list[TrainResult]:
    """Harvest once, then train and register every SAE of the grid in nested runs."""
    configs = grid.grid(base)
    lm = prepare(base)
    for config in configs:
        config.validate_for_width(lm.d_model)
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
        for config in configs:
            with mlflow.start_run(
                run_name=f"{config.architecture}-l0{config.target_l0}", nested=True
            ):
                results.append(train_and_register(config, harvested, acts_ND))
        mlflow.log_table(
            {
                "architecture": [r.sae.cfg.architecture for r in results],
                "target_l0": [c.target_l0 for c in configs],
                "l0": [r.metrics["l0"] for r in results],
                "explained_variance": [r.metrics["explained_variance"] for r in results],
                "model_uri": [
                    f"models:/{r.model_version.name}/{r.model_version.version}" for r in results
                ],
                "training_run_id": [r.run_id for r in results],
            },
            "sweep_summary.json",
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, TrainConfig, exclude=frozenset({"architecture", "target_l0"}))
    add_dataclass_arguments(parser, SweepConfig)
    args = parser.parse_args()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    results = sweep(config_from_args(TrainConfig, args), config_from_args(SweepConfig, args))
    for r in results:
        v = r.model_version
        print(
            f"models:/{v.name}/{v.version}  {r.sae.cfg.architecture:10s} "
            f"L0 {r.metrics['l0']:7.2f}  EV {r.metrics['explained_variance']:.3f}"
        )
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
