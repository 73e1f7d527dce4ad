"""The GPU path, checked on the CPU: bf16 autocast and torch.compile train the same SAE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from project.registry import load_sae
from training.config import TrainConfig
from training.train import train


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
        training_tokens=256 * 60,
        cache_dir=str(tmp_path / "acts"),
        checkpoint_dir=str(
            tmp_path / f"ckpt-{overrides.get('precision', '')}-{overrides.get('compile', '')}"
        ),
        log_every_n_steps=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device": "tpu"}, "device='tpu' is not supported; valid: ['cpu', 'cuda', 'auto']"),
        ({"precision": "16-mixed"}, "precision='16-mixed' is not supported"),
    ],
)
def test_bad_device_or_precision_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(**changes).validate()


def test_cuda_without_a_gpu_is_refused_before_any_work() -> None:
    config = TrainConfig(device="cuda")
    if torch.cuda.is_available():  # a GPU machine: cuda is valid, auto means it
        config.validate()
        assert TrainConfig(device="auto").resolved_device() == "cuda"
    else:
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            config.validate()
        assert TrainConfig(device="auto").resolved_device() == "cpu"


ARCHS = os.environ.get("SAEFLOW_TEST_ARCHS", "topk,gated").split(",")


@pytest.mark.parametrize("architecture", ARCHS)
def test_bf16_and_compile_train_the_same_sae(
    architecture: str, tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    client = MlflowClient()
    results = {}
    for name, changes in {
        "eager": {},
        "compiled": {"compile": True},
        "bf16": {"precision": "bf16-mixed"},
    }.items():
        results[name] = train(
            tiny_config(tiny_lm_dir, tmp_path, architecture=architecture, **changes)
        )
    curves = {
        name: [
            m.value
            for m in sorted(client.get_metric_history(r.run_id, "mse"), key=lambda m: m.step)
        ]
        for name, r in results.items()
    }
    assert len(curves["eager"]) >= 50
    # Compiled: the same computation fused; float sums reassociated, which the L1 families'
    # λ controller and JumpReLU's thresholds carry forward (measured up to 0.5% by step 60).
    assert curves["compiled"] == pytest.approx(curves["eager"], rel=1e-2, abs=1e-6)
    # bf16 autocast: matmuls rounded to 8 bits of mantissa, so the curve follows, not matches.
    assert curves["bf16"] == pytest.approx(curves["eager"], rel=0.1)
    assert curves["bf16"] != curves["eager"]  # the autocast did run in bf16
    val = {name: client.get_run(r.run_id).data.metrics["val_mse"] for name, r in results.items()}
    assert val["compiled"] == pytest.approx(val["eager"], rel=1e-2)
    assert val["bf16"] == pytest.approx(val["eager"], rel=0.1)
    # What is registered is the plain module (no compiled wrapper), loadable as any other.
    sae = results["compiled"].sae
    assert "loss" not in vars(sae)
    acts = torch.randn(20, 64)
    version = results["compiled"].model_version
    loaded = load_sae(f"models:/{version.name}/{version.version}")
    with torch.no_grad():
        assert torch.equal(loaded.encode(acts), sae.eval().encode(acts))
    params = client.get_run(results["bf16"].run_id).data.params
    assert params["precision"] == "bf16-mixed" and params["device"] == "cpu"
