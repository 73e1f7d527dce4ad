"""Issue 8, training side: every logged number means what its name says.

Dead latents and AuxK engage within a run, relu/gated reach target_l0 through the λ
controller, BatchTopK's threshold is METHODS' running mean (calibration an option, both
logged), and one failing SAE of a sweep does not stop the others. Tiny random LM, real
MLflow SQLite store, real Lightning training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from project import cli
from project.saes import GatedSAE
from project.saes.base import explained_variance
from training import module as training_module
from training.config import TrainConfig
from training.run import L0_MEASURED_TAG
from training.sweep import FAILED_SAES_TAG, SweepConfig, sweep
from training.train import train


def tiny_config(tiny_lm_dir: str, tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
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
    return TrainConfig(**values)  # type: ignore[arg-type]


def history(run_id: str, metric: str) -> list[float]:
    """The metric's values in step order."""
    entries = MlflowClient().get_metric_history(run_id, metric)
    return [m.value for m in sorted(entries, key=lambda m: (m.step, m.timestamp))]


# ----------------------------------------------------------------------------- item 1
def test_dead_window_scales_with_the_run() -> None:
    assert TrainConfig(training_tokens=6_000_000).resolved_dead_tokens_window() == 120_000
    assert TrainConfig(training_tokens=10**9).resolved_dead_tokens_window() == 10_000_000
    assert TrainConfig(training_tokens=400_000).resolved_dead_tokens_window() == 8000
    assert TrainConfig(training_tokens=100_000).resolved_dead_tokens_window() == 2 * 2048
    assert TrainConfig(dead_tokens_window=123).resolved_dead_tokens_window() == 123
    with pytest.raises(ValueError, match="dead_tokens_window=-1"):
        TrainConfig(dead_tokens_window=-1).validate()


