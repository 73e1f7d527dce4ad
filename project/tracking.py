"""Where runs and models are recorded: one place that decides the tracking URI.

Every entry point calls :func:`configure_tracking` first, so trainers and evaluations never
hard-wire a backend. The embedded default is a SQLite store in the working directory; a shared
``mlflow server`` (PostgreSQL + S3 artifacts) is used by exporting ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import logging
import os

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "saeflow"

# Tags shared by every saeflow run, so the analysis can tell run kinds apart in search_runs.
RUN_TYPE_TAG = "saeflow.run_type"
# Set on a training or import run once its SAE is registered: "models:/NAME/VERSION".
MODEL_VERSION_TAG = "saeflow.model_version"


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
