"""The study's units of work, each a function of the study's config that returns what it did.

A unit (train one SAE, evaluate one version, steer the versions under one selection, tune DTC
on one version) touches nothing but the tracking server and the files it names, so the same
function runs inside the study's process (``executor=local``) or on any worker of a Ray
cluster (``executor=ray``, ``analysis/cluster.py``). Each runs under its claim
(``project.claims``): whoever holds it reuses the unit's FINISHED run if there is one,
resumes what a killed holder left, or does the work; nobody else does it at the same time.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.tracking import MlflowClient

from project.claims import claim, unit_key
from project.lm import LoadedLM

if TYPE_CHECKING:
    from analysis.study import StudyConfig
    from training.config import TrainConfig

log = logging.getLogger(__name__)

# Run tag: the unit a run belongs to (its claim's name), so a retry finds the run a killed
# worker left and resumes it instead of starting another.
UNIT_TAG = "saeflow.unit"
STUDY_RUN_TAG = "saeflow.study_run_id"
# Run tag: where a unit's run was last worked on, "host:pid".
WORKER_TAG = "saeflow.worker"


@dataclass
class StepRun:
    """One run a step used: new (started by this study) or reused (found by its config)."""

    step: str
    run_id: str
    model_uri: str = ""
    detail: str = ""
    reused: bool = False


@dataclass
class UnitOutcome:
    """What a unit did: the runs it used, what failed (``what: error``), the version it
    trained, and whether it resumed a run a killed worker had left."""

    unit: str
    runs: list[StepRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    version_uri: str = ""
    resumed_run: bool = False
    worker: str = ""

    def fail(self, what: str, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        if isinstance(err, BaseException):
            log.error("%s failed", what, exc_info=err)
        self.failures.append(f"{what}: {text}"[:500])


def _digest_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# training (the Ray path; the local study trains its grid from one loaded cache)


def train_unit_key(config: TrainConfig) -> str:
    from analysis.study import _identity
    from training.run import training_code_version

    return unit_key("train", _digest_json(_identity(config.as_params())), training_code_version())


def harvest_unit_key(config: TrainConfig) -> str:
    fields = ("model", "layer", "dataset", "text_column", "n_tokens", "context_size", "cache_dir")
    request = {name: getattr(config, name) for name in fields}
    return unit_key("harvest", socket.gethostname(), _digest_json(request))


def _unfinished_run(unit: str) -> str | None:
    """The newest run of ``unit`` that did not finish (its worker was killed), or None."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{UNIT_TAG}` = '{unit}' AND attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def train_unit(
    config: TrainConfig, lm_name: str, study_run_id: str, *, worker: str = ""
) -> UnitOutcome:
    """Train and register one SAE unless a version of it exists (then reuse it). A run of
    this unit that a killed worker left unfinished is resumed from its last checkpoint
    artifact, in the same run: one run and one version per SAE, however often it is retried."""
    from analysis.study import find_trained_version
    from training.run import harvest_for, train_and_register

    unit = train_unit_key(config)
    outcome = UnitOutcome(unit, worker=worker)
    name = f"{config.architecture}-l0{config.target_l0}"
    try:
        with claim(unit) as held:
            existing = find_trained_version(config, lm_name)
            if existing is None:
                left = _unfinished_run(unit)
                existing = _registered_by(left, config, lm_name) if left else None
            if existing is not None:
                uri = f"models:/{existing.name}/{existing.version}"
                outcome.version_uri = uri
                run_id = existing.tags["training_run_id"]
                outcome.runs.append(StepRun("train", run_id, uri, "", reused=True))
                return outcome
            # Units on one machine share its activation cache: one harvests, the others wait.
            with claim(harvest_unit_key(config)):
                harvested = harvest_for(config)
            acts_ND = harvested.cache.load_all()
            if left is not None:
                log.info("%s: resuming run %s, left unfinished by a killed worker", name, left)
                outcome.resumed_run = True
                run = mlflow.start_run(run_id=left)
            else:
                tags = {UNIT_TAG: unit, STUDY_RUN_TAG: study_run_id}
                tags["mlflow.parentRunId"] = study_run_id
                run = mlflow.start_run(run_name=name, tags=tags)

            def still_ours() -> None:
                # The claim was lost and taken again: another worker may have trained it.
                if not held.confirm() and find_trained_version(config, lm_name) is not None:
                    raise RuntimeError(f"unit {unit} was trained by another worker meanwhile")

            with run:
                mlflow.set_tag(WORKER_TAG, worker)
                result = train_and_register(
                    config, harvested, acts_ND, resume=left is not None, before_register=still_ours
                )
    except Exception as err:  # noqa: BLE001 - reported to the study, which goes on
        outcome.fail(f"training {lm_name} {name}", err)
        return outcome
    mv = result.model_version
    outcome.version_uri = f"models:/{mv.name}/{mv.version}"
    outcome.runs.append(StepRun("train", result.run_id, outcome.version_uri))
    return outcome