def test_latents_die_and_auxk_engages_in_a_short_run(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    # A wide dictionary at small k: some latents stop firing within the (auto) window.
    config = tiny_config(tiny_lm_dir, tmp_path, expansion=16, target_l0=2)
    result = train(config)
    run_id = result.run_id
    assert result.sae.cfg.dead_tokens_threshold == config.resolved_dead_tokens_window() == 614
    dead = history(run_id, "dead_fraction")
    auxk = history(run_id, "auxk_loss")
    silence = history(run_id, "tokens_since_fired_max")
    assert max(dead) > 0, "no latent ever counted dead"
    assert sum(a > 0 for a in auxk) >= 3, "AuxK never engaged"
    # A latent is dead exactly when its silence reaches the window.
    window = config.resolved_dead_tokens_window()
    assert len(dead) == len(silence) >= 10
    for d, s in zip(dead, silence, strict=True):
        assert (d > 0) == (s >= window), (d, s, window)
    # Held out: the share of latents that fire on none of the validation tokens.
    val_dead = result.metrics["dead_fraction"]
    assert 0 < val_dead < 1
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["val_dead_fraction"] == pytest.approx(val_dead)


def test_explained_variance_is_written_once() -> None:
    # training logs the same function the SAE package defines (and import_sae uses).
    assert training_module.explained_variance is explained_variance


# ----------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("architecture", ["relu", "gated"])
def test_l1_families_reach_target_l0_and_tag_the_measured_l0(
    architecture: str, tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    config = tiny_config(tiny_lm_dir, tmp_path, architecture=architecture, target_l0=12)
    result = train(config)
    assert result.sae.cfg.l1_control == "target_l0"
    l0 = result.metrics["l0"]
    assert 12 * 0.75 <= l0 <= 12 * 1.25, f"{architecture}: held-out L0 {l0:.1f}, target 12"
    # λ is logged every logged step, and the controller moved it (a fixed λ only ramps up).
    lambdas = history(result.run_id, "l1_lambda")
    assert len(lambdas) >= 10 and min(lambdas[1:]) > 0
    assert max(lambdas[1:]) > 1.5 * min(lambdas[1:]) and lambdas[-1] != lambdas[1]
    tags = result.model_version.tags
    assert tags["target_l0"] == "12"
    assert float(tags[L0_MEASURED_TAG]) == pytest.approx(l0, rel=1e-3)
    assert float(tags["metric.l0"]) == pytest.approx(l0, rel=1e-3)


def test_fixed_l1_coefficient_stays_available(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    config = tiny_config(tiny_lm_dir, tmp_path, architecture="relu", l1_coefficient=0.5)
    result = train(config)
    assert result.sae.cfg.l1_control == "fixed" and result.sae.cfg.l1_coefficient == 0.5
    assert L0_MEASURED_TAG in result.model_version.tags


# ----------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("choice", ["running_mean", "calibrated"])
def test_batchtopk_threshold_running_mean_by_default_calibration_optional(
    choice: str, tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    config = tiny_config(
        tiny_lm_dir, tmp_path, architecture="batchtopk", batchtopk_threshold=choice
    )
    result = train(config)
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    running, calibrated = metrics["threshold_running_mean"], metrics["threshold_calibrated"]
    assert running > 0 and calibrated > 0 and running != pytest.approx(calibrated, rel=1e-6)
    used = float(result.sae.threshold[0])
    assert used == pytest.approx(running if choice == "running_mean" else calibrated, rel=1e-6)
    # The running mean is the plain mean of the per-batch k·B-th values from the start step,
    # min(1000, 10% of the run) = step 12 of 120 (logged every 10 steps: compare loosely).
    batch_values = history(result.run_id, "threshold_batch")
    assert len(batch_values) >= 10
    assert min(batch_values) < running < max(batch_values)


def test_bad_threshold_choice_is_bad_input(tiny_lm_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batchtopk_threshold='median'.*running_mean"):
        tiny_config(tiny_lm_dir, tmp_path, batchtopk_threshold="median").validate()


# ----------------------------------------------------------------------------- item 10
def test_one_failing_sae_does_not_stop_the_sweep(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_loss = GatedSAE.loss

    def nan_loss(self, x_BD, step):  # a gated SAE whose loss diverges
        out = original_loss(self, x_BD, step)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GatedSAE, "loss", nan_loss)
    base = tiny_config(tiny_lm_dir, tmp_path, training_tokens=256 * 20)
    grid = SweepConfig(architectures="topk,gated,relu", target_l0s="8")
    with pytest.raises(cli.PartialFailureError, match="1 of 3 SAEs failed: gated-l08") as caught:
        sweep(base, grid)
    assert caught.value.failed == ["gated-l08"]
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`saeflow.run_type` = 'sweep'")
    assert parent.data.tags[FAILED_SAES_TAG] == "gated-l08"
    assert "NonFiniteLossError" in parent.data.tags["saeflow.error.gated-l08"]
    assert parent.info.status == "FAILED"
    children = client.search_runs(
        experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    status = {
        r.info.run_name: r.info.status
        for r in children
        if r.data.tags.get("saeflow.run_type") != "harvest"
    }
    assert status == {"topk-l08": "FINISHED", "gated-l08": "FAILED", "relu-l08": "FINISHED"}
    (model,) = client.search_registered_models()
    versions = client.search_model_versions(f"name = '{model.name}'")
    assert sorted(v.tags["architecture"] for v in versions) == ["relu", "topk"]


def _exit_code(main) -> int:
    with pytest.raises(SystemExit) as caught:
        cli.run_entry_point(main)
    return int(caught.value.code)


def test_exit_codes_say_what_happened() -> None:
    def bad_input() -> None:
        raise ValueError("layer=40 is out of range")

    def value_error_after_work_started() -> None:
        cli.mark_work_started()
        raise ValueError("no positive pre-activation on the sample")

    def bad_input_found_late() -> None:
        cli.mark_work_started()
        raise cli.BadInputError("column 'txt' is not in the dataset")

    def partial() -> None:
        cli.mark_work_started()
        raise cli.PartialFailureError("1 of 3 SAEs failed: gated-l08", ["gated-l08"])

    def crash() -> None:
        raise RuntimeError("out of memory")

    assert _exit_code(bad_input) == cli.EXIT_BAD_INPUT == 2
    assert _exit_code(value_error_after_work_started) == cli.EXIT_FAILED == 1
    assert _exit_code(bad_input_found_late) == cli.EXIT_BAD_INPUT
    assert _exit_code(partial) == cli.EXIT_PARTIAL == 3
    assert _exit_code(crash) == cli.EXIT_FAILED
    assert _exit_code(bad_input) == cli.EXIT_BAD_INPUT  # each entry point starts afresh


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
