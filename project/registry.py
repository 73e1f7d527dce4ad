"""SAEs in the MLflow Model Registry: register a trained SAE, load any version back.

A version is a pyfunc "model from code" (project/sae_pyfunc.py) whose artifact ``sae`` is the
SAELens v6 directory, so the same files load into saeflow, into SAELens and into
``mlflow.pyfunc.load_model``. Nothing is pickled on the way in or out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from project.saes import SparseAutoencoder, load_sae_dir, save_sae
from project.saes.io import SAE_CFG_FILENAME
from project.tracking import LM_TAG

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("sae_pyfunc.py")
SAE_ARTIFACT = "sae"
# Version tag: {file name: sha256} of the SAE directory as registered; checked on every load.
CHECKSUM_TAG = "files_sha256"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
# Tags every registered version carries (issue: train, register, load).
VERSION_TAG_KEYS = (
    "architecture",
    "target_l0",
    "d_in",
    "d_sae",
    LM_TAG,
    "hook_name",
    "layer",
    "n_tokens",
    "training_run_id",
)


def default_registered_model_name(model_name: str, layer: int) -> str:
    """``sae-<lm>-l<layer>-resid-post``: one registered model per LM and hook site."""
    lm_slug = re.sub(r"[^a-z0-9]+", "-", Path(model_name.rstrip("/")).name.lower()).strip("-")
    return f"sae-{lm_slug}-l{layer}-resid-post"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into (name, version, alias)."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise ValueError(
            f"model URI {uri!r} is not valid: expected models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    return match["name"], match["version"], match["alias"]


def register_sae(
    sae: SparseAutoencoder,
    *,
    registered_model: str,
    tags: dict[str, Any],
    metrics: dict[str, float] | None = None,
    description: str = "",
) -> ModelVersion:
    """Log ``sae`` as a pyfunc model in the active run and register it as a new version.

    Version tags carry ``tags`` (see VERSION_TAG_KEYS) and the final metrics as
    ``metric.<name>``, so a registry search alone tells what each version is.

    Idempotent per run: where the active run already registered a version of
    ``registered_model`` (a retried call, a job resumed after a crash between registering and
    tagging), that version is returned with its tags completed, and nothing is logged or
    registered again.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_sae needs an active MLflow run (the training run)")
    missing = [key for key in VERSION_TAG_KEYS if key not in tags]
    if missing:
        raise ValueError(f"version tags {missing} are missing; required: {list(VERSION_TAG_KEYS)}")
    all_tags = {key: str(value) for key, value in tags.items()}
    all_tags.update({f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()})
    existing = version_of_run(registered_model, run.info.run_id)
    if existing is not None:
        return _complete_tags(existing, all_tags)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, sae.cfg.d_in))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, sae.cfg.d_sae))]),
    )
    with tempfile.TemporaryDirectory(prefix="saeflow-register-") as tmp:
        sae_dir = save_sae(sae, Path(tmp) / SAE_ARTIFACT)
        all_tags[CHECKSUM_TAG] = json.dumps(file_checksums(sae_dir), sort_keys=True)
        info = mlflow.pyfunc.log_model(
            name=SAE_ARTIFACT,
            python_model=str(PYFUNC_CODE),
            artifacts={SAE_ARTIFACT: str(sae_dir)},
            signature=signature,
            pip_requirements=["saeflow", "torch", "safetensors", "mlflow"],
        )
    version = mlflow.register_model(info.model_uri, registered_model, tags=all_tags)
    client = MlflowClient()
    if description:
        client.update_model_version(registered_model, version.version, description=description)
    registered = client.get_registered_model(registered_model)
    if not registered.description:
        client.update_registered_model(
            registered_model,
            description=f"SAEs on {tags[LM_TAG]} at {tags['hook_name']} (trained or imported)",
        )
    log.info("registered %s version %s", registered_model, version.version)
    return client.get_model_version(registered_model, version.version)


def version_of_run(registered_model: str, run_id: str) -> ModelVersion | None:
    """The version of ``registered_model`` that run ``run_id`` registered (the oldest, were
    there several), or None (also when the registered model does not exist yet)."""
    escaped_name, escaped_run = (v.replace("'", "\\'") for v in (registered_model, run_id))
    try:
        found = MlflowClient().search_model_versions(
            f"name = '{escaped_name}' and run_id = '{escaped_run}'"
        )
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise  # a failing server is not "never registered": that would register twice
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _complete_tags(version: ModelVersion, tags: dict[str, str]) -> ModelVersion:
    """``version`` with every tag of ``tags`` set (those a crash left unset or different)."""
    client = MlflowClient()
    for key, value in tags.items():
        if (version.tags or {}).get(key) != value:
            client.set_model_version_tag(version.name, version.version, key, value)
    log.info("run already registered %s version %s; reused", version.name, version.version)
    return client.get_model_version(version.name, version.version)


def model_version(uri: str) -> ModelVersion:
    """The version ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names.

    Raises:
        ValueError: a malformed URI, or one that does not resolve (the message names it).
    """
    name, version, alias = parse_model_uri(uri)
    client = MlflowClient()
    try:
        if version:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"model URI {uri!r} does not resolve: {err.message}") from err


def load_sae(uri: str) -> SparseAutoencoder:
    """Load a registered SAE (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``), eval mode.

    Reads the SAELens directory with safetensors: works with
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
    """
    return load_version(model_version(uri))


def load_version(mv: ModelVersion) -> SparseAutoencoder:
    """Load the SAE of an already resolved model version, eval mode (see :func:`load_sae`).

    Raises:
        ValueError: the version's files differ from the checksums registered with it, or do
            not parse (a truncated or corrupted artifact): never a wrong SAE.
    """
    uri = f"models:/{mv.name}/{mv.version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)) / "artifacts" / SAE_ARTIFACT
    registered = (mv.tags or {}).get(CHECKSUM_TAG)
    if registered:
        found = file_checksums(local)
        for name, digest in json.loads(registered).items():
            if found.get(name) != digest:
                raise ValueError(
                    f"{uri}: {name} does not match the sha256 registered with the version "
                    f"({digest[:12]}…, found {str(found.get(name, 'no file'))[:12]}…): the "
                    "artifact is corrupted or was replaced; not loading it"
                )
    try:
        return load_sae_dir(local).eval()
    except Exception as err:  # safetensors and JSON errors of a damaged file
        raise ValueError(
            f"{uri}: its SAE files cannot be read ({type(err).__name__}: {err})"
        ) from err


def sae_identity(mv: ModelVersion) -> str:
    """The SAE's identity for seeding its random draws (steered latents, random vectors): the
    sha256 of its weights as registered, so that the same weights draw the same latents in any
    tracking store (a study run again elsewhere, or through executor=ray, registers them under
    other run ids); the training run id for versions registered without checksums."""
    registered = json.loads((mv.tags or {}).get(CHECKSUM_TAG) or "{}")
    # The tensors' files only: cfg.json's metadata may name where the SAE was trained.
    tensors = {name: digest for name, digest in registered.items() if name != SAE_CFG_FILENAME}
    if tensors:
        joined = ",".join(f"{name}={tensors[name]}" for name in sorted(tensors))
        return "weights:" + hashlib.sha256(joined.encode()).hexdigest()
    return mv.run_id or f"{mv.name}/{mv.version}"


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file of an SAE directory, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(directory).iterdir())
        if path.is_file()
    }
