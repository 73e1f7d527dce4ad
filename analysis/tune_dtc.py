"""Entry point ``tune_dtc``: an Optuna study over the DTC selection choices of one registered SAE.

    mlflow run . -e tune_dtc --env-manager local -P model_uri=models:/NAME/VERSION \\
        -P n_trials=12 [-P storage=auto|PATH|postgresql://USER:PASS@HOST/DB]

**Search space** (METHODS.md §4; each a comma-separated parameter): the intervention
``variant`` (``in_place`` §4.1 / ``decoded_alone`` Appendix D), DTC's ``alpha`` and ``dtc_k``
(the k of C_k), the ``direction`` (up / down / abs) and the ``rule``: ``top_k`` with K, or a
tail ``quantile`` q. Every choice is categorical, so the space is finite and enumerable.

**Objective**: the dev-split steering score of the trial's candidate set in latent mode
(METHODS §3): ``n_concepts`` latents sampled from the set's informatively explained ones
(explained in one seeded order of the SAE's latents, so they are drawn from all of the set) are
each steered toward their own explanation, exactly as ``steer -P mode=latent`` does
(:func:`~evaluation.steering.protocol.run_protocol`), and the score is the mean over them of
the dev mean at each latent's best factor α* — by default (``objective=lift``) the steering
score by concept lift over the unsteered answer, since the paper's score also credits
concepts that the unsteered answer already carries (``objective=score``). Only the dev halves are generated during the
study. A latent's protocol result depends on that latent alone (its instructions are seeded by
its key, its samples by the prompt), so each latent is steered and rated once per process and
its result reused by every trial whose set contains it; per-latent DTC scores come from the
version's selection table (``evaluation/selection/table.py``), computed once per (α, k) and
reused by config hash across trials, workers and runs (both variants are columns of it).

**Best choice**: the best trial's set is steered on the test split (α* from dev, as the protocol
does) beside output-score selection (``up``) and no selection (seeded random live latents) at
the same subset size; the parent run logs ``test_steering_score_<dtc|output_score|none>`` and
``test_steering_score_lift_<...>`` (by concept lift), ``test_score[_lift]_difference`` (DTC −
output score), ``test_score[_lift]_difference_none`` (DTC − none), ``free_concept_share_<...>``,
with ``best_*`` tags.

**Tracking**: one parent run per study (``saeflow.run_type=tune_dtc``, linked to the version with
the tags of :mod:`project.tracking`; the version gets ``tune_dtc.run_id``); each trial that
steers is a nested run (``tune_dtc_trial``: params = the trial's choices, metric ``dev_score``).

**Storage and workers**: ``storage`` is ``auto`` (``$SAEFLOW_COORDINATION_DB`` when tracking
is on a server and that is set; else SQLite ``mlflow.optuna.db`` beside a tracking store
``mlflow.db``, else ``optuna.db`` in the working directory), a file path (SQLite) or an SQLAlchemy URL (``sqlite``,
``postgresql``, ``mysql``; PostgreSQL for many workers). The study name derives from the version
and the config (not ``n_trials``), so a second run resumes the study and a second worker
started with the same parameters joins it.

**Exactly N trials, none duplicated**: ``n_trials`` is the study's total of COMPLETE trials.
A trial first marks itself *claimed*, then reads every trial of the study:

- *duplicate*: a claimed RUNNING, COMPLETE or infeasible trial has the same parameter set →
  this trial is PRUNED (it does not count), and a parameter set no trial has taken is enqueued,
  so the sampler cannot stall on a set it likes;
- *surplus*: claimed RUNNING + COMPLETE trials already number N → PRUNED, and this worker waits
  until they finish (or fail, when it steps in again).

Both checks count every other trial whatever its number, so when two trials race, at least one
sees the other: the outcome may be that both are pruned, never that both run. A set whose rule
selects nothing (K above the live latents) or no explainable latent is PRUNED as *infeasible*
and never proposed again. RUNNING trials of a killed worker are failed by Optuna's heartbeat
after ``grace_seconds`` (their MLflow runs marked KILLED), and so is one never claimed after that long (a worker stopped before
its first heartbeat); a FAILED trial's set may be tried again. Each worker's TPE sampler is
seeded by ``seed`` and its process id, so that workers propose different sets: the order in which
a study visits the space is not reproducible, each trial's score is (steering is seeded).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from torch import Tensor

from evaluation.selection.config import DTC_VARIANTS, LatentStatsConfig, SelectionConfig
from evaluation.selection.latent_stats import latent_stats_for_version
from evaluation.selection.rules import check_direction, quantile, top_k
from evaluation.selection.table import scores_for_version
from evaluation.steering.config import SteerConfig, parse_factors
from evaluation.steering.latent_targets import (
    explained_pool,
    instructions_without_echo,
    pool_size,
    sample_latents,
    seeded_order,
)
from evaluation.steering.protocol import SAE, Target, run_protocol
from project.checks import check_int
from project.claims import COORDINATION_DB_ENV, without_password
from project.cli import (
    mark_work_started,
    parse_int,
    parse_list,
    parse_prefixed_options,
    run_entry_point,
)
from project.concepts import (
    Instruction,
    InstructionSplit,
    load_instructions,
)
from project.judges import JUDGE_NAMES, Judge, judge_for
from project.lm import LoadedLM
from project.registry import load_version, sae_identity
from project.runs import config_hash, load_sites, resolve_versions, run_tags, version_uri
from project.saes import SparseAutoencoder
from project.tracking import (
    DEFAULT_EXPERIMENT,
    RUN_TYPE_TAG,
    SHARED_TRACKING_SCHEMES,
    configure_tracking,
    set_version_tag,
    ui_hint,
)

log = logging.getLogger(__name__)

TUNE_RUN_TYPE = "tune_dtc"
TRIAL_RUN_TYPE = "tune_dtc_trial"
WORKER_RUN_TYPE = "tune_dtc_worker"
VERSION_LINK_TAG = "tune_dtc.run_id"
STUDY_TAG = "optuna_study"
PARENT_ATTR = "mlflow_parent_run_id"
TUNED_RULES = ("top_k", "quantile")
# A trial's objective -> the per-latent dev result it averages.
OBJECTIVE_KEYS = {"lift": "dev_score_lift", "score": "dev_score"}
OBJECTIVES = tuple(OBJECTIVE_KEYS)
# The selections compared on the test split at the best set's size.
COMPARED_SELECTIONS = ("dtc", "output_score", "none")
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
VARIANT_COLUMNS = {"in_place": "dtc_in_place", "decoded_alone": "dtc_decoded_alone"}
OPTUNA_DB = "optuna.db"
# Trial outcomes kept as the user attribute "outcome" of PRUNED trials.
DUPLICATE, SURPLUS, INFEASIBLE = "duplicate", "surplus", "infeasible"


@dataclass(frozen=True)
class TuneConfig:
    """One study: the search space, what one trial costs, and how the study is run.

    Identity (the study name) is everything but ``n_trials``, ``storage`` and the heartbeat
    settings, so a resumed or second worker with more trials joins the same study.

    - ``directions``, ``rules``, ``top_ks``, ``quantiles``, ``alphas``, ``dtc_ks``,
      ``variants``: the categorical choices (METHODS §4: K ∈ 1..5, q ∈ {0.99, 0.95, 0.90, 0.80},
      α = 10 and k = 1 the paper's defaults).
    - ``n_concepts``: latents of a candidate set steered (its first explainable ones);
      ``n_instructions`` (half dev, half test), ``factors``, ``max_new_tokens``,
      ``intervention``, ``temperature``, ``seed``: the steering protocol's settings.
    - ``stats_n_tokens``: held-out tokens of the latent table (m_i, live latents) and of the
      selection table's scan, one figure so that both read the same steering stats run.
    - ``explain_n_tokens``: held-out tokens the autointerp explainer scans for a latent's
      examples (autointerp's and steer's default, 24,576).
    - ``judge``: ``offline`` (default), ``hf`` or ``openai``.
    - ``objective``: what a trial maximises on the dev split: ``lift`` (default; the steering
      score with the concept rating replaced by its lift over the unsteered answer, METHODS §3)
      or ``score`` (the paper's steering score, which credits concepts the unsteered answer
      already carries).
    """

    n_trials: int = 12
    directions: tuple[str, ...] = ("up", "down", "abs")
    rules: tuple[str, ...] = TUNED_RULES
    top_ks: tuple[int, ...] = (1, 2, 3, 4, 5)
    quantiles: tuple[float, ...] = (0.99, 0.95, 0.90, 0.80)
    alphas: tuple[float, ...] = (5.0, 10.0, 20.0)
    dtc_ks: tuple[int, ...] = (1, 5)
    variants: tuple[str, ...] = DTC_VARIANTS
    n_concepts: int = 3
    n_instructions: int = 4
    factors: tuple[float, ...] = (1.0, 4.0)
    max_new_tokens: int = 16
    intervention: str = "add"
    temperature: float = 1.0
    seed: int = 0
    stats_n_tokens: int = SelectionConfig().n_tokens
    explain_n_tokens: int = 24_576
    judge: str = "offline"
    judge_options: dict[str, str] = field(default_factory=dict)
    objective: str = "lift"
    heartbeat_seconds: int = 10
    grace_seconds: int = 60
    poll_seconds: float = 2.0

    def __post_init__(self) -> None:
        check_int("n_trials", self.n_trials, 1)
        _nonempty("directions", self.directions)
        for direction in self.directions:
            check_direction(direction)
        _nonempty("rules", self.rules)
        for rule in self.rules:
            if rule not in TUNED_RULES:
                raise ValueError(
                    f"unknown rule {rule!r}; the tuned rules are {', '.join(TUNED_RULES)}"
                )
        if "top_k" in self.rules:
            _nonempty("top_ks", self.top_ks)
            for value in self.top_ks:
                check_int("top_k K", value, 1)
        if "quantile" in self.rules:
            _nonempty("quantiles", self.quantiles)
            for q in self.quantiles:
                if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
                    raise ValueError(f"quantile q={q!r} must lie strictly inside (0, 1), e.g. 0.95")
        _nonempty("alphas", self.alphas)
        for alpha in self.alphas:
            SelectionConfig(alpha=alpha)  # its own check: a finite number >= 0
        _nonempty("dtc_ks", self.dtc_ks)
        for k in self.dtc_ks:
            check_int("dtc_k", k, 1)
        _nonempty("variants", self.variants)
        for variant in self.variants:
            if variant not in DTC_VARIANTS:
                raise ValueError(
                    f"unknown DTC variant {variant!r}; valid variants: {', '.join(DTC_VARIANTS)}"
                )
        if self.judge not in JUDGE_NAMES:
            raise ValueError(f"unknown judge {self.judge!r}; valid: {', '.join(JUDGE_NAMES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}"
            )
        check_int("explain_n_tokens", self.explain_n_tokens, 1)
        check_int("heartbeat_seconds", self.heartbeat_seconds, 1)
        check_int("grace_seconds", self.grace_seconds, self.heartbeat_seconds + 1)
        self.steer_config()  # the protocol's own checks (factors, n_instructions, ...)
        size = len(self.search_space())
        if self.n_trials > size:
            raise ValueError(
                f"n_trials={self.n_trials} exceeds the {size} distinct parameter sets of this "
                "search space; widen the space or ask for fewer trials"
            )

    def steer_config(self) -> SteerConfig:
        """The latent-mode steering protocol every trial runs."""
        return SteerConfig(
            mode="latent",
            intervention=self.intervention,
            n_concepts=self.n_concepts,
            factors=tuple(self.factors),
            n_instructions=self.n_instructions,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stats=LatentStatsConfig(n_tokens=self.stats_n_tokens),
        )

    def selection_config(self, alpha: float, dtc_k: int) -> SelectionConfig:
        """The selection table's config for (α, k); its scan reads the steering stats run."""
        return SelectionConfig(alpha=float(alpha), k=int(dtc_k), n_tokens=self.stats_n_tokens)

    def search_space(self) -> list[dict[str, Any]]:
        """Every distinct parameter set, in a fixed order."""
        rule_choices: list[tuple[str, str, Any]] = []
        if "top_k" in self.rules:
            rule_choices += [("top_k", "top_k", K) for K in dict.fromkeys(self.top_ks)]
        if "quantile" in self.rules:
            rule_choices += [("quantile", "quantile", q) for q in dict.fromkeys(self.quantiles)]
        space = []
        for variant, alpha, dtc_k, direction, (rule, name, value) in product(
            dict.fromkeys(self.variants),
            dict.fromkeys(self.alphas),
            dict.fromkeys(self.dtc_ks),
            dict.fromkeys(self.directions),
            rule_choices,
        ):
            space.append(
                {
                    "variant": variant,
                    "alpha": alpha,
                    "dtc_k": dtc_k,
                    "direction": direction,
                    "rule": rule,
                    name: value,
                }
            )
        return space

    def identity(self) -> dict[str, Any]:
        """What names the study: everything that changes a trial's score or the space."""
        values = asdict(self)
        for transient in ("n_trials", "heartbeat_seconds", "grace_seconds", "poll_seconds"):
            values.pop(transient)
        return values


def _nonempty(name: str, values: Sequence[Any]) -> None:
    if not values:
        raise ValueError(f"{name} is empty; give at least one value")


def suggest(trial: optuna.Trial, config: TuneConfig) -> dict[str, Any]:
    """The trial's parameter set (``top_k`` or ``quantile`` only under its rule)."""
    params: dict[str, Any] = {
        "variant": trial.suggest_categorical("variant", list(dict.fromkeys(config.variants))),
        "alpha": trial.suggest_categorical("alpha", list(dict.fromkeys(config.alphas))),
        "dtc_k": trial.suggest_categorical("dtc_k", list(dict.fromkeys(config.dtc_ks))),
        "direction": trial.suggest_categorical("direction", list(dict.fromkeys(config.directions))),
        "rule": trial.suggest_categorical("rule", list(dict.fromkeys(config.rules))),
    }
    if params["rule"] == "top_k":
        params["top_k"] = trial.suggest_categorical("top_k", list(dict.fromkeys(config.top_ks)))
    else:
        params["quantile"] = trial.suggest_categorical(
            "quantile", list(dict.fromkeys(config.quantiles))
        )
    return params


# ---------------------------------------------------------------------------------------------
# storage


def resolve_storage(storage: str, tracking_uri: str) -> str:
    """The SQLAlchemy URL of ``storage``: ``auto`` → ``$SAEFLOW_COORDINATION_DB`` when tracking
    is not a SQLite file and that is set, else ``<store>.optuna.db`` beside a SQLite tracking
    store ``<store>.db`` (else ``optuna.db`` in the working directory); a path → SQLite at that
    path; a URL is kept.

    Raises:
        ValueError: a URL whose scheme is not one of :data:`STORAGE_SCHEMES`.
    """
    if storage in ("", "auto"):
        shared = os.environ.get(COORDINATION_DB_ENV, "").strip()
        if shared and tracking_uri.startswith(SHARED_TRACKING_SCHEMES):
            # Tracking on a server: the study's workers may be anywhere, and meet in the
            # coordination database (scripts/server.sh prints it).
            return shared
        if tracking_uri.startswith("sqlite:///"):
            # Named after the store, so two stores in one folder never share (or delete) it.
            store = Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve()
            return f"sqlite:///{store.with_name(store.stem + '.' + OPTUNA_DB)}"
        return f"sqlite:///{Path.cwd() / OPTUNA_DB}"
    if "://" in storage:
        scheme = storage.split("://", 1)[0]
        if scheme.split("+", 1)[0] not in STORAGE_SCHEMES:
            raise ValueError(
                f"storage {storage!r}: unsupported URL scheme {scheme!r}; use sqlite:///PATH, "
                "postgresql://USER:PASSWORD@HOST/DB (many workers) or mysql://..., or a file path"
            )
        return storage
    return f"sqlite:///{Path(storage).expanduser().resolve()}"


def open_storage(url: str, config: TuneConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with a heartbeat (a killed worker's RUNNING trials fail after the grace
    period); ValueError naming the URL when it cannot be opened."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several worker processes share one file: wait for the write lock rather than fail.
        engine_kwargs["connect_args"] = {"timeout": 60}

    def connect() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=config.heartbeat_seconds,
            grace_period=config.grace_seconds,
        )

    try:
        for attempt in range(3):
            try:
                return connect()
            except sqlalchemy.exc.SQLAlchemyError:
                # Workers creating the schema of a new storage at once: the losers' CREATE or
                # INSERT fails, and the schema is there when they look again.
                if attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")
    except Exception as err:  # driver missing, host unreachable, bad path
        hint = (
            " (PostgreSQL needs a driver: pip install psycopg2-binary)" if "postgres" in url else ""
        )
        raise ValueError(
            f"storage {without_password(url)!r} cannot be opened: {type(err).__name__}: {err}{hint}"
        ) from err


def study_name(
    mv: ModelVersion, config: TuneConfig, judge: Judge, code_version: str | None = None
) -> str:
    """``tune_dtc-<model>-v<version>-<hash of the config, judge, exact version and code>``:
    the code version (default saeflow's, as eval and steer hashes use) is in it, so trials
    scored by other code are never joined, and a tune run is reused only by the same code."""
    digest = config_hash(TUNE_RUN_TYPE, config.identity(), judge, mv, code_version=code_version)
    return f"{TUNE_RUN_TYPE}-{mv.name}-v{mv.version}-{digest[:12]}"


def trial_counts(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(COMPLETE, claimed RUNNING) trials."""
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(
        t.state == TrialState.RUNNING and bool(t.user_attrs.get("claimed")) for t in trials
    )
    return complete, running


# ---------------------------------------------------------------------------------------------
# the study


@contextmanager
def _without_launcher_env() -> Iterator[str | None]:
    """``mlflow run`` exports MLFLOW_RUN_ID; while it is set every start_run without a run id
    resumes that run, so take it out while this process starts runs of its own."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield launcher
    finally:
        if launcher is not None:
            os.environ["MLFLOW_RUN_ID"] = launcher


@contextmanager
def _in_experiment_of(run_id: str) -> Iterator[None]:
    """Make the run's experiment the active one (start_run refuses to resume a run of another
    experiment, and nested runs go where their parent is); the caller's is restored after."""
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    saved_active = mlflow.tracking.fluent._active_experiment_id
    saved_env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        mlflow.tracking.fluent._active_experiment_id = saved_active
        if saved_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved_env


@dataclass
class TuneResult:
    """What one worker leaves: the study, its parent run and the comparison on test."""

    study_name: str
    storage: str
    parent_run_id: str
    n_complete: int
    best_params: dict[str, Any]
    best_dev_score: float
    metrics: dict[str, float] = field(default_factory=dict)


class DTCStudy:
    """One worker of a study on one version: caches per process, objective, final evaluation."""

    def __init__(
        self,
        mv: ModelVersion,
        sae: SparseAutoencoder,
        lm: LoadedLM,
        layer: int,
        judge: Judge,
        config: TuneConfig,
        pool: list[Instruction],
    ) -> None:
        self.mv, self.sae, self.lm, self.layer = mv, sae, lm, layer
        self.judge, self.config, self.pool = judge, config, pool
        self.steer_config = config.steer_config()
        self.space = config.search_space()
        self._tables: dict[tuple[float, int], dict[str, Tensor]] = {}
        self._explanations: dict[int, str] = {}
        self._results: dict[tuple[int, str], dict[str, Any]] = {}
        self.storage: optuna.storages.RDBStorage | None = None
        self.study: optuna.Study | None = None
        self.exhausted = False
        stats, self.stats_run_id, _ = latent_stats_for_version(
            mv, sae, lm, layer, self.steer_config.stats
        )
        self.max_F = stats["max_activation"]
        self.live_F = (stats["firing_frequency"] > 0) & (self.max_F > 0)
        if not bool(self.live_F.any()):
            raise RuntimeError(f"no latent of {mv.name}/{mv.version} fired in the held-out scan")
        self.reference_scale = float(self.max_F[self.live_F].median())

    # -- selection ------------------------------------------------------------------------

    def scores(self, alpha: float, dtc_k: int) -> dict[str, Tensor]:
        """The version's selection table for (α, k): read once per process, computed once per
        config (and then reused by hash from the tracking store)."""
        key = (float(alpha), int(dtc_k))
        if key not in self._tables:
            self._tables[key], _, _ = scores_for_version(
                self.mv, self.sae, self.lm, self.layer, self.config.selection_config(*key)
            )
        return self._tables[key]

    def candidates(self, params: dict[str, Any]) -> list[int]:
        """The parameter set's selected latents, best first (ValueError when none)."""
        scores_F = self.scores(params["alpha"], params["dtc_k"])[VARIANT_COLUMNS[params["variant"]]]
        if params["rule"] == "top_k":
            return top_k(scores_F, int(params["top_k"]), params["direction"], self.live_F)
        return quantile(scores_F, float(params["quantile"]), params["direction"], self.live_F)

    def none_set(self, size: int) -> list[int]:
        """No selection at the same size: ``size`` live latents in a seeded random order."""
        live = torch.nonzero(self.live_F)[:, 0]
        order = torch.randperm(len(live), generator=torch.Generator().manual_seed(self.config.seed))
        return live[order][:size].tolist()

    def output_score_set(self, params: dict[str, Any], size: int) -> list[int]:
        """Output-score selection (``up``) of ``size`` latents, read from the same table."""
        scores_F = self.scores(params["alpha"], params["dtc_k"])["output_score"]
        n = min(size, int((self.live_F & scores_F.isfinite()).sum()))
        return top_k(scores_F, n, "up", self.live_F)

    # -- steering -------------------------------------------------------------------------

    def explained(self, candidates: list[int]) -> list[int]:
        """The latents a candidate set steers, picked as steer's latent mode picks them
        (:mod:`evaluation.steering.latent_targets`): ``n_concepts`` sampled from an explained
        pool, uninformative explanations skipped; each latent is explained once per process."""
        from evaluation.interpretability.autointerp import AutointerpConfig, explain_latents

        stats = self.steer_config.stats
        explain_config = AutointerpConfig(
            corpus=stats.corpus,
            text_column=stats.text_column,
            n_tokens=self.config.explain_n_tokens,
            seed=self.config.seed,
        )

        def explain(ask: list[int]) -> dict[int, str]:
            missing = [i for i in ask if i not in self._explanations]
            if missing:
                found = explain_latents(
                    self.sae,
                    self.lm,
                    self.layer,
                    missing,
                    self.judge,
                    explain_config,
                    sae_identity(self.mv),
                )
                for latent in missing:
                    self._explanations[latent] = found.get(latent, "").strip()
            return {i: self._explanations[i] for i in ask}

        want = self.config.n_concepts
        sae_key = sae_identity(self.mv)
        # Explained in one seeded order of all latents, not the set's best-first order: a
        # quantile set is then represented by latents drawn from all of it, and two sets
        # share steered latents only as far as they share members. (Best first, every trial
        # of a default study steered nearly the same top latents and scored alike.)
        spread = seeded_order(candidates, len(self.max_F), self.config.seed, sae_key, "tune")
        pool = explained_pool(spread, pool_size(0, want), explain, self.judge)
        return sample_latents(pool, want, self.config.seed, sae_key)

    def latent_results(self, latents: list[int], split: str) -> list[dict[str, Any]]:
        """Each latent's protocol result on the ``dev`` half or on both halves (``full``),
        running the protocol only for latents not seen yet in this process."""
        missing = [i for i in latents if (i, split) not in self._results]
        targets: list[Target] = []
        if missing:
            for latent in missing:
                key = f"latent {latent}"
                target = Target(
                    key=key,
                    concept=self._explanations[latent],
                    genre=None,
                    latent=latent,
                    max_activation=float(self.max_F[latent]),
                )
                both, _ = instructions_without_echo(
                    key,
                    target.concept,
                    self.pool,
                    self.steer_config.n_instructions,
                    None,
                    self.steer_config.seed,
                    self.judge,
                )
                if both is None:  # its concept is in nearly every instruction: not steered
                    log.warning("%s: too few instructions without its concept", key)
                    continue
                target.split = both if split == "full" else InstructionSplit(both.dev)
                targets.append(target)
        if targets:
            result = run_protocol(
                targets,
                self.sae,
                self.lm,
                self.layer,
                self.judge,
                self.steer_config,
                self.reference_scale,
            )
            table = result.tables["per_concept"]
            for row in range(len(table["method"])):
                if table["method"][row] != SAE:
                    continue
                latent = int(table["latent"][row])
                self._results[(latent, split)] = {
                    "latent": latent,
                    "concept": table["concept"][row],
                    "alpha_star": float(table["alpha_star"][row]),
                    "dev_score": float(table["dev_score"][row]),
                    "test_score": float(table["test_score"][row]) if split == "full" else math.nan,
                    "dev_score_lift": float(table["dev_score_lift"][row]),
                    "test_score_lift": (
                        float(table["test_score_lift"][row]) if split == "full" else math.nan
                    ),
                    "unsteered_concept": float(table["unsteered_concept"][row]),
                }
        return [dict(self._results[(i, split)]) for i in latents if (i, split) in self._results]

    # -- the objective --------------------------------------------------------------------

    def _others(self, trial: optuna.Trial) -> list[FrozenTrial]:
        assert self.storage is not None and self.study is not None
        # Straight from the database: another worker's trials change under us.
        return [
            t
            for t in self.storage.get_all_trials(self.study._study_id, deepcopy=False)
            if t.number != trial.number
        ]

    def _claim(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        """Prune a duplicate or surplus trial (see the module docstring for the rule)."""
        trial.set_user_attr("claimed", True)  # written before reading: see the docstring
        others = self._others(trial)
        active = [
            t
            for t in others
            if t.state == TrialState.COMPLETE
            or (t.state == TrialState.RUNNING and t.user_attrs.get("claimed"))
        ]
        if len(active) >= self.config.n_trials:
            trial.set_user_attr("outcome", SURPLUS)
            assert self.study is not None
            self.study.stop()
            raise optuna.TrialPruned(f"{len(active)} trials already complete or running")
        infeasible = [
            t
            for t in others
            if t.state == TrialState.PRUNED and t.user_attrs.get("outcome") == INFEASIBLE
        ]
        if any(t.params == params for t in active + infeasible):
            trial.set_user_attr("outcome", DUPLICATE)
            self._enqueue_unseen(trial, [t.params for t in active + infeasible] + [params])
            raise optuna.TrialPruned(f"duplicate parameter set {params}")

    def _enqueue_unseen(self, trial: optuna.Trial, taken: list[dict[str, Any]]) -> None:
        unseen = [p for p in self.space if p not in taken]
        if not unseen:
            log.warning("every parameter set of the search space has been taken")
            self.exhausted = True
            assert self.study is not None
            self.study.stop()
            return
        pick = random.Random(f"{self.config.seed}:{trial.number}").choice(unseen)
        assert self.study is not None
        self.study.enqueue_trial(pick)

    def objective(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.config)
        self._claim(trial, params)
        try:
            candidates = self.candidates(params)
        except ValueError as err:
            trial.set_user_attr("outcome", INFEASIBLE)
            raise optuna.TrialPruned(f"infeasible: {err}") from err
        steered = self.explained(candidates)
        if not steered:
            trial.set_user_attr("outcome", INFEASIBLE)
            raise optuna.TrialPruned("infeasible: no candidate latent could be explained")
        assert self.study is not None
        tags = {
            **version_tags(self.mv),
            RUN_TYPE_TAG: TRIAL_RUN_TYPE,
            STUDY_TAG: self.study.study_name,
            "optuna_trial_number": str(trial.number),
        }
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({**params, "n_candidates": len(candidates)})
            rows = self.latent_results(steered, "dev")
            dev = {key: _mean([r[key] for r in rows]) for key in ("dev_score", "dev_score_lift")}
            score = dev[OBJECTIVE_KEYS[self.config.objective]]
            mlflow.log_metrics({**dev, "n_steered": float(len(rows))})
            mlflow.log_table(_columns(rows), "tables/targets.json")
        trial.set_user_attr("n_candidates", len(candidates))
        return score

    # -- the test split -------------------------------------------------------------------

    def evaluate_best(self, best: FrozenTrial) -> dict[str, float]:
        """The best set and output score at its size, both steered on the test split."""
        params = dict(best.params)
        dtc_set = self.candidates(params)
        output_set = self.output_score_set(params, len(dtc_set))
        metrics: dict[str, float] = {
            "best_dev_score": float(best.value if best.value is not None else math.nan),
            "subset_size": float(len(dtc_set)),
        }
        rows: list[dict[str, Any]] = []
        sets = {"dtc": dtc_set, "output_score": output_set, "none": self.none_set(len(dtc_set))}
        for name in COMPARED_SELECTIONS:
            steered = self.explained(sets[name])
            results = self.latent_results(steered, "full") if steered else []
            for r in results:
                rows.append({"selection": name, **r})
            for suffix in ("", "_lift"):
                metrics[f"test_steering_score{suffix}_{name}"] = _mean(
                    [r[f"test_score{suffix}"] for r in results]
                )
                metrics[f"dev_steering_score{suffix}_{name}"] = _mean(
                    [r[f"dev_score{suffix}"] for r in results]
                )
            metrics[f"free_concept_share_{name}"] = _mean(
                [float(r["unsteered_concept"] > 0) for r in results]
            )
            metrics[f"n_steered_{name}"] = float(len(results))
        for suffix in ("", "_lift"):
            dtc = metrics[f"test_steering_score{suffix}_dtc"]
            metrics[f"test_score{suffix}_difference"] = (
                dtc - metrics[f"test_steering_score{suffix}_output_score"]
            )
            metrics[f"test_score{suffix}_difference_none"] = (
                dtc - metrics[f"test_steering_score{suffix}_none"]
            )
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.set_tags(
            {
                "best_trial_number": str(best.number),
                "best_trial_run_id": str(best.user_attrs.get("mlflow_run_id", "")),
                **{f"best_{k}": str(v) for k, v in params.items()},
            }
        )
        if rows:
            mlflow.log_table(_columns(rows), "tables/test_targets.json")
        return metrics


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [r[key] for r in rows] for key in rows[0]}


def version_tags(mv: ModelVersion) -> dict[str, str]:
    """The version's own tags and its links (project/tracking.py's vocabulary)."""
    tags = run_tags(mv, TUNE_RUN_TYPE, "")
    tags.pop("eval", None)
    tags.pop("eval_config_hash", None)
    return tags


# ---------------------------------------------------------------------------------------------
# the parent run


def _parent_run_id(
    study: optuna.Study, created: bool, launcher: str | None, tags: dict[str, str], wait_s: float
) -> str:
    """The study's parent run: the creator's (its `mlflow run` launcher run, or a new run),
    stored as a study attribute that every later worker reads."""
    client = MlflowClient()

    def new_parent() -> str:
        if launcher is not None:
            client.set_tag(launcher, RUN_TYPE_TAG, TUNE_RUN_TYPE)
            return launcher
        experiment_id = mlflow.tracking.fluent._get_experiment_id()
        run = client.create_run(experiment_id, run_name=study.study_name, tags=tags)
        return run.info.run_id

    if created:
        run_id = new_parent()
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    deadline = time.monotonic() + wait_s
    while True:
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            try:
                client.get_run(run_id)
                return str(run_id)
            except mlflow.exceptions.MlflowException:
                log.warning("the study's parent run %s is not in this tracking store", run_id)
                break
        if time.monotonic() > deadline:
            log.warning("the study has no parent run yet; starting one")
            break
        time.sleep(0.5)
    run_id = new_parent()
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


# ---------------------------------------------------------------------------------------------
# the entry point


def tune(
    model_uri: str,
    config: TuneConfig | None = None,
    storage: str = "auto",
    *,
    lms: dict[str, LoadedLM] | None = None,
    judges: dict[str, Judge] | None = None,
) -> TuneResult:
    """Run (or join, or resume) the study on the one version ``model_uri`` names.

    ``lms`` and ``judges`` (by LM name, as :func:`evaluation.steering.steer.steer` takes them)
    reuse a caller's loaded LM and built judge.

    Raises:
        ValueError: bad input (config, storage, URI, LM, judge), before any work.
    """
    config = config or TuneConfig()
    tracking_uri = mlflow.get_tracking_uri()
    url = resolve_storage(storage, tracking_uri)
    versions = resolve_versions(model_uri)
    if len(versions) != 1:
        raise ValueError(
            f"model URI {model_uri!r} names {len(versions)} versions; tune_dtc tunes one: "
            "give models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    (mv,) = versions
    pool = load_instructions(config.steer_config().instructions)
    rdb = open_storage(url, config)  # before the LM loads: a bad storage fails fast
    sites, lms = load_sites(versions, lms)
    lm_name, layer = sites[version_uri(mv)]
    lm = lms[lm_name]
    judge = judge_for(
        judges if judges is not None else {}, lm_name, config.judge, lm=lm, **config.judge_options
    )
    name = study_name(mv, config, judge)
    mark_work_started()

    try:
        optuna.create_study(study_name=name, storage=rdb, direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    sampler = optuna.samplers.TPESampler(seed=(config.seed * 1_000_003 + os.getpid()) % 2**31)
    study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler)
    log.info(
        "study %s in %s (%s)", name, without_password(url), "new" if created else "joined/resumed"
    )

    tags = {**version_tags(mv), RUN_TYPE_TAG: TUNE_RUN_TYPE, STUDY_TAG: name}
    with _without_launcher_env() as launcher:
        parent_id = _parent_run_id(study, created, launcher, tags, wait_s=60)
        if launcher is not None and launcher != parent_id:
            client = MlflowClient()
            client.set_tag(launcher, RUN_TYPE_TAG, WORKER_RUN_TYPE)
            client.set_tag(launcher, f"{TUNE_RUN_TYPE}.parent_run_id", parent_id)
        with _in_experiment_of(parent_id), mlflow.start_run(run_id=parent_id):
            mlflow.set_tags(
                {**tags, "optuna_storage": without_password(url), "n_trials": str(config.n_trials)}
            )
            if created:
                # Prefixed: an `mlflow run` launcher run already holds the raw -P values.
                params = {
                    f"tune.{k}": ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
                    for k, v in config.identity().items()
                }
                mlflow.log_params(params)
            set_version_tag(mv.name, mv.version, VERSION_LINK_TAG, parent_id)
            worker = DTCStudy(mv, load_version(mv), lm, layer, judge, config, pool)
            worker.storage, worker.study = rdb, study
            _optimize(worker, study, config)
            trials = rdb.get_all_trials(study._study_id, deepcopy=False)
            complete, _ = trial_counts(trials)
            mlflow.log_metric("n_complete_trials", complete)
            best = study.best_trial
            parent = MlflowClient().get_run(parent_id)
            if (
                parent.data.tags.get("best_trial_number") == str(best.number)
                and "test_score_difference" in parent.data.metrics
            ):
                log.info("trial %d was already evaluated on test by another worker", best.number)
                metrics = dict(parent.data.metrics)
            else:
                metrics = worker.evaluate_best(best)
    return TuneResult(
        name,
        without_password(url),
        parent_id,
        complete,
        dict(best.params),
        float(best.value or 0),
        metrics,
    )


def _optimize(worker: DTCStudy, study: optuna.Study, config: TuneConfig) -> None:
    """Run trials until the study holds ``n_trials`` COMPLETE ones; wait while other workers'
    claimed trials may still complete it, and step in when one of them fails."""
    stop = optuna.study.MaxTrialsCallback(config.n_trials, states=(TrialState.COMPLETE,))
    assert worker.storage is not None
    while not worker.exhausted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a killed worker's trials
        _fail_orphans(study, config.grace_seconds)
        _kill_runs_of_failed_trials(study)
        complete, running = trial_counts(
            worker.storage.get_all_trials(study._study_id, deepcopy=False)
        )
        if complete >= config.n_trials:
            return
        if complete + running >= config.n_trials:
            time.sleep(config.poll_seconds)
            continue
        # A surplus or exhausted trial stops this pass only; optimize clears the flag.
        study.optimize(worker.objective, callbacks=[stop], catch=(), gc_after_trial=False)
    complete, _ = trial_counts(worker.storage.get_all_trials(study._study_id, deepcopy=False))
    if complete == 0:
        raise RuntimeError("no parameter set of the search space was feasible")
    if complete < config.n_trials:
        log.warning(
            "the search space ran out of feasible parameter sets after %d of %d trials",
            complete,
            config.n_trials,
        )


def _fail_orphans(study: optuna.Study, grace_seconds: int) -> None:
    """FAIL RUNNING trials never claimed and older than the grace period. A worker stopped
    between Optuna creating its trial and the heartbeat thread's first beat leaves a trial with
    no heartbeat, which ``fail_stale_trials`` never fails; a live worker claims its trial within
    a moment of creating it (the sampler's suggestion is all that comes between)."""
    now = datetime.datetime.now()
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        if t.state != TrialState.RUNNING or t.user_attrs.get("claimed"):
            continue
        if t.datetime_start and (now - t.datetime_start).total_seconds() > grace_seconds:
            log.info("trial %d was never claimed within %ds: failed", t.number, grace_seconds)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _kill_runs_of_failed_trials(study: optuna.Study) -> None:
    """Mark KILLED the MLflow run of every FAILED trial still RUNNING there: its worker died
    (the heartbeat failed the trial), and its run must not look alive in the UI."""
    client = MlflowClient()
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state != TrialState.FAIL or not run_id:
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                log.info("trial %d failed with its worker: run %s marked KILLED", t.number, run_id)
        except mlflow.exceptions.MlflowException:
            continue  # its run is gone


def _configure_tracking() -> str:
    """configure_tracking, retried once: two workers starting together may both try to create
    the default experiment, and the second one's create fails."""
    try:
        return configure_tracking(experiment=DEFAULT_EXPERIMENT)
    except mlflow.exceptions.MlflowException:
        time.sleep(1.0)
        return configure_tracking(experiment=DEFAULT_EXPERIMENT)


def main() -> None:
    defaults = TuneConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--storage", default="auto")
    parser.add_argument("--n_trials", type=parse_int, default=defaults["n_trials"].default)
    lists = {
        "directions": str,
        "rules": str,
        "top_ks": int,
        "quantiles": float,
        "alphas": float,
        "dtc_ks": int,
        "variants": str,
        "factors": float,
    }
    for name in lists:
        parser.add_argument(f"--{name}", default=",".join(map(str, defaults[name].default)))
    for name in (
        "n_concepts",
        "n_instructions",
        "max_new_tokens",
        "seed",
        "stats_n_tokens",
        "explain_n_tokens",
    ):
        parser.add_argument(f"--{name}", type=parse_int, default=defaults[name].default)
    parser.add_argument("--temperature", type=float, default=defaults["temperature"].default)
    parser.add_argument("--intervention", default=defaults["intervention"].default)
    parser.add_argument("--judge", default=defaults["judge"].default)
    parser.add_argument("--objective", default=defaults["objective"].default)
    args, extra = parser.parse_known_args()
    values = {
        name: parse_factors(getattr(args, name))
        if name == "factors"
        else parse_list(
            getattr(args, name),
            parse_int if cast is int else cast,
            name,
            "integer" if cast is int else cast.__name__,
        )
        for name, cast in lists.items()
    }
    config = TuneConfig(
        n_trials=args.n_trials,
        n_concepts=args.n_concepts,
        n_instructions=args.n_instructions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stats_n_tokens=args.stats_n_tokens,
        explain_n_tokens=args.explain_n_tokens,
        temperature=args.temperature,
        intervention=args.intervention,
        judge=args.judge,
        objective=args.objective,
        judge_options=parse_prefixed_options(extra),
        **values,
    )
    tracking_uri = _configure_tracking()
    started = time.perf_counter()
    result = tune(args.model_uri, config, args.storage)
    m = result.metrics
    print(
        f"tune_dtc {args.model_uri}: study {result.study_name} ({result.storage}), "
        f"{result.n_complete} trials, parent run {result.parent_run_id}"
    )
    print(f"best {result.best_params}: dev {result.best_dev_score:.3f}")
    for suffix, what in (("", "paper's score"), ("_lift", "by concept lift")):
        print(
            f"test ({what}): dtc {m[f'test_steering_score{suffix}_dtc']:.3f}, output score "
            f"{m[f'test_steering_score{suffix}_output_score']:.3f}, none "
            f"{m[f'test_steering_score{suffix}_none']:.3f} (dtc - output score "
            f"{m[f'test_score{suffix}_difference']:+.3f}, subset size {int(m['subset_size'])})"
        )
    print(f"total {time.perf_counter() - started:.0f}s; browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
