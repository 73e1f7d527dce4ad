"""Entry point ``main`` (``mlflow run .``): the whole study, one process, one parent run.

    mlflow run . --env-manager local                       # the CPU default (see MLproject)
    mlflow run . --env-manager local -P lms=smollm2-135m-instruct,gemma-3-270m \\
        -P target_l0s=50,80,160,320,520,820 -P n_concepts=100 ...   # the paper's grid

Steps, in order, each timed (metric ``seconds_<step>`` of the study run):

1. ``harvest``: the residual stream of each LM at its layer (``project.activation_cache``;
   a complete cache on disk is reused);
2. ``train``: every (LM, architecture, target L0) SAE, a nested run and a registered version
   each (``training.run.train_and_register``). A version already registered from a FINISHED
   run of the same training config and training code is reused, not trained again;
3. ``evaluate``: the ``evals`` on every study version (``evaluation.interpretability.evaluate``);
4. ``steer``: latent-mode steering of every version under each selection (``none``,
   ``output_score``, ``dtc``; ``evaluation.steering.steer``, which logs each selection's
   steering gain over ``none``);
5. ``tune``: a small Optuna study over DTC's choices on one version
   (``analysis.tune_dtc``);
6. ``analyze``: τ_b, Ψ's and the report (``analysis.analyze``), once with no selection (the
   headline) and once per ``analyze_selections`` entry (the steering gain, the paper's Table 3),
   over exactly the eval and steer runs this study used (``study_runs.json``, logged first).

``executor=ray`` runs the train, evaluate, steer and tune units as tasks on a Ray cluster
(``analysis/cluster.py``; the units are ``analysis/units.py``, each under its claim).

Evaluation and steering runs are reused by config hash (their own rule), the tune study when a
FINISHED tune run of the same Optuna study (config, judge, version and code version) exists, so a study interrupted and started again redoes
only what did not finish. Every LM is loaded once and shared by all steps.

Runs the study starts while its run is active are nested under it (MLflow's
``mlflow.parentRunId``); the tune and analyze runs, which their entry points start on their
own, get that tag afterwards. Every new run is tagged ``saeflow.study_run_id``; the study run
logs ``study_runs.json``, every run it used (new or reused) by step and version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from analysis.analyze import AnalyzeConfig, analyze, ci_text
from analysis.collect import STUDY_RUN_TYPE, STUDY_RUNS_ARTIFACT
from analysis.units import (
    STUDY_RUN_TAG,
    StepRun,
    UnitOutcome,
    evaluate_unit,
    steer_unit,
    train_unit_key,
    tune_unit,
)
from project.claims import check_coordination_database, claim, coordination_database
from project.cli import (
    BadInputError,
    PartialFailureError,
    add_dataclass_arguments,
    mark_work_started,
    parse_int,
    run_entry_point,
)
from project.corpus import DEFAULT_CORPUS, resolve_corpus
from project.lm import DEFAULT_LM, GEMMA_LM, LoadedLM, check_layer, load_lm
from project.registry import default_registered_model_name
from project.tracking import (
    DEFAULT_EXPERIMENT,
    RUN_TYPE_TAG,
    configure_tracking,
    ui_hint,
)
from training.config import TrainConfig
from training.run import (
    TRAIN_CONFIG_ARTIFACT,
    TRAINING_CODE_TAG,
    harvest_for,
    train_and_register,
    training_code_version,
)

log = logging.getLogger(__name__)

STEPS = ("harvest", "train", "evaluate", "steer", "tune", "analyze")
EXECUTORS = ("local", "ray")
# Each embedded LM's hook layer, a third of its depth: SmolLM2 10 of 30 blocks (at the training
# default 4 no direction steered the concept: the README's Steer section measures both), Gemma-3
# 6 of 18. Other LMs default to their middle block.
DEFAULT_LAYERS = {DEFAULT_LM: 10, GEMMA_LM: 6}
# TrainConfig fields that say where things go or how often to log, not what is trained: two
# versions that differ only in these are the same SAE.
_NOT_IDENTITY = frozenset(
    {
        "registered_model",
        "cache_dir",
        "checkpoint_dir",
        "checkpoint_every_n_steps",
        "log_every_n_steps",
    }
)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _numbers(name: str, text: str, cast: type) -> list[Any]:
    try:
        return [parse_int(p) if cast is int else cast(p) for p in _split(text)]
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{name}={text!r} must be comma-separated {cast.__name__}s") from None


@dataclass
class StudyConfig:
    """Everything the study does; the defaults finish in about half an hour on a 2-core CPU.

    - ``lms``: comma-separated LMs (embedded names, hub ids, local dirs or ``.gguf`` files);
      ``layers``: one hook layer per LM, or ``auto`` (:data:`DEFAULT_LAYERS`, else the middle
      block).
    - ``architectures`` × ``target_l0s``: the SAE grid per LM; ``n_tokens`` harvested per LM,
      ``training_tokens`` seen per SAE, ``expansion`` = d_sae / d_model.
    - ``evals`` (comma-separated, ``autointerp`` at least: it is µ) with ``autointerp_latents``
      latents scored; other eval fields through ``eval_options`` (``--autointerp.n_tokens``...).
    - ``selections``: steering's latent selections (``none`` first: the gain's baseline);
      ``n_concepts`` latents steered per SAE, ``factors``, ``n_instructions`` (half dev, half
      test), ``max_new_tokens``; ``stats_n_tokens`` held-out tokens of the latent table (m_i),
      shared by steering and tuning.
    - ``tune_n_trials`` (0: no tuning) on ``tune_sae`` (``auto``: TopK at the lowest target L0
      of the first LM, else the first SAE; or ``ARCH:L0``), steering ``tune_n_concepts``
      latents per trial on ``tune_n_instructions`` instructions each (half dev, half test).
    - ``n_resamples``: bootstrap/permutation draws of the analysis; ``analyze_selections``:
      the selections whose steering gain is analysed beside the headline (``none``);
      ``interp_metric`` (µ, an eval metric) and ``utility_metric`` (g, a steer metric).
    """

    lms: str = DEFAULT_LM
    layers: str = "auto"
    dataset: str = DEFAULT_CORPUS
    architectures: str = "relu,topk,batchtopk,jumprelu,gated"
    target_l0s: str = "16,64"
    n_tokens: int = 100_000
    context_size: int = 128
    training_tokens: int = 150_000
    expansion: int = 4
    # 150k tokens in batches of 2048 at lr 3e-4 are 73 steps: SAEs barely off their
    # initialisation (SmolLM2 layer 10: explained variance 0.18-0.58), whose latents steer
    # nothing toward their explanations at any factor 1-16 (issue 18). The same tokens in
    # batches of 512 at lr 3e-3 (293 steps, the same wall time) reach 0.73-0.83.
    batch_size: int = 512
    lr: float = 3e-3
    evals: str = "autointerp"
    autointerp_latents: int = 20
    judge: str = "offline"
    selections: str = "none,output_score,dtc"
    # Latents steered per SAE and selection. At 4 (120 targets over the study's 30 steer runs)
    # the SAEs' pooled lift led the same-norm random floor by 0.034 [-0.002, 0.077]: not
    # distinguishable from it. 8 halves the variance of that lead; steering batched across
    # the SAEs pays for part of it.
    n_concepts: int = 8
    # Latent-first steering on SmolLM2 at layer 10 (TopK 64, ReLU 16, Gated 16 trained as
    # above; 8 latents each): the concept rating rose from 0.04 unsteered to 0.09 / 0.24 / 0.27 /
    # 0.14 at α 1 / 2 / 4 / 8, its lift over the unsteered answer to 0.06 / 0.21 / 0.24 / 0.10;
    # the score by lift was 0.04 / 0.05 / 0.03 / 0.00 (fluency falls beyond 4). The two
    # factors with the largest lift, at the cost of two.
    factors: str = "2,4"
    n_instructions: int = 4
    max_new_tokens: int = 24
    stats_n_tokens: int = 16_384
    tune_n_trials: int = 3
    tune_sae: str = "auto"
    # Two latents per trial scored 0.0 in all three trials of a default study: four.
    tune_n_concepts: int = 4
    # A trial's score is the dev mean of a few latents' lift: with 2 dev instructions per
    # latent it was 0.0 in every trial of a default study; 4 dev instructions each.
    tune_n_instructions: int = 8
    tune_storage: str = "auto"
    n_resamples: int = 1000
    analyze_selections: str = "dtc"
    interp_metric: str = "autointerp_score"
    utility_metric: str = "steering_score"
    seed: int = 0
    # Where each SAE trains (TrainConfig's device / precision / compile; the LM's passes stay
    # on the CPU in this version).
    device: str = "cpu"
    precision: str = "32-true"
    compile: bool = False
    # Where the units run: ``local`` (this process, one after another) or ``ray`` (tasks on the
    # Ray cluster at ``ray_address``, against a shared tracking server: analysis/cluster.py).
    executor: str = "local"
    ray_address: str = "auto"
    # Where activations are cached ("" = $SAEFLOW_CACHE_DIR/activations on each machine; an
    # s3://bucket/prefix every node of a cluster reads).
    cache_dir: str = ""
    # --<eval>.<field> VALUE on the command line; never a flag of its own.
    eval_options: dict[str, dict[str, str]] = field(default_factory=dict)

    # -- parsing, all before any work --------------------------------------------------------

    def lm_names(self) -> list[str]:
        names = _split(self.lms)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"lms={self.lms!r} must name at least one LM, each once")
        return names

    def layer_for(self) -> dict[str, int | None]:
        """LM → layer; None where ``auto`` and the LM is not embedded (its middle, once
        loaded)."""
        names = self.lm_names()
        if self.layers.strip() in ("", "auto"):
            return {name: DEFAULT_LAYERS.get(name) for name in names}
        layers = _numbers("layers", self.layers, int)
        if len(layers) != len(names):
            raise ValueError(
                f"layers={self.layers!r} gives {len(layers)} layer(s) for {len(names)} LM(s) "
                f"({self.lms!r}); give one per LM, in order, or 'auto'"
            )
        return dict(zip(names, layers, strict=True))

    def grid(self) -> list[tuple[str, int]]:
        architectures = _split(self.architectures)
        targets = _numbers("target_l0s", self.target_l0s, int)
        if not architectures or not targets:
            raise ValueError(
                f"architectures={self.architectures!r} and target_l0s={self.target_l0s!r} must "
                "each name at least one value"
            )
        return [(a, t) for a in architectures for t in targets]

    def train_config(self, lm: str, layer: int, architecture: str, target_l0: int) -> TrainConfig:
        config = TrainConfig(
            model=lm,
            layer=layer,
            dataset=self.dataset,
            n_tokens=self.n_tokens,
            context_size=self.context_size,
            architecture=architecture,
            target_l0=target_l0,
            expansion=self.expansion,
            batch_size=self.batch_size,
            lr=self.lr,
            training_tokens=self.training_tokens,
            seed=self.seed,
            device=self.device,
            precision=self.precision,
            compile=self.compile,
            cache_dir=self.cache_dir,
        )
        config.validate()
        return config

    def eval_names(self) -> list[str]:
        from evaluation.interpretability.evaluate import parse_evals

        names = parse_evals(self.evals)
        if "autointerp" not in names:
            raise ValueError(
                f"evals={self.evals!r} must include autointerp: its score is the study's "
                "interpretability µ"
            )
        return names

    def eval_configs(self) -> dict[str, Any]:
        from evaluation.interpretability.evaluate import EVALS
        from project.cli import config_from_overrides

        names = self.eval_names()
        unknown = sorted(set(self.eval_options) - set(names))
        if unknown:
            raise ValueError(f"eval options given for evals not in evals={self.evals!r}: {unknown}")
        configs = {}
        for name in names:
            options = dict(self.eval_options.get(name, {}))
            if name == "autointerp":
                options.setdefault("n_latents", str(self.autointerp_latents))
            configs[name] = config_from_overrides(EVALS[name].load()[0], options, name)
        return configs

    def selection_names(self) -> list[str]:
        from evaluation.selection.registry import check_selection

        names = _split(self.selections)
        if not names or names[0] != "none" or len(set(names)) != len(names):
            raise ValueError(
                f"selections={self.selections!r} must start with none (the steering gain's "
                "baseline) and name each selection once"
            )
        for name in names:
            check_selection(name)
        for name in _split(self.analyze_selections):
            if name not in names:
                raise ValueError(
                    f"analyze_selections names {name!r}, which selections={self.selections!r} "
                    "does not steer"
                )
        return names

    def steer_config(self, selection: str) -> Any:
        from evaluation.selection.config import LatentStatsConfig
        from evaluation.steering.config import SteerConfig, parse_factors

        return SteerConfig(
            mode="latent",
            selection=selection,
            n_concepts=self.n_concepts,
            factors=parse_factors(self.factors),
            n_instructions=self.n_instructions,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            stats=LatentStatsConfig(n_tokens=self.stats_n_tokens),
        )

    def tune_config(self) -> Any:
        from analysis.tune_dtc import TuneConfig
        from evaluation.steering.config import parse_factors

        # One (α, k): the paper's defaults, so one selection table per tuned version; the
        # directions, rules, K and q of METHODS §4 stay the search space.
        return TuneConfig(
            n_trials=self.tune_n_trials,
            alphas=(10.0,),
            dtc_ks=(1,),
            n_concepts=self.tune_n_concepts,
            n_instructions=self.tune_n_instructions,
            factors=parse_factors(self.factors),
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            stats_n_tokens=self.stats_n_tokens,
            judge=self.judge,
        )

    def tune_target(self) -> tuple[str, int] | None:
        """(architecture, target L0) of the tuned SAE on the first LM; None: no tuning."""
        if self.tune_n_trials == 0:
            return None
        grid = self.grid()
        if self.tune_sae.strip() == "auto":
            topk = sorted(t for a, t in grid if a == "topk")
            return ("topk", topk[0]) if topk else grid[0]
        architecture, _, target = self.tune_sae.partition(":")
        try:
            choice = (architecture.strip(), int(target))
        except ValueError:
            choice = None
        if choice not in grid:
            raise ValueError(
                f"tune_sae={self.tune_sae!r} must be 'auto' or ARCH:L0 of the grid, e.g. "
                f"{grid[0][0]}:{grid[0][1]}"
            )
        return choice

    def validate(self) -> None:
        """Every check that needs nothing loaded; ValueError naming the value otherwise."""
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"executor={self.executor!r} is unknown; valid: {', '.join(EXECUTORS)}"
            )
        self.layer_for()
        grid = self.grid()
        for lm in self.lm_names():
            for architecture, target in grid:
                self.train_config(lm, 0, architecture, target)
        n_saes = len(self.lm_names()) * len(grid)
        if n_saes < 3:
            raise ValueError(
                f"the study has {n_saes} SAE(s) ({self.lms!r} x {self.architectures!r} x "
                f"{self.target_l0s!r}); Kendall τ needs at least 3"
            )
        for name, low in (("autointerp_latents", 1), ("tune_n_trials", 0), ("n_resamples", 100)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        self.eval_configs()
        for selection in self.selection_names():
            self.steer_config(selection)
        if self.tune_target() is not None:
            if "dtc" not in self.selection_names():
                log.info(
                    "tuning DTC although selections=%r does not steer with dtc", self.selections
                )
            self.tune_config()
        from project.judges import JUDGE_NAMES

        if self.judge not in JUDGE_NAMES:
            raise ValueError(f"unknown judge {self.judge!r}; valid: {', '.join(JUDGE_NAMES)}")
        AnalyzeConfig(
            interp_metric=self.interp_metric,
            utility_metric=self.utility_metric,
            n_resamples=self.n_resamples,
            seed=self.seed,
        ).validate()
        resolve_corpus(self.dataset)


# ---------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class StudyResult:
    run_id: str
    versions: list[str]
    seconds: dict[str, float]
    runs: list[StepRun]
    report_paths: dict[str, str]
    headline: dict[str, float]
    psi: dict[str, dict[str, float]]
    failures: list[str] = field(default_factory=list)
    # τ_b of µ against each steering score the runs logged (the paper's, then by concept lift).
    scores: list[dict[str, object]] = field(default_factory=list)

    def new_runs(self, step: str) -> list[StepRun]:
        return [r for r in self.runs if r.step == step and not r.reused]


class _Study:
    """The state one study run carries from step to step."""

    def __init__(self, config: StudyConfig, run_id: str) -> None:
        self.config = config
        self.run_id = run_id
        self.client = MlflowClient()
        self.seconds: dict[str, float] = dict.fromkeys(STEPS, 0.0)
        self.cpu_seconds: dict[str, float] = dict.fromkeys(STEPS, 0.0)
        self.runs: list[StepRun] = []
        self.failures: list[str] = []
        self.lms: dict[str, LoadedLM] = {}  # by canonical name (the versions' lm_name tag)
        # One judge per LM for every steer run (its embedding and NLL memos carry over).
        self.judges: dict[str, Any] = {}
        self.layers: dict[str, int] = {}  # LM as given → layer
        self.versions: dict[tuple[str, str, int], ModelVersion] = {}  # (LM, arch, L0)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step into ``seconds_<step>`` and its process CPU time into
        ``cpu_seconds_<step>`` (accumulated; logged as it ends): on a shared machine the CPU
        time tells what the step costs, the wall time what the load made of it."""
        started, cpu = time.perf_counter(), time.process_time()
        log.info("study step %s", name)
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.cpu_seconds[name] += time.process_time() - cpu
            self.client.log_metric(self.run_id, f"seconds_{name}", self.seconds[name])
            self.client.log_metric(self.run_id, f"cpu_seconds_{name}", self.cpu_seconds[name])

    def record(self, run: StepRun) -> None:
        """Keep ``run``; a run this study started gets the study's id as a tag."""
        self.runs.append(run)
        if not run.reused and run.run_id:
            self.client.set_tag(run.run_id, STUDY_RUN_TAG, self.run_id)

    def adopt(self, run_id: str) -> None:
        """Nest a run its entry point started on its own (tune, analyze) under the study."""
        self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)

    def apply(self, outcome: UnitOutcome, *, adopt: bool = False) -> None:
        """Record a unit's runs and failures (logged where the unit ran); ``adopt``: nest the
        runs it started under the study (they were started outside the study's run)."""
        for run in outcome.runs:
            if adopt and not run.reused and run.run_id:
                self.adopt(run.run_id)
            self.record(run)
        self.failures.extend(outcome.failures)

    def reuse_version(self, key: tuple[str, str, int], mv: ModelVersion) -> None:
        """Take an already registered version of the SAE ``key`` (LM, architecture, L0)."""
        uri = f"models:/{mv.name}/{mv.version}"
        log.info("%s %s L0 %d: reusing %s", *key, uri)
        self.versions[key] = mv
        self.record(StepRun("train", mv.tags["training_run_id"], uri, "", reused=True))

    def fail(self, what: str, err: BaseException) -> None:
        # exc_info=err, not log.exception: a failure reported by a result (a steer version's
        # error) is not the exception being handled, and its own traceback was logged where
        # it happened.
        log.error("%s failed; the study goes on", what, exc_info=err)
        self.failures.append(f"{what}: {type(err).__name__}: {err}"[:500])


