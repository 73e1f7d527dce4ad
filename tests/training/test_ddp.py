"""Data-parallel training of one SAE (issue 21, item 7): ``devices=2 strategy=ddp`` on CPU
(gloo): the ranks split every global batch, only rank 0 (this process) touches MLflow and the
registry, and the token budget is the total."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import tiny_config

from training.data import ActivationDataModule, ShuffledBatches
from training.train import train


def test_the_ranks_split_every_global_batch_between_them() -> None:
    acts_ND = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    whole = iter(ShuffledBatches(acts_ND, 8, seed=1))
    ranks = [iter(ShuffledBatches(acts_ND, 8, seed=1, rank=r, world=2)) for r in range(2)]
    for _ in range(12):  # past the end of a pass: the next permutation is shared too
        parts = [next(rank) for rank in ranks]
        assert [p.shape[0] for p in parts] == [4, 4]
        assert torch.equal(torch.cat(parts), next(whole))


def test_the_data_module_gives_each_rank_its_slice() -> None:
    acts_ND = torch.randn(100, 3)
    module = ActivationDataModule(acts_ND, batch_size=8, val_fraction=0.2)
    whole = next(iter(module.train_dataloader()))
    module.trainer = SimpleNamespace(global_rank=1, world_size=2)  # what Lightning sets
    assert torch.equal(next(iter(module.train_dataloader())), whole[4:])


@pytest.mark.parametrize(
    ("devices", "strategy", "message"),
    [(2, "auto", "devices=2 with strategy='auto'"), (1, "ddp", "devices=1 with strategy='ddp'"),
     (3, "ddp", "must split evenly over devices=3"), (2, "fsdp", "strategy='fsdp'")],
)  # fmt: skip
def test_bad_parallel_settings_are_named(
    devices: int, strategy: str, message: str, tiny_lm_dir: str, tmp_path: Path
) -> None:
    config = tiny_config(tiny_lm_dir, tmp_path, devices=devices, strategy=strategy)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config.validate()


def test_two_rank_training_logs_and_registers_once_and_learns_as_one_device(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str
) -> None:
    one = train(tiny_config(tiny_lm_dir, tmp_path, checkpoint_dir=str(tmp_path / "c1")))
    two = train(
        tiny_config(
            tiny_lm_dir, tmp_path, devices=2, strategy="ddp", checkpoint_dir=str(tmp_path / "c2")
        )
    )
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`saeflow.run_type` = 'train'")
    assert len(runs) == 2  # no run from the second rank
    name = two.model_version.name
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    # The same optimiser steps (the budget is the total), each logged once, by rank 0.
    history = {
        result.run_id: client.get_metric_history(result.run_id, "loss") for result in (one, two)
    }
    steps_one = [m.step for m in history[one.run_id]]
    steps_two = [m.step for m in history[two.run_id]]
    assert steps_two == steps_one and len(set(steps_two)) == len(steps_two)
    # The same global batches: the loss curves agree (gradients are averaged over ranks).
    loss_one = torch.tensor([m.value for m in history[one.run_id]])
    loss_two = torch.tensor([m.value for m in history[two.run_id]])
    assert torch.allclose(loss_one[:5], loss_two[:5], rtol=1e-3)
    assert torch.allclose(loss_one, loss_two, rtol=0.05)
    assert two.metrics["explained_variance"] == pytest.approx(
        one.metrics["explained_variance"], abs=0.02
    )
