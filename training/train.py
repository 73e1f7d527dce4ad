"""Entry point ``train``: harvest (or reuse) activations, train one SAE, register it.

    mlflow run . -e train --env-manager local -P architecture=topk -P target_l0=16 -P layer=4

Resume an interrupted training (same run, from its last checkpoint) with
``-P resume_run_id=RUN_ID``.
"""

from __future__ import annotations

import argparse
import logging
import os

import mlflow
from mlflow.tracking import MlflowClient

from project.cli import (
    add_dataclass_arguments,
    config_from_args,
    mark_work_started,
    run_entry_point,
)
from project.corpus import resolve_corpus
from project.lm import LoadedLM, check_layer, load_lm
from project.tracking import DEFAULT_EXPERIMENT, MODEL_VERSION_TAG, configure_tracking, ui_hint
from training.config import TrainConfig
from training.run import (
    TRAIN_CONFIG_ARTIFACT,
    TrainResult,
    harvest_for,
    train_and_register,
)

log = logging.getLogger(__name__)


def prepare(config: TrainConfig) -> LoadedLM:
    """Every check that can fail on the user's input, before any harvest or training."""
    config.validate()
    resolve_corpus(config.dataset, text_column=config.text_column)
    lm = load_lm(config.model, device=config.resolved_device())
    check_layer(lm, config.layer)
    config.validate_for_width(lm.d_model)
    return lm


def train(config: TrainConfig) -> TrainResult:
    """Train and register one SAE in the active (or a new) MLflow run."""
    lm = prepare(config)
    mark_work_started()
    with mlflow.start_run(run_name=f"{config.architecture}-l0{config.target_l0}"):
        harvested = harvest_for(config, lm)
        acts_ND = harvested.cache.load_all()
        return train_and_register(config, harvested, acts_ND)


def config_of_run(run_id: str) -> TrainConfig:
    """The exact TrainConfig a training run logged as its JSON artifact."""
    values = mlflow.artifacts.load_dict(f"runs:/{run_id}/{TRAIN_CONFIG_ARTIFACT}")
    return TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.field_names()})


def resume(run_id: str) -> TrainResult:
    """Continue an interrupted training run from its last checkpoint, in the same run."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"resume_run_id {run_id!r} is not a run on this tracking server") from err
    if MODEL_VERSION_TAG in run.data.tags:
        raise ValueError(
            f"run {run_id} already finished and registered {run.data.tags[MODEL_VERSION_TAG]}"
        )
    config = config_of_run(run_id)
    lm = prepare(config)
    mark_work_started()
    # `mlflow run` opened a launcher run for this invocation; point it at the resumed one.
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher and launcher != run_id:
        MlflowClient().set_tag(launcher, "saeflow.resumed_run_id", run_id)
        MlflowClient().set_terminated(launcher)
    with mlflow.start_run(run_id=run_id):
        harvested = harvest_for(config, lm)
        return train_and_register(config, harvested, harvested.cache.load_all(), resume=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, TrainConfig)
    parser.add_argument(
        "--resume_run_id", default="none", help="continue this interrupted run ('none': new run)"
    )
    args = parser.parse_args()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    if args.resume_run_id not in {"", "none"}:
        result = resume(args.resume_run_id)
    else:
        result = train(config_from_args(TrainConfig, args))
    version = result.model_version
    print(f"trained run {result.run_id}: {result.metrics}")
    print(f"registered models:/{version.name}/{version.version}")
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
