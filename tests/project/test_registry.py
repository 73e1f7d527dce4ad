"""Registration is idempotent per run (issue 21: MLflow's client retries POSTs, and a job can
crash between registering a version and tagging it)."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from project.lm import hook_name
from project.registry import CHECKSUM_TAG, load_sae, register_sae, sae_identity, version_of_run
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


def test_the_same_weights_have_one_identity_whichever_run_registered_them(
    tracking_uri: str,
) -> None:
    """Steering seeds its latent draws by sae_identity: the same SAE trained again in another
    store (or by a Ray worker) must draw the same latents, another SAE others."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    other_sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    client = MlflowClient()
    versions = []
    for model in (sae, sae, other_sae):
        with mlflow.start_run() as run:
            versions.append(register_sae(model, registered_model=NAME, tags=_tags(run.info.run_id)))
    first, again, other = versions
    assert first.run_id != again.run_id
    assert sae_identity(first) == sae_identity(again) != sae_identity(other)
    assert sae_identity(first).startswith("weights:")
    # A version registered before checksums: its training run.
    client.delete_model_version_tag(NAME, first.version, CHECKSUM_TAG)
    bare = client.get_model_version(NAME, first.version)
    assert sae_identity(bare) == first.run_id


def _registered(tmp_path: Path) -> tuple[str, Path]:
    """A registered version and the stored (not downloaded) directory of its SAE files."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4))
    with mlflow.start_run() as run:
        mv = register_sae(sae, registered_model=NAME, tags=_tags(run.info.run_id))
    (weights,) = (tmp_path / "mlartifacts").rglob("sae_weights.safetensors")
    return f"models:/{mv.name}/{mv.version}", weights.parent


class _Planted:
    """Unpickling this writes a marker file: the proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "pickle executed"))


def test_a_corrupted_or_truncated_weights_file_is_refused_never_loaded(
    tracking_uri: str, tmp_path: Path
) -> None:
    uri, stored = _registered(tmp_path)
    weights = stored / "sae_weights.safetensors"
    original = weights.read_bytes()
    assert load_sae(uri).cfg.d_sae == 32
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x01  # one bit inside a tensor: still parses as safetensors
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sae_weights.safetensors does not match the sha256"):
        load_sae(uri)
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_sae(uri)
    # A version registered without checksums (before they existed): a truncated file is a
    # clear error too.
    name, version = uri.removeprefix("models:/").split("/")
    MlflowClient().delete_model_version_tag(name, version, CHECKSUM_TAG)
    with pytest.raises(ValueError, match=f"{uri}: its SAE files cannot be read"):
        load_sae(uri)


def test_a_planted_pickle_is_never_executed_on_load(tracking_uri: str, tmp_path: Path) -> None:
    uri, stored = _registered(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))
    # Beside the weights, and as the pyfunc's pickled python_model (MLmodel rewritten to load
    # it, as an attacker with write access to the bucket would): saeflow reads safetensors only.
    (stored / "sae.pkl").write_bytes(payload)
    model_dir = stored.parent.parent
    (model_dir / "python_model.pkl").write_bytes(payload)
    mlmodel = model_dir / "MLmodel"
    code_loader = "loader_module: mlflow.pyfunc.loaders.code_model"
    assert code_loader in mlmodel.read_text()
    mlmodel.write_text(
        mlmodel.read_text().replace(
            code_loader, "loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl"
        )
    )
    sae = load_sae(uri)
    assert sae.cfg.d_sae == 32
    assert not marker.exists()