def _registered_by(run_id: str, config: TrainConfig, lm_name: str) -> Any:
    """The version ``run_id`` registered before its worker died (between registering and
    ending the run), its run now ended FINISHED; None if it registered nothing."""
    from project.registry import default_registered_model_name, version_of_run

    model = config.registered_model
    if model in {"", "auto"}:
        model = default_registered_model_name(lm_name, config.layer)
    mv = version_of_run(model, run_id)
    if mv is not None:
        log.info("run %s had registered %s v%s before its worker died", run_id, mv.name, mv.version)
        MlflowClient().set_terminated(run_id, "FINISHED")
    return mv


# ---------------------------------------------------------------------------------------------
# the steps after training


def evaluate_unit(config: StudyConfig, uri: str, lms: dict[str, LoadedLM]) -> UnitOutcome:
    """The study's evals on one version (reused by their config hash)."""
    from evaluation.interpretability.evaluate import EvaluationFailed, evaluate

    configs = config.eval_configs()
    unit = unit_key(
        "evaluate", uri, config.judge, _digest_json({k: asdict(v) for k, v in configs.items()})
    )
    outcome = UnitOutcome(unit)
    with claim(unit):
        try:
            results = evaluate(uri, config.eval_names(), config.judge, configs=configs, lms=lms)
        except EvaluationFailed as failed:
            results = failed.results
            outcome.fail(f"evaluating {uri}", failed)
        except Exception as err:  # noqa: BLE001 - the study goes on to the other versions
            outcome.fail(f"evaluating {uri}", err)
            return outcome
    for r in results:
        if r.run_id:
            outcome.runs.append(StepRun("evaluate", r.run_id, uri, r.eval_name, r.reused))
    return outcome


def steer_unit(
    config: StudyConfig,
    uris: list[str],
    selection: str,
    lms: dict[str, LoadedLM],
    judges: dict[str, Any],
) -> UnitOutcome:
    """Every version's steer run for ``selection``, staged together (their generations share
    batches, their ratings one judge call); a version that fails is reported and the others
    go on."""
    from evaluation.steering.steer import SteeringFailed, steer

    steer_config = config.steer_config(selection)
    unit = unit_key("steer", selection, *sorted(uris), config.judge, _digest_json(steer_config))
    outcome = UnitOutcome(unit)
    with claim(unit):
        try:
            results = steer(uris, steer_config, config.judge, lms=lms, judges=judges)
        except SteeringFailed as failed:
            results = failed.results
        except Exception as err:  # noqa: BLE001 - the study goes on to the other selections
            outcome.fail(f"steering {len(uris)} versions (selection {selection})", err)
            return outcome
    for result in results:
        if result.error:
            outcome.fail(f"steering {result.model_uri} (selection {selection})", result.error)
        else:
            outcome.runs.append(
                StepRun("steer", result.run_id, result.model_uri, selection, result.reused)
            )
    return outcome


def tune_unit(
    config: StudyConfig,
    uri: str,
    lms: dict[str, LoadedLM],
    judges: dict[str, Any],
) -> UnitOutcome:
    """The study's small Optuna study over DTC's choices on one version, or its FINISHED run
    of the same Optuna study."""
    from analysis.study import find_finished_tune
    from analysis.tune_dtc import study_name, tune
    from project.judges import judge_for
    from project.registry import model_version
    from project.tracking import lm_of

    mv = model_version(uri)
    tune_config = config.tune_config()
    lm_name = str(lm_of(mv.tags or {}))
    if lm_name not in lms:
        from project.lm import load_lm

        lms[lm_name] = load_lm(lm_name)
    judge = judge_for(
        judges, lm_name, tune_config.judge, lm=lms[lm_name], **tune_config.judge_options
    )
    name = study_name(mv, tune_config, judge)
    outcome = UnitOutcome(unit_key("tune", uri, name))
    with claim(outcome.unit):
        existing = find_finished_tune(uri, tune_config, name)
        if existing is not None:
            log.info("tune_dtc on %s: reusing FINISHED run %s", uri, existing)
            outcome.runs.append(StepRun("tune", existing, uri, "", reused=True))
            return outcome
        try:
            result = tune(uri, tune_config, config.tune_storage, lms=lms, judges=judges)
        except Exception as err:  # noqa: BLE001 - the analysis does not need the tuned choice
            outcome.fail(f"tuning DTC on {uri}", err)
            return outcome
    outcome.runs.append(StepRun("tune", result.parent_run_id, uri, result.study_name))
    return outcome
