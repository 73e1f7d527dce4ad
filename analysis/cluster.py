"""``executor=ray``: the study's units as Ray tasks on a cluster, against a shared tracking server.

    scripts/server.sh start                     # PostgreSQL + S3 + mlflow server; prints the env
    ray start --head --num-cpus 4               # and on every other machine:
    ray start --address HEAD:6379 --num-cpus 4  # (each started with the env server.sh printed)
    mlflow run . --env-manager local -P executor=ray -P ray_address=auto

The driver (the study's process) validates everything, opens the study run and harvests; then
every SAE is a ``train`` task, and once all are trained every version's ``evaluate``, the
``steer`` tasks (``none`` first: the other selections measure their gain over its runs) and
``tune`` run side by side; the analysis runs in the driver, as locally. Each task is a unit of
``analysis/units.py`` under its claim, so a task Ray retries after its worker died (or the same
unit in a second study started at the same moment) finds the unit done, or resumes the run the
dead worker left from its last checkpoint artifact: each SAE is trained and registered once.

Workers read the tracking server, the coordination database and S3 with the credentials in
their own environment (the variables ``scripts/server.sh`` prints, exported before ``ray
start``); the driver sends them no secret, only the tracking URI, the experiment and the study.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from analysis.units import (
    UnitOutcome,
    evaluate_unit,
    steer_unit,
    train_unit,
    tune_unit,
)
from project.claims import COORDINATION_DB_ENV, check_coordination_database, coordination_database
from project.lm import LoadedLM
from project.tracking import SHARED_TRACKING_SCHEMES

if TYPE_CHECKING:
    from analysis.study import StudyConfig
    from training.config import TrainConfig

log = logging.getLogger(__name__)

# A task whose worker process or node died is run again this many times (Ray's own retry);
# the unit's claim and its run's checkpoint make the retry resume, never duplicate.
TASK_RETRIES = 3

# Per worker process (Ray reuses them): each LM loaded once, each judge built once.
_WORKER_LMS: dict[str, LoadedLM] = {}
_WORKER_JUDGES: dict[str, Any] = {}


def check_cluster(config: StudyConfig, tracking_uri: str) -> None:
    """Everything ``executor=ray`` needs, before any LM is loaded or run started: Ray, a
    tracking server every node reaches, the coordination database, the cluster itself."""
    if not tracking_uri.startswith(SHARED_TRACKING_SCHEMES):
        raise ValueError(
            f"executor=ray needs a tracking server every node reaches, not {tracking_uri!r}: "
            "export MLFLOW_TRACKING_URI=http://HOST:PORT (scripts/server.sh start prints it)"
        )
    url = coordination_database()
    if url is None:
        raise ValueError(
            f"executor=ray needs the coordination database for its claims: export "
            f"{COORDINATION_DB_ENV}=postgresql+psycopg://USER@HOST:PORT/DB and PGPASSWORD "
            "(scripts/server.sh start prints both)"
        )
    check_coordination_database(url)
    try:
        import ray
    except ImportError as err:
        raise ValueError("executor=ray needs Ray: pip install 'ray>=2.40'") from err
    if not ray.is_initialized():
        try:
            ray.init(address=config.ray_address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"ray_address={config.ray_address!r}: no Ray cluster there ({err}); start one "
                "with `ray start --head` or give its HOST:PORT"
            ) from err
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < 1:
        raise ValueError(f"the Ray cluster at {config.ray_address!r} has no CPU to run units on")


# ---------------------------------------------------------------------------------------------
# the worker side


def _enter(context: dict[str, str]) -> str:
    """Point this worker at the study's tracking server and experiment; its name."""
    import mlflow

    from project.tracking import configure_tracking

    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ["MLFLOW_TRACKING_URI"] = context["tracking_uri"]
    configure_tracking(context["tracking_uri"])
    mlflow.set_experiment(experiment_id=context["experiment_id"])
    return f"{socket.gethostname()}:{os.getpid()}"


