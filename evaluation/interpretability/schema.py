"""What every evaluation returns, and the SAEBench-shaped JSON document saeflow logs for it.

Each evaluation module exposes a typed config dataclass and a function
``compute(sae, lm, layer, config, ...) -> EvalOutput``; the entry point
(evaluation/interpretability/evaluate.py) turns an EvalOutput into one MLflow run per (model version, eval) with
``sae_bench_document`` as its artifact.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any


@dataclass
class EvalOutput:
    """Metrics grouped by category (SAEBench's ``eval_result_metrics``), plus details.

    ``metrics``: ``{category: {metric_name: value}}``, flat inside each category; metric names
    follow SAELens/SAEBench where one exists. ``details``: SAEBench's
    ``eval_result_details`` (a list of dicts, e.g. per task). ``tables``: column-oriented tables
    to log with ``mlflow.log_table`` (name -> {column: values}), e.g. per-latent explanations.
    """

    metrics: dict[str, dict[str, float]]
    details: list[dict[str, Any]] = field(default_factory=list)
    unstructured: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        """``{metric_name: value}`` for MLflow; a name in two categories gets a prefix."""
        flat: dict[str, float] = {}
        seen: dict[str, int] = {}
        for values in self.metrics.values():
            for name in values:
                seen[name] = seen.get(name, 0) + 1
        for category, values in self.metrics.items():
            for name, value in values.items():
                key = name if seen[name] == 1 else f"{category}.{name}"
                flat[key] = float(value)
        return flat


def sae_bench_document(
    eval_type_id: str,
    config: Any,
    output: EvalOutput,
    *,
    sae_cfg_dict: dict[str, Any],
    registry_uri: str,
    sae_lens_version: str,
) -> dict[str, Any]:
    """SAEBench's output schema for one (SAE, eval), plus saeflow's registry URI."""
    return {
        "eval_type_id": eval_type_id,
        "eval_config": asdict(config) if is_dataclass(config) else dict(config),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": output.metrics,
        "eval_result_details": output.details,
        "sae_bench_commit_hash": None,
        "sae_lens_id": registry_uri,
        "sae_lens_release_id": "saeflow",
        "sae_lens_version": sae_lens_version,
        "sae_cfg_dict": sae_cfg_dict,
        "eval_result_unstructured": output.unstructured,
        "saeflow_registry_uri": registry_uri,
    }
