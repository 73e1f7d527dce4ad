"""Training, registration and loading on a tiny random LM saved as a local HF directory."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from project.registry import load_sae
from training import module as training_module
from training.config import TrainConfig
from training.run import (
    RESUMED_FROM_STEP_METRIC,
    checkpoint_step,
    harvest_for,
    train_and_register,
)
from training.sweep import SweepConfig, sweep
from training.train import resume, train


def tiny_config(tiny_lm_dir: str, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        model=tiny_lm_dir,
        layer=1,
        n_tokens=3000,
        context_size=32,
        architecture="topk",
        target_l0=8,
        expansion=4,
        batch_size=256,
        training_tokens=256 * 120,
        cache_dir=str(tmp_path / "acts"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_train_registers_a_loadable_version(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = train(tiny_config(tiny_lm_dir, tmp_path))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(result.run_id, "loss")
    assert len(history) >= 5
    for metric in ("mse", "l0", "explained_variance", "dead_fraction", "lr"):
        assert client.get_metric_history(result.run_id, metric), metric
    assert history[-1].value < history[0].value

    version = result.model_version
    tags = version.tags
    assert tags["architecture"] == "topk" and tags["target_l0"] == "8"
    assert tags["training_run_id"] == result.run_id
    assert tags["d_in"] == "64" and tags["d_sae"] == "256" and tags["layer"] == "1"
    assert tags["hook_name"] == "blocks.1.hook_resid_post"
    assert "metric.explained_variance" in tags and version.description

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    uri = f"models:/{version.name}/{version.version}"
    loaded = load_sae(uri)
    acts = torch.randn(50, 64)
    with torch.no_grad():
        expected = result.sae.eval().encode(acts)
        assert torch.equal(loaded.encode(acts), expected)
        assert ((loaded.encode(acts) != 0).sum(-1) <= 8).all()
    client.set_registered_model_alias(version.name, "candidate", version.version)
    assert torch.equal(load_sae(f"models:/{version.name}@candidate").encode(acts), expected)
    predicted = mlflow.pyfunc.load_model(uri).predict(acts.numpy())
    np.testing.assert_allclose(predicted, expected.numpy(), atol=1e-6)


def test_identical_harvest_is_reused(tiny_lm_dir: str, tmp_path: Path, tracking_uri: str) -> None:
    config = tiny_config(tiny_lm_dir, tmp_path)
    first = harvest_for(config)
    second = harvest_for(config)
    assert not first.reused and second.reused
    assert first.harvest_run_id == second.harvest_run_id
    assert torch.equal(first.cache.load_all(), second.cache.load_all())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architecture": "sparsemax"}, "sparsemax"),
        ({"target_l0": 0}, "target_l0=0"),
        ({"target_l0": 256}, "d_sae=256"),
        ({"layer": 9}, "layer 9"),
        ({"model": "/no/such/model-dir"}, "/no/such/model-dir"),
        ({"dataset": "/no/such/corpus.jsonl"}, "/no/such/corpus.jsonl"),
    ],
)
def test_bad_input_fails_before_any_work(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tiny_lm_dir, tmp_path, **overrides))
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_registered_models() == []


def test_nan_loss_fails_the_run_and_registers_nothing(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    config = tiny_config(tiny_lm_dir, tmp_path)
    harvested = harvest_for(config)
    acts = harvested.cache.load_all().clone()
    acts[::7] = float("nan")
    with pytest.raises(training_module.NonFiniteLossError), mlflow.start_run() as run:
        train_and_register(config, harvested, acts)
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert MlflowClient().search_registered_models() == []


def test_interrupted_training_resumes_in_the_same_run(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wide dictionary at k = 2: a batch leaves most latents silent, so their counters run.
    config = tiny_config(
        tiny_lm_dir, tmp_path, training_tokens=256 * 100, expansion=16, target_l0=2
    )
    original_step = training_module.SAETrainingModule.training_step
    # The dead-latent counter as step 50 starts: once in the first run, once after resuming
    # from the step-50 checkpoint.
    counters_at_50: list[torch.Tensor] = []

    def crash_at_step_70(self, batch, batch_idx):
        if self.global_step == 50:
            counters_at_50.append(self.sae.tokens_since_fired_F.clone())
        if self.global_step == 70 and len(counters_at_50) == 1:  # the first run only
            raise RuntimeError("simulated crash")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(training_module.SAETrainingModule, "training_step", crash_at_step_70)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config)
    client = MlflowClient()
    (failed,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`saeflow.run_type` = 'train'",
    )
    assert failed.info.status == "FAILED"
    assert client.search_registered_models() == []
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    # The checkpoint is an artifact of the run: a resume on a machine without the local file
    # (here: the file deleted) continues from it.
    artifacts = [a.path for a in client.list_artifacts(failed.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/last.ckpt"]
    # What a ddp resume logs (its ranks, not this process, load the checkpoint).
    assert checkpoint_step(str(tmp_path / "ckpt" / "last.ckpt")) == 50
    shutil.rmtree(tmp_path / "ckpt")

    result = resume(failed.info.run_id)
    assert result.run_id == failed.info.run_id
    assert client.get_run(result.run_id).data.metrics[RESUMED_FROM_STEP_METRIC] == 50
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    # Checkpoint at step 50, crash at 70: steps 50-69 are logged twice, 0-49 only once.
    assert max(steps) >= 90
    assert any(steps.count(s) == 2 for s in range(50, 70))
    assert all(steps.count(s) <= 1 for s in range(50))
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert math.isfinite(result.metrics["explained_variance"])
    first, resumed = counters_at_50
    assert first.sum() > 0 and torch.equal(first, resumed), "resume lost the dead-latent counter"


def test_sweep_harvests_once_and_nests_one_run_per_sae(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    base = tiny_config(tiny_lm_dir, tmp_path, training_tokens=256 * 30)
    grid = SweepConfig(architectures="topk,relu", target_l0s="4,8", l1_coefficients="1,0.5")
    results = sweep(base, grid)
    assert len(results) == 4
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    harvests = client.search_runs(experiments, "tags.`saeflow.run_type` = 'harvest'")
    assert len(harvests) == 1
    (parent,) = client.search_runs(experiments, "tags.`saeflow.run_type` = 'sweep'")
    children = client.search_runs(
        experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    trained = [r for r in children if r.data.tags.get("saeflow.run_type") == "train"]
    assert len(trained) == 4
    versions = client.search_model_versions(f"name = '{results[0].model_version.name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    relu_lambdas = {
        r.data.params["l1_coefficient"] for r in trained if r.data.params["architecture"] == "relu"
    }
    assert relu_lambdas == {"1.0", "0.5"}


def test_sweep_rejects_a_bad_grid_before_work(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    base = tiny_config(tiny_lm_dir, tmp_path)
    with pytest.raises(ValueError, match="bogus"):
        sweep(base, SweepConfig(architectures="topk,bogus", target_l0s="4"))
    with pytest.raises(ValueError, match="one λ per target"):
        sweep(base, SweepConfig(architectures="relu", target_l0s="4,8", l1_coefficients="1"))
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
