"""The foundation issue's user path on the embedded SmolLM2: `mlflow run . -e train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from project.lm import load_lm, residual_activations
from project.registry import load_sae
from project.sae_probes import load_dataset

REPO = Path(__file__).resolve().parents[2]


def fresh_activations(layer: int, n_sentences: int = 64) -> torch.Tensor:
    """SmolLM2 activations at ``layer`` on movie-review sentences the SAE never saw."""
    lm = load_lm()
    sentences, _ = load_dataset("92_glue_sst2")  # SST-2, from the installed sae-probes package
    rows = []
    for sentence in sentences[:n_sentences]:
        ids_BT = lm.tokenizer(sentence, return_tensors="pt").input_ids
        acts_BTD = residual_activations(lm, ids_BT, layer)
        rows.append(acts_BTD[0, 1:])  # position 0 is the attention sink, excluded as in harvest
    return torch.cat(rows)


def test_mlflow_run_train_topk_on_smollm2(tmp_path: Path, tracking_uri: str) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    command = [
        str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train",
        "--env-manager", "local", "-P", "architecture=topk", "-P", "target_l0=16",
        "-P", "layer=4", "-P", "n_tokens=40000", "-P", "expansion=4",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]

    (registered,) = MlflowClient().search_registered_models()
    (version,) = MlflowClient().search_model_versions(f"name = '{registered.name}'")
    assert registered.name == "sae-smollm2-135m-instruct-l4-resid-post"
    assert version.tags["d_sae"] == "2304" and version.tags["target_l0"] == "16"
    sae = load_sae(f"models:/{registered.name}/{version.version}")

    acts_ND = fresh_activations(layer=4)
    with torch.no_grad():
        f_NF = sae.encode(acts_ND)
        x_hat_ND = sae.decode(f_NF)
    assert ((f_NF != 0).sum(dim=-1) == 16).all()
    explained = 1 - (acts_ND - x_hat_ND).var(dim=0).sum() / acts_ND.var(dim=0).sum()
    assert explained > 0.6


def test_bad_layer_exits_nonzero_and_registers_nothing(tmp_path: Path, tracking_uri: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "training.train", "--layer", "40"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ),
    )  # fmt: skip
    assert completed.returncode == 2
    assert "layer 40" in completed.stderr and "0..29" in completed.stderr
    assert MlflowClient().search_registered_models() == []
