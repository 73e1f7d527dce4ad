"""Registration is idempotent per run (issue 21: MLflow's client retries POSTs, and a job can
crash between registering a version and tagging it)."""

from __future__ import annotations

import mlflow
import torch
from mlflow.tracking import MlflowClient

from project.lm import hook_name
from project.registry import register_sae, version_of_run
from project.saes import SAEConfig, build_sae
from project.tracking import LM_TAG

NAME = "sae-registry-test"


def _tags(run_id: str) -> dict[str, object]:
    return {
        "architecture": "topk",
        "target_l0": 4,
        "d_in": 16,
        "d_sae": 32,
        LM_TAG: "tiny",
        "hook_name": hook_name(1),
        "layer": 1,
        "n_tokens": 100,
        "training_run_id": run_id,
    }


def test_a_run_registers_one_version_however_often_it_is_asked(tracking_uri: str) -> None:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    client = MlflowClient()
    with mlflow.start_run() as run:
        first = register_sae(
            sae, registered_model=NAME, tags=_tags(run.info.run_id), metrics={"l0": 4.0}
        )
        # A crash after registering, before every tag landed: the retry completes the tags.
        client.delete_model_version_tag(NAME, first.version, "metric.l0")
        client.delete_model_version_tag(NAME, first.version, "layer")
        again = register_sae(
            sae, registered_model=NAME, tags=_tags(run.info.run_id), metrics={"l0": 4.0}
        )
    assert again.version == first.version
    assert again.tags["metric.l0"] == "4" and again.tags["layer"] == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    assert version_of_run(NAME, run.info.run_id).version == first.version
    # The retry logged no second model from the run.
    experiment = run.info.experiment_id
    logged = client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert len(logged) == 1
    # Another run registers its own version.
    with mlflow.start_run() as other:
        second = register_sae(sae, registered_model=NAME, tags=_tags(other.info.run_id))
    assert int(second.version) == int(first.version) + 1
    assert version_of_run(NAME, "no-such-run") is None
    assert version_of_run("no-such-model", run.info.run_id) is None
