"""Where runs and models are recorded: one place that decides the tracking URI.

Every entry point calls :func:`configure_tracking` first, so trainers and evaluations never
hard-wire a backend. The embedded default is a SQLite store in the working directory; a shared
``mlflow server`` (PostgreSQL + S3 artifacts) is used by exporting ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import logging
import os
import time

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Tracking URIs that every machine of a cluster can reach (a SQLite file is one machine's).
SHARED_TRACKING_SCHEMES = ("http://", "https://", "postgresql", "mysql")
DEFAULT_EXPERIMENT = "saeflow"

# ---------------------------------------------------------------------------------------------
# The vocabulary. One name, one meaning, on registered versions and on every kind of run
# (harvest, train, import, eval, steer, analysis), so that search_runs filters and the analysis
# join on the same keys everywhere. Never reuse one of these names for something else.

# The language model an SAE reads (a short name such as "smollm2-135m-instruct", a hub id or a
# local path). On versions and on every run about a version. (SAELens's cfg.json calls this
# ``metadata.model_name``; that is a file format, not a tag.)
LM_TAG = "lm_name"
# The MLflow registered model (one per LM and hook site): "sae-<lm>-l<layer>-resid-post".
REGISTERED_MODEL_TAG = "registered_model"
# The version number within the registered model, as a string ("3").
MODEL_VERSION_NUMBER_TAG = "model_version"
# The version's full URI, "models:/NAME/VERSION", on runs about a version.
MODEL_URI_TAG = "model_uri"
# What kind of run this is: harvest, train, sweep, import, eval, evaluate, steer, analyze, ...
RUN_TYPE_TAG = "saeflow.run_type"
# Set on a training or import run once its SAE is registered: "models:/NAME/VERSION".
MODEL_VERSION_TAG = "saeflow.model_version"
# The run that produced a version's weights (a training or import run).
TRAINING_RUN_TAG = "training_run_id"

# Version tags written before the vocabulary was fixed used "model_name" for the LM.
_LEGACY_LM_TAG = "model_name"


def lm_of(tags: dict[str, str]) -> str | None:
    """The LM named by a version's (or run's) tags; reads versions registered before
    ``lm_name`` existed (they said ``model_name``)."""
    return tags.get(LM_TAG) or tags.get(_LEGACY_LM_TAG)


def version_run_tags(name: str, version: str | int) -> dict[str, str]:
    """The tags that link any run (eval, steer, probe, ...) to one registered version."""
    return {
        REGISTERED_MODEL_TAG: name,
        MODEL_VERSION_NUMBER_TAG: str(version),
        MODEL_URI_TAG: f"models:/{name}/{version}",
    }


def configure_tracking(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (or $MLFLOW_TRACKING_URI, or the SQLite default).

    ``mlflow run`` exports MLFLOW_TRACKING_URI and MLFLOW_RUN_ID to the entry point, so an
    entry point launched that way logs where the launcher expects. The registry uses the same
    store unless $MLFLOW_REGISTRY_URI says otherwise.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("file:") or (not uri.startswith(("http", "sqlite", "postgres", "mysql"))):
        raise ValueError(
            f"tracking URI {uri!r} is not supported: use sqlite:///PATH, postgresql://... "
            "or an http(s):// MLflow server (file: stores are refused by MLflow 3.13+)"
        )
    mlflow.set_tracking_uri(uri)
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    mlflow.set_registry_uri(registry_uri)
    # Only set an experiment when no run was handed to us: `mlflow run` already chose one.
    if experiment is not None and "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(experiment)
    log.debug("tracking at %s (registry %s)", uri, registry_uri)
    return uri


def init_schema(tracking_uri: str) -> None:
    """Create or migrate the tracking database once, before parallel workers start."""
    MlflowClient(tracking_uri).search_experiments(max_results=1)


def ui_hint(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store (for entry points' last lines)."""
    if tracking_uri.startswith("http"):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def set_version_tag(name: str, version: str | int, key: str, value: str, attempts: int = 5) -> None:
    """Set a model-version tag, safe against another process setting the same tag at once.

    MLflow's SQL store writes a version tag as select-then-insert, so two workers linking the
    same version (two ``tune_dtc`` workers measuring latent stats, say) can both insert and one
    fails on the unique key; by then the row exists, and setting it again updates it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            MlflowClient().set_model_version_tag(name, str(version), key, value)
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