# ---------------------------------------------------------------------------------------------
# training, with registered versions reused


def _identity(values: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if k not in _NOT_IDENTITY}


def find_trained_version(config: TrainConfig, lm_name: str) -> ModelVersion | None:
    """The newest version registered from a FINISHED training run with this exact training
    config (up to where outputs go) and this training code (:func:`training_code_version`:
    a trainer fix retrains), in the registered model the config trains into."""
    client = MlflowClient()
    name = default_registered_model_name(lm_name, config.layer)
    escaped = name.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{escaped}'")
    except mlflow.exceptions.MlflowException as err:
        # Only "no such model" means no version; a server that fails must not read as "not
        # trained yet" (that would train and register the SAE a second time).
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    wanted = _identity(config.as_params())
    code = training_code_version()
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags or {}
        if (
            tags.get("architecture") != config.architecture
            or tags.get("target_l0") != str(config.target_l0)
            or tags.get("source") != "saeflow-train"
            or not tags.get("training_run_id")
        ):
            continue
        try:
            run = client.get_run(tags["training_run_id"])
            if run.info.status != "FINISHED" or run.data.tags.get(TRAINING_CODE_TAG) != code:
                continue
            logged = mlflow.artifacts.load_dict(
                f"runs:/{tags['training_run_id']}/{TRAIN_CONFIG_ARTIFACT}"
            )
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # the server failed: we cannot tell, so we do not guess
            continue  # its run or config is gone: not a version we can vouch for
        if _identity(logged) == wanted:
            return mv
    return None


