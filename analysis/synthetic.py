"""A synthetic study on a real tracking store: registered versions with eval and steer runs.

For the analysis tests and ``bench/bench_analyze.py``: the runs, tags, params and registry
entries are written through the MLflow client as ``evaluate`` and ``steer`` write them (same run
types, vocabulary, config params and metric names), with metric values drawn so that µ and g
are correlated by a known amount. Nothing here trains or loads an SAE. ``write_study_run``
also writes the study's parent run with its ``study_runs.json``, as ``analysis/study.py`` does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis.collect import STUDY_RUN_TYPE, STUDY_RUNS_ARTIFACT
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
    layer: int = 4
    d_sae: int = 256
    judge: str = "offline"
    n_concepts: int = 4  # a steer config field: studies that differ in it are two groups
    autointerp_latents: int = 20  # an eval config field
    log_lift: bool = False  # also log steering_score_lift (the concept-lift steering score)


def steer_params(selection: str, judge: str, n_concepts: int) -> dict[str, str]:
    """The params a latent-mode steer run logs for its config (as evaluation.steering.steer)."""
    from evaluation.steering.config import SteerConfig

    values = asdict(SteerConfig(mode="latent", selection=selection, n_concepts=n_concepts))
    stats = values.pop("stats")
    params = {
        k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
        for k, v in values.items()
    }
    params.update({f"stats_{k}": str(v) for k, v in stats.items()})
    params["judge"] = judge
    return params


def _log(client: MlflowClient, run_id: str, metrics: dict[str, float], params: dict) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    client.set_terminated(run_id)


def _write(client: MlflowClient, experiment: str, study: SyntheticStudy) -> list[dict[str, str]]:
    """Register every (LM, architecture, L0) version and log its runs; every run as a
    ``study_runs.json`` entry (step, run id, model URI, detail)."""
    rng = np.random.default_rng(study.seed)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    written: list[dict[str, str]] = []
    clock = int(time.time() * 1000)  # strictly increasing start times: "newest" is defined

    def new_run(step: str, tags: dict[str, str], uri: str = "", detail: str = "") -> str:
        nonlocal clock
        clock += 1
        run_id = client.create_run(experiment_id, start_time=clock, tags=tags).info.run_id
        written.append({"step": step, "run_id": run_id, "model_uri": uri, "detail": detail})
        return run_id

    for lm in study.lms:
        name = f"sae-{lm}-l{study.layer}-resid-post"
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        for architecture in study.architectures:
            for target in study.target_l0s:
                train_run_id = new_run("train", {RUN_TYPE_TAG: "train"})
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
                        "layer": str(study.layer),
                        "d_sae": str(study.d_sae),
                        TRAINING_RUN_TAG: train_run_id,
                    },
                )
                uri = f"models:/{name}/{version.version}"
                # Runs about a version carry its tags (project.runs.run_tags).
                links = {
                    **version_run_tags(name, version.version),
                    LM_TAG: lm,
                    "architecture": architecture,
                    "layer": str(study.layer),
                    TRAINING_RUN_TAG: train_run_id,
                }
                mu = float(rng.uniform(0.5, 0.9))
                eval_params = {"n_latents": study.autointerp_latents, "judge": study.judge}
                for repeat in range(study.eval_runs_per_version):
                    run_id = new_run(
                        "evaluate",
                        {**links, RUN_TYPE_TAG: "eval", "eval": "autointerp"},
                        uri,
                        "autointerp",
                    )
                    # Older duplicates first: only the newest (last written) carries the value.
                    final = repeat == study.eval_runs_per_version - 1
                    _log(client, run_id, {"autointerp_score": mu if final else 0.0}, eval_params)
                base = study.coupling * mu + (1 - study.coupling) * float(rng.uniform(0.5, 0.9))
                base_lift = float(rng.uniform(0.0, 0.5))
                for selection in study.selections:
                    lift = 1.0 if selection == "none" else float(rng.uniform(1.0, 1.6))
                    run_id = new_run(
                        "steer",
                        {
                            **links,
                            RUN_TYPE_TAG: "steer",
                            "steer_mode": "latent",
                            "selection": selection,
                            "judge": study.judge,
                        },
                        uri,
                        selection,
                    )
                    metrics = {"steering_score": base * lift}
                    if study.log_lift:
                        metrics["steering_score_lift"] = base_lift * lift
                        # Free credit where the score by lift falls short of the paper's.
                        metrics["free_concept_share"] = round(
                            max(0.0, 1 - base_lift / max(base, 1e-9)), 4
                        )
                    _log(
                        client,
                        run_id,
                        metrics,
                        steer_params(selection, study.judge, study.n_concepts),
                    )
    return written


def write_study(client: MlflowClient, experiment: str, study: SyntheticStudy) -> int:
    """Register every (LM, architecture, L0) version and log its runs; returns the runs made."""
    return len(_write(client, experiment, study))


def write_study_run(client: MlflowClient, experiment: str, study: SyntheticStudy) -> str:
    """:func:`write_study` under a study run that lists its runs in ``study_runs.json`` (as
    ``analysis/study.py`` logs it); returns the study run's id."""
    runs = _write(client, experiment, study)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    study_run = client.create_run(experiment_id, tags={RUN_TYPE_TAG: STUDY_RUN_TYPE}).info
    listed = [{**r, "reused": False} for r in runs if r["step"] != "train"]
    client.log_dict(study_run.run_id, {"runs": listed}, STUDY_RUNS_ARTIFACT)
    client.set_terminated(study_run.run_id)
    return study_run.run_id
