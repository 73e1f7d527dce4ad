"""saeflow <-> SAELens: what save_sae writes loads in SAELens with the same encode/decode, and
directories written by SAELens itself load with load_sae_dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import sae_lens.saes as lens_saes
import torch
from sae_lens import SAE

from project.saes import (
    ARCHITECTURES,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    SparseAutoencoder,
    TopKSAE,
    TrainStep,
    build_sae,
    load_sae_dir,
    save_sae,
)

D_IN, D_SAE = 16, 64
# The SAELens inference class each saeflow architecture becomes on disk.
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
    "matryoshka": "JumpReLUSAE",
}
METADATA = {
    "model_name": "tiny-lm",
    "hook_name": "model.layers.1",
    "hook_layer": 1,
    "context_size": 32,
}


def trained_sae(architecture: str) -> SparseAutoencoder:
    """A few Adam steps, so thresholds, gates and biases are all non-trivial."""
    torch.manual_seed(0)
    k = 4 if architecture in ("topk", "batchtopk", "matryoshka") else None
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        k=k,
        target_l0=4,
        l1_coefficient=1.0,
        threshold_start_step=5,
        metadata=dict(METADATA),
    )
    sae = build_sae(cfg)
    x_ND = torch.randn(512, D_IN) + 1
    sae.initialize_from_data(x_ND)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(20):
        out = sae.loss(x_ND[torch.randint(0, 512, (128,))], TrainStep(i, 20))
        optimizer.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return sae.eval()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_saeflow_dir_loads_in_saelens(architecture: str, tmp_path: Path) -> None:
    sae = trained_sae(architecture)
    path = save_sae(sae, tmp_path / architecture)
    lens = SAE.load_from_disk(path)
    assert type(lens).__name__ == SAELENS_CLASS[architecture]
    assert lens.cfg.metadata.hook_name == METADATA["hook_name"]
    x_BD = torch.randn(256, D_IN) * 2 + 1
    with torch.no_grad():
        f_BF = sae.encode(x_BD)
        torch.testing.assert_close(lens.encode(x_BD), f_BF, atol=1e-5, rtol=0)
        torch.testing.assert_close(lens.decode(f_BF), sae.decode(f_BF), atol=1e-5, rtol=0)
        torch.testing.assert_close(lens(x_BD), sae(x_BD), atol=1e-5, rtol=0)
    assert (f_BF > 0).any()
    if architecture == "topk":
        assert lens.cfg.k == 4
        assert torch.equal((f_BF > 0).sum(dim=-1), torch.full((256,), 4))


def test_topk_with_negative_preactivations_matches_saelens(tmp_path: Path) -> None:
    sae = trained_sae("topk")
    with torch.no_grad():
        sae.b_enc[:] = -1.0  # some tokens now have fewer than k positive pre-activations
    lens = SAE.load_from_disk(save_sae(sae, tmp_path / "topk"))
    x_BD = torch.randn(256, D_IN) * 0.1
    with torch.no_grad():
        f_BF = sae.encode(x_BD)
        assert (f_BF > 0).sum(dim=-1).min() < 4
        torch.testing.assert_close(lens.encode(x_BD), f_BF, atol=1e-5, rtol=0)


def _randomise(lens: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in lens.named_parameters():
            scale = 1.0 if name == "W_dec" else 0.3
            param.copy_(torch.randn_like(param) * scale)
        if hasattr(lens, "threshold"):
            lens.threshold.copy_(torch.rand_like(lens.threshold) * 0.5)


@pytest.mark.parametrize(
    ("name", "make", "saeflow_class"),
    [
        (
            "standard",
            lambda: lens_saes.StandardSAE(lens_saes.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            ReLUSAE,
        ),
        (
            "topk",
            lambda: lens_saes.TopKSAE(lens_saes.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)),
            TopKSAE,
        ),
        (
            "topk-rescaled",
            lambda: lens_saes.TopKSAE(
                lens_saes.TopKSAEConfig(
                    d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True
                )
            ),
            TopKSAE,
        ),
        (
            "jumprelu",
            lambda: lens_saes.JumpReLUSAE(lens_saes.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            JumpReLUSAE,
        ),
        (
            "gated",
            lambda: lens_saes.GatedSAE(lens_saes.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
            GatedSAE,
        ),
    ],
)
def test_saelens_dir_loads_in_saeflow(
    name: str, make: object, saeflow_class: type[SparseAutoencoder], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    lens = make()  # type: ignore[operator]
    _randomise(lens)
    lens.save_model(tmp_path / name)
    sae = load_sae_dir(tmp_path / name)
    assert type(sae) is saeflow_class
    x_BD = torch.randn(128, D_IN) * 2
    with torch.no_grad():
        f_BF = lens.encode(x_BD)
        torch.testing.assert_close(sae.encode(x_BD), f_BF, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae.decode(f_BF), lens.decode(f_BF), atol=1e-5, rtol=0)
    assert (f_BF > 0).any()


def test_saelens_batchtopk_inference_dir_loads_as_jumprelu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lens = lens_saes.BatchTopKTrainingSAE(
        lens_saes.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)
    )
    _randomise(lens)
    lens.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    lens.save_inference_model(tmp_path / "btk")
    reference = SAE.load_from_disk(tmp_path / "btk")
    sae = load_sae_dir(tmp_path / "btk")
    assert isinstance(sae, JumpReLUSAE)
    x_BD = torch.randn(128, D_IN) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x_BD), reference.encode(x_BD), atol=1e-5, rtol=0)


def test_saeflow_training_architecture_survives_saelens_fields(tmp_path: Path) -> None:
    """cfg.json says jumprelu to SAELens but batchtopk to saeflow."""
    sae = trained_sae("batchtopk")
    path = save_sae(sae, tmp_path / "btk")
    lens = SAE.load_from_disk(path)
    assert lens.cfg.architecture() == "jumprelu"
    assert lens.cfg.metadata.training_architecture == "batchtopk"
    assert isinstance(load_sae_dir(path), BatchTopKSAE)
