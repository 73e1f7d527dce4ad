"""A synthetic study on a real tracking store: registered versions with eval and steer runs.

For the analysis tests and ``bench/bench_analyze.py``: the runs, tags and registry entries are
written through the MLflow client exactly as ``evaluate`` and ``steer`` write them (same run
types, vocabulary and metric names), with metric values drawn so that µ and g are correlated
by a known amount. Nothing here trains or loads an SAE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mlflow.tracking import MlflowClient

from project.tracking import LM_TAG, RUN_TYPE_TAG, TRAINING_RUN_TAG, version_run_tags


@dataclass(frozen=True)
class SyntheticStudy:
    lms: tuple[str, ...] = ("lm-a", "lm-b")
    architectures: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu", "gated")
    target_l0s: tuple[int, ...] = (16, 32, 64)
    selections: tuple[str, ...] = ("none", "dtc")
    coupling: float = 0.6  # how strongly g follows µ
    eval_runs_per_version: int = 1  # older duplicates exercise "newest run wins"
    seed: int = 0


def write_study(client: MlflowClient, experiment: str, study: SyntheticStudy) -> int:
    """Register every (LM, architecture, L0) version and log its runs; returns the runs made."""
    rng = np.random.default_rng(study.seed)
    experiment_id = client.create_experiment(experiment)
    n_runs = 0
    clock = int(time.time() * 1000)  # strictly increasing start times: "newest" is defined

    def new_run(tags: dict[str, str]) -> str:
        nonlocal clock, n_runs
        clock += 1
        n_runs += 1
        return client.create_run(experiment_id, start_time=clock, tags=tags).info.run_id

    for lm in study.lms:
        name = f"sae-{lm}-l4-resid-post"
        client.create_registered_model(name)
        for architecture in study.architectures:
            for target in study.target_l0s:
                train_run_id = new_run({RUN_TYPE_TAG: "train"})
                client.set_terminated(train_run_id)
                measured = target * float(rng.uniform(0.9, 1.1))
                version = client.create_model_version(
                    name,
                    source=f"runs:/{train_run_id}/sae",
                    run_id=train_run_id,
                    tags={
                        LM_TAG: lm,
                        "architecture": architecture,
                        "target_l0": str(target),
                        "l0_measured": f"{measured:.3f}",
                        "layer": "4",
                        TRAINING_RUN_TAG: train_run_id,
                    },
                )
                links = {
                    **version_run_tags(name, version.version),
                    LM_TAG: lm,
                    "architecture": architecture,
                }
                mu = float(rng.uniform(0.5, 0.9))
                for repeat in range(study.eval_runs_per_version):
                    run_id = new_run({**links, RUN_TYPE_TAG: "eval", "eval": "autointerp"})
                    # Older duplicates first: only the newest (last written) carries the value.
                    final = repeat == study.eval_runs_per_version - 1
                    client.log_metric(run_id, "autointerp_score", mu if final else 0.0)
                    client.set_terminated(run_id)
                base = study.coupling * mu + (1 - study.coupling) * float(rng.uniform(0.5, 0.9))
                for selection in study.selections:
                    lift = 1.0 if selection == "none" else float(rng.uniform(1.0, 1.6))
                    run_id = new_run(
                        {
                            **links,
                            RUN_TYPE_TAG: "steer",
                            "steer_mode": "latent",
                            "selection": selection,
                        }
                    )
                    client.log_metric(run_id, "steering_score", base * lift)
                    client.set_terminated(run_id)
    return n_runs
