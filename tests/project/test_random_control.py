"""Random-init controls (`import_sae -P source=random:models:/NAME/V`) are real controls:
centred like a freshly initialised SAE and as sparse as the version they control.

References are SAEs of every architecture trained here for 150 steps with their own loss on
the tiny random LM's activations, then registered as training registers them; each control's
L0 is recomputed in the test from the registered weights, not read back from the tags alone.
"""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import Tensor

from project.import_sae import (
    CALIBRATION_TOKENS,
    INIT_TOKENS,
    L0_TOLERANCE,
    import_sae,
    sample_activations,
)
from project.lm import LoadedLM, load_lm
from project.registry import load_sae, register_sae
from project.saes import SparseAutoencoder, build_sae
from project.saes.base import SAEConfig, TrainStep, geometric_median
from project.tracking import LM_TAG

LAYER = 1
D_SAE = 256
TARGET_L0 = 8
ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir: str) -> LoadedLM:
    return load_lm(tiny_lm_dir)


@pytest.fixture(scope="module")
def harvest_ND(lm: LoadedLM) -> Tensor:
    """What training reads (and what a control's initialisation reads)."""
    return sample_activations(lm, LAYER, INIT_TOKENS)


@pytest.fixture(scope="module")
def heldout_ND(lm: LoadedLM) -> Tensor:
    """The held-out activations controls are calibrated on."""
    return sample_activations(lm, LAYER, CALIBRATION_TOKENS, region="eval")


def l0(sae: SparseAutoencoder, x_ND: Tensor) -> float:
    with torch.no_grad():
        return float((sae.eval().encode(x_ND) != 0).sum(dim=-1).float().mean())


def train_reference(architecture: str, x_ND: Tensor, steps: int = 150) -> SparseAutoencoder:
    """A short real training with the architecture's own loss (Adam, unit-norm decoder)."""
    torch.manual_seed(1)
    sparsity = (
        {"k": TARGET_L0}
        if architecture in ("topk", "batchtopk", "matryoshka")
        else {"target_l0": float(TARGET_L0)}
    )
    cfg = SAEConfig(architecture=architecture, d_in=x_ND.shape[1], d_sae=D_SAE, **sparsity)
    sae = build_sae(cfg)
    sae.initialize_from_data(x_ND[:2048])
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch_BD = x_ND[torch.randint(0, x_ND.shape[0], (256,), generator=generator)]
        out = sae.loss(batch_BD, TrainStep(step, steps))
        optimizer.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    calibrate = getattr(sae, "calibrate_threshold", None)
    if calibrate is not None:  # as training.run does for the BatchTopK family
        calibrate(x_ND)
    return sae.eval()


def register_reference(sae: SparseAutoencoder, lm_dir: str) -> str:
    """Register ``sae`` as a training run registers its SAE; returns its models:/ URI."""
    with mlflow.start_run() as run:
        version = register_sae(
            sae,
            registered_model=f"sae-tiny-l{LAYER}-resid-post",
            tags={
                "architecture": sae.cfg.architecture,
                "target_l0": TARGET_L0,
                "d_in": sae.cfg.d_in,
                "d_sae": sae.cfg.d_sae,
                LM_TAG: lm_dir,
                "hook_name": f"blocks.{LAYER}.hook_resid_post",
                "layer": LAYER,
                "n_tokens": INIT_TOKENS,
                "training_run_id": run.info.run_id,
            },
        )
    return f"models:/{version.name}/{version.version}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_control_is_centred_and_as_sparse_as_its_reference(
    architecture: str,
    tiny_lm_dir: str,
    harvest_ND: Tensor,
    heldout_ND: Tensor,
    tracking_uri: str,
) -> None:
    uri = register_reference(train_reference(architecture, harvest_ND), tiny_lm_dir)

    control = import_sae(f"random:{uri}")

    tags = control.tags
    assert tags["baseline"] == "random_init" and tags["baseline_of"] == uri
    ref_sae, control_sae = load_sae(uri), load_sae(f"models:/{control.name}/{control.version}")
    # Sparsity: the same L0 as the reference on the same held-out activations, recomputed here.
    ref_l0, control_l0 = l0(ref_sae, heldout_ND), l0(control_sae, heldout_ND)
    assert ref_l0 < D_SAE / 8, "the reference must be sparse for the test to mean anything"
    assert control_l0 == pytest.approx(ref_l0, rel=L0_TOLERANCE)
    assert float(tags["baseline_reference_l0"]) == pytest.approx(ref_l0, rel=1e-3)
    assert float(tags["l0_measured"]) == pytest.approx(control_l0, rel=1e-3)
    assert float(tags["metric.l0"]) == pytest.approx(control_l0, rel=1e-3)
    assert tags["calibration"].split("=")[0] in {
        "k",
        "threshold",
        "per_latent_threshold",
        "b_enc_shift",
        "b_gate_shift",
    }
    # It holds on other text too (the harvest region), not only where it was calibrated.
    assert l0(control_sae, harvest_ND) == pytest.approx(l0(ref_sae, harvest_ND), rel=0.35)
    # Centred like a fresh SAE: b_dec is initialize_from_data's geometric median, not 0.
    median_D = geometric_median(harvest_ND).float()
    assert median_D.norm() > 0.1 * harvest_ND.norm(dim=-1).mean()
    torch.testing.assert_close(control_sae.b_dec.detach(), median_D, atol=1e-4, rtol=1e-4)
    # Still untrained: random decoder directions, not the reference's.
    assert not torch.allclose(control_sae.W_dec, ref_sae.W_dec)


def test_control_of_a_reference_that_never_fires_registers_nothing(
    tiny_lm_dir: str, harvest_ND: Tensor, tracking_uri: str
) -> None:
    reference = train_reference("jumprelu", harvest_ND, steps=1)
    with torch.no_grad():
        reference.log_threshold.fill_(10.0)  # θ = e^10: nothing on these activations exceeds it
    uri = register_reference(reference, tiny_lm_dir)
    client = MlflowClient()
    runs_before = client.search_runs([e.experiment_id for e in client.search_experiments()])

    with pytest.raises(ValueError, match=r"random:models:/.*never fires"):
        import_sae(f"random:{uri}")

    versions = client.search_model_versions(f"name='sae-tiny-l{LAYER}-resid-post'")
    assert [str(v.version) for v in versions] == ["1"]
    runs_after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs_after) == len(runs_before)