def run_unit(kind: str, args: dict[str, Any], context: dict[str, str]) -> UnitOutcome:
    """One unit, in a Ray worker (or any process): ``train``, ``evaluate``, ``steer``,
    ``tune``."""
    worker = _enter(context)
    config: StudyConfig = args["config"]
    if kind == "train":
        outcome = train_unit(
            args["train_config"], args["lm_name"], context["study_run_id"], worker=worker
        )
    elif kind == "evaluate":
        outcome = evaluate_unit(config, args["uri"], _WORKER_LMS)
    elif kind == "steer":
        outcome = steer_unit(config, args["uris"], args["selection"], _WORKER_LMS, _WORKER_JUDGES)
    elif kind == "tune":
        outcome = tune_unit(config, args["uri"], _WORKER_LMS, _WORKER_JUDGES)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")
    outcome.worker = worker
    return outcome


# ---------------------------------------------------------------------------------------------
# the driver side


class RayUnits:
    """Submits units as Ray tasks and collects their outcomes."""

    def __init__(self, context: dict[str, str], *, gpus_per_training: float = 0.0) -> None:
        import ray

        self.ray = ray
        self.context = context
        self.task = ray.remote(max_retries=TASK_RETRIES, num_cpus=1)(run_unit)
        self.gpus_per_training = gpus_per_training
        self.pending: dict[Any, tuple[str, str]] = {}  # object ref → (kind, what)

    def submit(self, kind: str, what: str, **args: Any) -> Any:
        options = {"num_gpus": self.gpus_per_training} if kind == "train" else {}
        ref = self.task.options(**options).remote(kind, args, self.context)
        self.pending[ref] = (kind, what)
        return ref

    def next_done(self) -> tuple[Any, str, str, UnitOutcome]:
        """The next unit to finish: (its task, kind, what, outcome); a task that failed for good (its
        retries spent, or its unit raised) comes back as an outcome with that failure."""
        (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
        kind, what = self.pending.pop(ref)
        try:
            outcome = self.ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a lost task is one failure of the study
            outcome = UnitOutcome(f"{kind}:{what}")
            outcome.fail(f"{kind} {what} (Ray task)", f"{type(err).__name__}: {err}"[:400])
        return ref, kind, what, outcome


def train_on_ray(
    units: RayUnits, todo: list[tuple[Any, TrainConfig]], lm_names: dict[Any, str]
) -> dict[Any, UnitOutcome]:
    """Every SAE of ``todo`` (key, config) as a train task; their outcomes by key."""
    by_ref = {}
    for key, train_config in todo:
        ref = units.submit(
            "train",
            f"{train_config.architecture}-l0{train_config.target_l0}",
            config=None,
            train_config=train_config,
            lm_name=lm_names[key],
        )
        by_ref[ref] = key
    outcomes: dict[Any, UnitOutcome] = {}
    while units.pending:
        ref, _, _, outcome = units.next_done()
        outcomes[by_ref[ref]] = outcome
    return outcomes


def after_training_on_ray(
    units: RayUnits, config: StudyConfig, uris: list[str], tuned_uri: str | None
) -> dict[str, tuple[float, list[UnitOutcome]]]:
    """Evaluate every version, steer every selection (``none`` first) and tune, side by side.
    Returns per step: (seconds from the phase's start to its last unit, outcomes)."""
    selections = config.selection_names()
    started = time.perf_counter()
    steps: dict[str, tuple[float, list[UnitOutcome]]] = {}
    for uri in uris:
        units.submit("evaluate", uri, config=config, uri=uri)
    units.submit("steer", selections[0], config=config, uris=uris, selection=selections[0])
    if tuned_uri is not None:
        units.submit("tune", tuned_uri, config=config, uri=tuned_uri)
    while units.pending:
        _, kind, what, outcome = units.next_done()
        steps[kind] = (time.perf_counter() - started, [*steps.get(kind, (0.0, []))[1], outcome])
        if kind == "steer" and what == selections[0]:
            # The other selections log their gain over the none runs: those exist now.
            for selection in selections[1:]:
                units.submit("steer", selection, config=config, uris=uris, selection=selection)
    return steps