def _train(study: _Study, lm_given: str, lm: LoadedLM) -> None:
    config = study.config
    layer = study.layers[lm_given]
    todo: list[TrainConfig] = []
    for architecture, target in config.grid():
        train_config = config.train_config(lm_given, layer, architecture, target)
        existing = find_trained_version(train_config, lm.name)
        if existing is None:
            todo.append(train_config)
            continue
        study.reuse_version((lm_given, architecture, target), existing)
    if not todo:
        return
    with study.step("harvest"):
        harvested = harvest_for(todo[0], lm)
        acts_ND = harvested.cache.load_all()
    study.record(
        StepRun("harvest", harvested.harvest_run_id or "", "", lm.name, reused=harvested.reused)
    )
    with study.step("train"):
        for train_config in todo:
            name = f"{train_config.architecture}-l0{train_config.target_l0}"
            key = (lm_given, train_config.architecture, train_config.target_l0)
            try:
                # Under the SAE's claim (analysis/units.py): a second study started at the
                # same moment waits here, then finds the version this one registered.
                with claim(train_unit_key(train_config)):
                    existing = find_trained_version(train_config, lm.name)
                    if existing is not None:
                        study.reuse_version(key, existing)
                        continue
                    with mlflow.start_run(run_name=name, nested=True) as run:
                        result = train_and_register(train_config, harvested, acts_ND)
            except Exception as err:  # noqa: BLE001 - one SAE's failure must not stop the rest
                study.fail(f"training {lm.name} {name}", err)
                continue
            mv = result.model_version
            study.versions[key] = mv
            study.record(StepRun("train", run.info.run_id, f"models:/{mv.name}/{mv.version}"))
    del acts_ND


