"""Every architecture trains, registers, and loads into SAELens with identical outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from sae_lens import SAE

from project.registry import SAE_ARTIFACT, load_sae
from project.saes import ARCHITECTURES
from training.config import TrainConfig
from training.sweep import SweepConfig, sweep


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_lm_dir_for: Callable[[str], str]) -> str:
    return tiny_lm_dir_for("qwen2")  # a second family beside the Llama of the other tests


def test_every_architecture_round_trips_through_the_registry_into_saelens(
    tiny_lm_dir: str, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = TrainConfig(
        model=tiny_lm_dir,
        layer=2,
        n_tokens=3000,
        context_size=32,
        expansion=4,
        batch_size=256,
        training_tokens=256 * 40,
        cache_dir=str(tmp_path / "acts"),
    )
    grid = SweepConfig(architectures=",".join(sorted(ARCHITECTURES)), target_l0s="8")
    results = sweep(base, grid)
    assert sorted(r.sae.cfg.architecture for r in results) == sorted(ARCHITECTURES)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    acts_ND = torch.randn(64, 64) * 3
    for result in results:
        version = result.model_version
        uri = f"models:/{version.name}/{version.version}"
        ours = load_sae(uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        theirs = SAE.load_from_disk(str(local / "artifacts" / SAE_ARTIFACT))
        with torch.no_grad():
            f_ours = ours.encode(acts_ND)
            f_theirs = theirs.encode(acts_ND)
            torch.testing.assert_close(f_theirs, f_ours, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                theirs.decode(f_ours), ours.decode(f_ours), atol=1e-5, rtol=0
            )
        assert version.tags["architecture"] == result.sae.cfg.architecture
        assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