# ---------------------------------------------------------------------------------------------
# the steps after training


def _evaluate(study: _Study, uri: str) -> None:
    study.apply(evaluate_unit(study.config, uri, study.lms))


def _steer(study: _Study, uris: list[str], selection: str) -> None:
    """Every version's steer run for ``selection``, staged together (``steer_unit``)."""
    study.apply(steer_unit(study.config, uris, selection, study.lms, study.judges))


def find_finished_tune(uri: str, tune_config: Any, study_name: str) -> str | None:
    """A FINISHED tune run of this version whose Optuna study is ``study_name`` (which hashes
    the config, the judge, the exact version and the code version) with at least the config's
    trials, past its test-split comparison (``subset_size`` is logged there, always; the
    scores may be NaN and unlogged); None if there is none."""
    from analysis.tune_dtc import STUDY_TAG, TUNE_RUN_TYPE

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=(
            f"tags.`{RUN_TYPE_TAG}` = '{TUNE_RUN_TYPE}' AND tags.model_uri = '{uri}' "
            "AND attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        tags = run.data.tags
        same = tags.get(STUDY_TAG) == study_name
        enough = parse_int(tags.get("n_trials", "0")) >= tune_config.n_trials
        if same and enough and "subset_size" in run.data.metrics:
            return run.info.run_id
    return None


def _tune(study: _Study, mv: ModelVersion) -> None:
    outcome = tune_unit(study.config, f"models:/{mv.name}/{mv.version}", study.lms, study.judges)
    study.apply(outcome, adopt=True)


def _log_pooled_lift(study: _Study) -> None:
    """Was steering measured at all? Per selection and over all of them: the steering score by
    the paper's rule and by concept lift pooled over every target of the study's steer runs,
    with bootstrap intervals, and the share of targets whose concept was free (present in the
    unsteered answers). Logged as ``pooled_*`` metrics of the study run; with a few targets per
    SAE, only the pooled lift interval can say whether the study's g measures steering."""
    from evaluation.steering.steer import pooled_lift

    by_selection: dict[str, list[str]] = {}
    for run in study.runs:
        if run.step == "steer" and run.run_id:
            by_selection.setdefault(run.detail, []).append(run.run_id)
    groups = {
        **{f"_{sel}": ids for sel, ids in by_selection.items()},
        "": sum(by_selection.values(), []),
    }
    for suffix, run_ids in groups.items():
        if not run_ids:
            continue
        try:
            pooled = pooled_lift(run_ids, study.config.seed)
        except (ValueError, KeyError, OSError) as err:
            study.fail(f"pooled lift{suffix}", err)
            continue
        study.client.log_batch(
            study.run_id,
            metrics=[
                Metric(f"{key}{suffix}", value, int(time.time() * 1000), 0)
                for key, value in pooled.items()
                if not math.isnan(value)
            ],
        )
        log.info(
            "steering pooled over %d targets%s: score %.3f, by lift %.3f [%.3f, %.3f], "
            "concept free unsteered on %.0f%%",
            int(pooled["pooled_n_targets"]),
            f" (selection {suffix[1:]})" if suffix else "",
            pooled["pooled_steering_score"],
            pooled["pooled_steering_score_lift"],
            pooled["pooled_steering_score_lift_ci_low"],
            pooled["pooled_steering_score_lift_ci_high"],
            100 * pooled["pooled_free_concept_share"],
        )
        if "pooled_steering_score_lift_minus_random" in pooled:
            log.info(
                "  random floor at the latents' norm and α*: by lift %.3f; SAE − floor %.3f "
                "[%.3f, %.3f] over %d targets",
                pooled["pooled_random_steering_score_lift"],
                pooled["pooled_steering_score_lift_minus_random"],
                pooled["pooled_steering_score_lift_minus_random_ci_low"],
                pooled["pooled_steering_score_lift_minus_random_ci_high"],
                int(pooled["pooled_n_floor_targets"]),
            )
            log.info(
                "  concept rating alone, lift over unsteered: SAE %.3f, floor %.3f; SAE − floor "
                "%.3f [%.3f, %.3f]",
                pooled["pooled_concept_lift"],
                pooled["pooled_random_concept_lift"],
                pooled["pooled_concept_lift_minus_random"],
                pooled["pooled_concept_lift_minus_random_ci_low"],
                pooled["pooled_concept_lift_minus_random_ci_high"],
            )


def _log_runs(study: _Study) -> None:
    """``study_runs.json``: every run the study used so far (new or reused), by step."""
    study.client.log_dict(
        study.run_id, {"runs": [asdict(r) for r in study.runs]}, STUDY_RUNS_ARTIFACT
    )


def _analyze(
    study: _Study,
) -> tuple[dict[str, str], dict[str, float], dict[str, dict], list[dict[str, object]]]:
    config = study.config
    # The analysis reads exactly the eval and steer runs the study used (reused ones
    # included), from the list logged now; nothing else in the store is pooled in.
    _log_runs(study)
    paths: dict[str, str] = {}
    headline: dict[str, float] = {}
    psi: dict[str, dict[str, float]] = {}
    scores: list[dict[str, object]] = []
    for selection in ["none", *_split(config.analyze_selections)]:
        analysis = AnalyzeConfig(
            study_run_id=study.run_id,
            interp_metric=config.interp_metric,
            utility_metric=config.utility_metric,
            steer_mode="latent",
            selection=selection,
            n_resamples=config.n_resamples,
            seed=config.seed,
        )
        try:
            result = analyze(analysis)
        except Exception as err:  # noqa: BLE001 - the other analyses may still report
            study.fail(f"analysis (selection {selection})", err)
            continue
        assert result.run_id is not None
        study.adopt(result.run_id)
        study.record(StepRun("analyze", result.run_id, "", selection))
        paths[selection] = result.report_path
        if selection == "none":
            headline, psi = result.report.headline, result.report.psi
            scores = result.report.side_by_side
    return paths, headline, psi, scores


# ---------------------------------------------------------------------------------------------
# the study


@contextmanager
def _study_run(config: StudyConfig) -> Iterator[str]:
    """The study's parent run: the ``mlflow run`` launcher run if there is one, else a new
    run. ``$MLFLOW_RUN_ID`` is taken out meanwhile: while set, every start_run without a run
    id resumes it."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    client = MlflowClient()
    try:
        if launcher:
            run_id = launcher
        else:
            experiment_id = mlflow.tracking.fluent._get_experiment_id()
            run_id = client.create_run(experiment_id, run_name="study").info.run_id
        # Nested runs go to the active experiment: make it the study run's.
        experiment_id = client.get_run(run_id).info.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
        client.set_tag(run_id, RUN_TYPE_TAG, STUDY_RUN_TYPE)
        logged = client.get_run(run_id).data.params
        params = {f"study_{k}": str(v) for k, v in asdict(config).items() if k != "eval_options"}
        params["study_eval_options"] = json.dumps(config.eval_options, sort_keys=True)
        for key, value in params.items():
            if key not in logged:
                client.log_param(run_id, key, value[:6000])
        yield run_id
    finally:
        if launcher is not None:
            os.environ["MLFLOW_RUN_ID"] = launcher


def _active(run_id: str) -> Any:
    return mlflow.start_run(run_id=run_id)


def _uris(study: _Study) -> list[str]:
    return [f"models:/{mv.name}/{mv.version}" for mv in study.versions.values()]


def _study_on_ray(study: _Study, lms: dict[str, LoadedLM]) -> None:
    """Harvest here; train, evaluate, steer and tune as Ray tasks (analysis/cluster.py)."""
    from analysis.cluster import RayUnits, after_training_on_ray, train_on_ray
    from analysis.units import harvest_unit_key
    from project.registry import model_version

    config = study.config
    context = {
        "tracking_uri": mlflow.get_tracking_uri(),
        "experiment_id": study.client.get_run(study.run_id).info.experiment_id,
        "study_run_id": study.run_id,
    }
    units = RayUnits(context, gpus_per_training=0.0 if config.device == "cpu" else 1.0)
    todo: list[tuple[tuple[str, str, int], TrainConfig]] = []
    lm_names: dict[tuple[str, str, int], str] = {}
    for lm_given, lm in lms.items():
        layer = study.layers[lm_given]
        configs = [config.train_config(lm_given, layer, a, t) for a, t in config.grid()]
        with study.step("harvest"), claim(harvest_unit_key(configs[0])):
            harvested = harvest_for(configs[0], lm)
        study.record(
            StepRun("harvest", harvested.harvest_run_id or "", "", lm.name, harvested.reused)
        )
        for train_config in configs:
            key = (lm_given, train_config.architecture, train_config.target_l0)
            todo.append((key, train_config))
            lm_names[key] = lm.name
    with study.step("train"):
        trained = train_on_ray(units, todo, lm_names)
    outcomes = list(trained.values())
    for key, outcome in trained.items():
        study.apply(outcome)
        if outcome.version_uri:
            study.versions[key] = model_version(outcome.version_uri)
    target = config.tune_target()
    tuned = study.versions.get((config.lm_names()[0], *target)) if target else None
    tuned_uri = f"models:/{tuned.name}/{tuned.version}" if tuned is not None else None
    for step, (seconds, step_outcomes) in after_training_on_ray(
        units, config, _uris(study), tuned_uri
    ).items():
        # The steps overlap: each one's seconds run from the phase's start to its last unit.
        study.seconds[step] = seconds
        study.client.log_metric(study.run_id, f"seconds_{step}", seconds)
        for outcome in step_outcomes:
            study.apply(outcome, adopt=True)
        outcomes.extend(step_outcomes)
    study.client.log_metric(study.run_id, "n_units", float(len(outcomes)))
    resumed = sum(o.resumed_run for o in outcomes)
    study.client.log_metric(study.run_id, "n_units_resumed", float(resumed))
    workers = sorted({o.worker for o in outcomes if o.worker})
    study.client.set_tag(study.run_id, "saeflow.workers", ", ".join(workers)[:5000])


def run_study(config: StudyConfig) -> StudyResult:
    """Harvest, train, evaluate, steer, tune and analyze (see the module docstring).

    Raises:
        ValueError: bad input, before any LM is loaded or run started.
        PartialFailureError: after every step ran, if some SAE, eval, steer, tune or analysis
            failed (each listed; what finished is logged and reused next time).
    """
    config.validate()
    if config.executor == "ray":
        from analysis.cluster import check_cluster

        check_cluster(config, mlflow.get_tracking_uri())
    elif coordination_database() is not None:
        check_coordination_database(str(coordination_database()))  # the units' claims
    layers = config.layer_for()
    lms: dict[str, LoadedLM] = {}
    for name in config.lm_names():
        lm = load_lm(name)
        layer = layers[name] if layers[name] is not None else lm.n_layers // 2
        check_layer(lm, layer)
        for architecture, target in config.grid():
            config.train_config(name, layer, architecture, target).validate_for_width(lm.d_model)
        lms[name], layers[name] = lm, layer
    mark_work_started()
    started, cpu_started = time.perf_counter(), time.process_time()
    with _study_run(config) as run_id:
        study = _Study(config, run_id)
        study.layers = {name: int(layer) for name, layer in layers.items() if layer is not None}
        study.lms = {lm.name: lm for lm in lms.values()}
        with _active(run_id):
            if config.executor == "ray":
                _study_on_ray(study, lms)
            else:
                for name, lm in lms.items():
                    _train(study, name, lm)
                uris = _uris(study)
                with study.step("evaluate"):
                    for uri in uris:
                        _evaluate(study, uri)
                with study.step("steer"):
                    for selection in config.selection_names():
                        _steer(study, uris, selection)
            _log_pooled_lift(study)
        uris = _uris(study)
        # tune and analyze start their runs as top-level runs: the study's must not be active.
        target = config.tune_target()
        first_lm = config.lm_names()[0]
        tuned = study.versions.get((first_lm, *target)) if target else None
        if tuned is not None and config.executor == "local":
            with study.step("tune"):
                _tune(study, tuned)
        with study.step("analyze"):
            paths, headline, psi, scores = _analyze(study)
        total = time.perf_counter() - started
        study.client.log_metric(run_id, "seconds_total", total)
        study.client.log_metric(run_id, "cpu_seconds_total", time.process_time() - cpu_started)
        study.client.log_metric(run_id, "n_saes", float(len(study.versions)))
        for key in ("tau_b", "tau_b_ci_low", "tau_b_ci_high"):
            if key in headline and not math.isnan(headline[key]):
                study.client.log_metric(run_id, key, headline[key])
        for key, value in psi.items():
            if not math.isnan(value["value"]):
                study.client.log_metric(run_id, key, value["value"])
        for selection, path in paths.items():
            study.client.set_tag(run_id, f"report.{selection}", path)
        _log_runs(study)
        study.client.set_tag(run_id, "saeflow.failures", "; ".join(study.failures)[:5000])
        result = StudyResult(
            run_id=run_id,
            versions=uris,
            seconds=dict(study.seconds, total=total),
            runs=study.runs,
            report_paths=paths,
            headline=headline,
            psi=psi,
            failures=study.failures,
            scores=scores,
        )
        if study.failures:
            study.client.set_terminated(run_id, "FAILED")
            raise PartialFailureError(
                f"{len(study.failures)} part(s) of the study failed: " + "; ".join(study.failures),
                study.failures,
            )
        study.client.set_terminated(run_id, "FINISHED")
    return result


# ---------------------------------------------------------------------------------------------
# command line


def _eval_options(extra: list[str]) -> dict[str, dict[str, str]]:
    """``--<eval>.<field> VALUE`` / ``--<eval>.<field>=VALUE`` pairs, by eval."""
    out: dict[str, dict[str, str]] = {}
    rest = list(extra)
    while rest:
        arg = rest.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or "." not in key:
            raise BadInputError(
                f"unexpected argument {arg!r}; eval options look like --autointerp.n_tokens 8192"
            )
        if not eq:
            if not rest:
                raise BadInputError(f"{arg} needs a value")
            value = rest.pop(0)
        eval_name, _, field_name = key.partition(".")
        out.setdefault(eval_name, {})[field_name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, StudyConfig, exclude=frozenset({"eval_options"}))
    return parser


def config_from_argv(argv: list[str] | None = None) -> StudyConfig:
    args, extra = build_parser().parse_known_args(argv)
    names = {f.name for f in fields(StudyConfig)} - {"eval_options"}
    config = StudyConfig(**{k: v for k, v in vars(args).items() if k in names})
    return replace(config, eval_options=_eval_options(extra))


def main() -> None:
    config = config_from_argv()
    config.validate()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    try:
        result = run_study(config)
    except PartialFailureError:
        print(f"browse: {ui_hint(tracking_uri)}")
        raise
    h = result.headline
    print(
        f"study run {result.run_id}: {len(result.versions)} SAEs; τ_b = {h['tau_b']:.3f} "
        f"(95% CI {ci_text(h['tau_b_ci_low'], h['tau_b_ci_high'])}); "
        + ", ".join(f"{k} = {v['value']:.3f}" for k, v in result.psi.items())
    )
    for row in result.scores:
        print(
            f"  µ vs {row['g']}: τ_b = {row['τ_b']:.3f} (95% CI {row['95% CI']}), p {row['p']:.3f}"
        )
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    for selection, path in result.report_paths.items():
        print(f"report ({'headline' if selection == 'none' else 'gain of ' + selection}): {path}")
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
