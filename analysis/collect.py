"""Read the study's numbers from the tracking server and join them per model version.

Everything comes through ``MlflowClient`` (METHODS §6: never from local files), so the
analysis works the same on the embedded SQLite store and on a shared server:

- which runs: exactly the given ``run_ids`` (a study's own runs, reused ones included: see
  :func:`study_run_ids`), else every FINISHED run of the named experiments;
- interpretability µ: the named metric of the latest such eval run of each version
  (``saeflow.run_type = eval``; default ``autointerp_score``, any logged eval metric by name);
- utility g: ``steering_score`` (or another metric) of the latest such steer run of each
  version with the chosen ``steer_mode`` and ``selection``;
- the steering gain of a selection: the percentage lift of its score over the same
  version's ``selection=none`` run (METHODS §3): the none run with the selection run's own
  config where steer logged it (``none_<utility metric>``), else the newest none run;
- what each version is (LM, layer, width, architecture, target and measured L0, random-init
  control or not): its registry tags.

Runs are pooled only when they measured the same thing. Each eval and steer run belongs to a
*config group*: a short hash of its config as logged (every param of an eval run; the
``SteerConfig`` fields of a steer run, selection aside) and its judge's identity. When the runs
found span more than one group, :class:`MixedRunsError` names the groups and how to pick one
(``eval_group`` / ``steer_group``, or a study's run id) before anything is computed. A run is
joined to a version only if it was about that version's SAE: its ``training_run_id`` tag must be
the version's (a registered model deleted and recreated reuses version numbers).

Runs are read page by page in a stable order (``search_runs`` pages by SQL offset). Versions
lacking a metric, and runs left out, are returned in ``missing``, never dropped silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient

from project.cli import BadInputError
from project.tracking import (
    MODEL_VERSION_NUMBER_TAG,
    REGISTERED_MODEL_TAG,
    RUN_TYPE_TAG,
    TRAINING_RUN_TAG,
    lm_of,
)

# As large as the tracking server allows: each page is one SQL query plus its eager loads.
PAGE_SIZE = SEARCH_MAX_RESULTS_THRESHOLD
# Run ids per ``attributes.run_id IN (...)`` query: well inside SQLite's bound-variable limit.
RUN_ID_CHUNK = 200
NO_SELECTION = "none"
# The share of a steer run's targets whose concept the unsteered answers already carry.
FREE_SHARE_METRIC = "free_concept_share"
# The registry tag of a random-init control (project/import_sae.py).
BASELINE_TAG = "baseline"
# The judge's full identity (model, endpoint, rules), where a run logged it; else its name.
JUDGE_IDENTITY_TAG = "judge_identity"
# The study run's artifact listing every run it used (analysis/study.py).
STUDY_RUNS_ARTIFACT = "study_runs.json"
STUDY_RUN_TYPE = "study"
# The study steps whose runs the analysis reads.
ANALYSED_STEPS = ("evaluate", "steer")
# The run types collect reads (evaluation/interpretability/evaluate.py,
# evaluation/steering/steer.py).
STEER_RUN_TYPE = "steer"
EVAL_RUN_TYPE = "eval"


class MixedRunsError(BadInputError):
    """The runs found measured different things (configs or judges); pooling them would
    correlate a mixture. ``groups``: each config group's key and what its runs measured."""

    def __init__(self, message: str, groups: dict[str, dict[str, str]]) -> None:
        super().__init__(message)
        self.groups = groups


@dataclass
class StudyData:
    """One row per (registered model, version) with µ and g, plus what could not be joined."""

    table: pd.DataFrame  # SAEs with both metrics (controls excluded)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (model URI, what is missing)
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # random-init controls
    steering_by_selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Every version any used run was about, complete or not: the grid sparsity ranks come from.
    grid: pd.DataFrame = field(default_factory=pd.DataFrame)
    eval_group: str = ""  # the config group of the eval runs used ("" when none were found)
    steer_group: str = ""


@dataclass(frozen=True)
class _RunRecord:
    """What the join needs of one run (not the whole Run: a store holds thousands)."""

    run_id: str
    start_time: int
    key: tuple[str, str]
    group: str
    training_run_id: str
    metrics: dict[str, float]
    selection: str = ""


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while runs are read: materialising ~50k ORM objects
    (runs, tags, metrics) triggers collections that walk the whole heap, which cost more than
    the reading itself (measured over 5,200 runs: 1.7 s -> 0.7 s of CPU). Reference counting
    still frees everything; the collector resumes (and catches up) afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def iter_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> Iterator[Run]:
    """Every FINISHED run matching ``filter_string``, newest first, page by page."""
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=f"{filter_string} AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC", "attributes.run_id ASC"],
            max_results=PAGE_SIZE,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def _iter_chosen_runs(
    client: MlflowClient, experiment_ids: list[str], filter_string: str, run_ids: list[str] | None
) -> Iterator[Run]:
    if run_ids is None:
        yield from iter_runs(client, experiment_ids, filter_string)
        return
    for start in range(0, len(run_ids), RUN_ID_CHUNK):
        chunk = ", ".join(f"'{r}'" for r in run_ids[start : start + RUN_ID_CHUNK])
        yield from iter_runs(
            client, experiment_ids, f"{filter_string} AND attributes.run_id IN ({chunk})"
        )


def experiment_ids(client: MlflowClient, names: list[str] | None) -> list[str]:
    """Ids of the named experiments (all when ``names`` is empty); ValueError for unknown ones."""
    experiments = client.search_experiments()
    if not names:
        return [e.experiment_id for e in experiments]
    by_name = {e.name: e.experiment_id for e in experiments}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"experiment(s) {unknown} not found on the tracking server; "
            f"known: {sorted(by_name) or 'none'}"
        )
    return [by_name[n] for n in names]


def study_run_ids(client: MlflowClient, study_run_id: str) -> list[str]:
    """The eval and steer runs a study used, new and reused, from its ``study_runs.json``;
    BadInputError when ``study_run_id`` is no study run or lists none."""
    try:
        run = client.get_run(study_run_id)
    except mlflow.exceptions.MlflowException:
        raise BadInputError(
            f"study_run_id {study_run_id!r} is not a run on this tracking server"
        ) from None
    if run.data.tags.get(RUN_TYPE_TAG) != STUDY_RUN_TYPE:
        raise BadInputError(
            f"study_run_id {study_run_id!r} is a "
            f"{run.data.tags.get(RUN_TYPE_TAG, 'untyped')!r} run, not a {STUDY_RUN_TYPE!r} run"
        )
    try:
        listed = mlflow.artifacts.load_dict(f"runs:/{study_run_id}/{STUDY_RUNS_ARTIFACT}")
    except Exception as err:  # noqa: BLE001 - any failure to read it means the same to a user
        raise BadInputError(
            f"study run {study_run_id!r} has no readable {STUDY_RUNS_ARTIFACT} "
            f"({type(err).__name__}): it logs it once its steps have run"
        ) from None
    ids = [r["run_id"] for r in listed.get("runs", []) if r.get("step") in ANALYSED_STEPS]
    if not ids:
        raise BadInputError(
            f"study run {study_run_id!r} lists no {' or '.join(ANALYSED_STEPS)} runs in "
            f"{STUDY_RUNS_ARTIFACT}"
        )
    return list(dict.fromkeys(r for r in ids if r))


def _version_key(run: Run) -> tuple[str, str] | None:
    tags = run.data.tags
    name, version = tags.get(REGISTERED_MODEL_TAG), tags.get(MODEL_VERSION_NUMBER_TAG)
    return (name, version) if name and version else None


def latest_metric_by_version(runs: Iterator[Run], metric: str) -> dict[tuple[str, str], float]:
    """The metric of the newest run (runs arrive newest first) of each version that logged it."""
    out: dict[tuple[str, str], float] = {}
    for run in runs:
        key = _version_key(run)
        if key is not None and key not in out and metric in run.data.metrics:
            out[key] = float(run.data.metrics[metric])
    return out


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------------------------
# config groups


def _judge_of(run: Run) -> str:
    tags, params = run.data.tags, run.data.params
    return tags.get(JUDGE_IDENTITY_TAG) or params.get("judge") or tags.get("judge") or ""


NOT_LOGGED = "(not logged)"


@functools.lru_cache(maxsize=1)
def _steer_config_params() -> tuple[str, ...]:
    """The params a steer run logs for its ``SteerConfig`` (stats fields as ``stats_<name>``),
    less the selection (the none baseline and the selection runs of one study are one group).
    Only config fields count: per-SAE facts a run also logs (its latent-stats run, how many
    candidates it had) must not split a study into one group per SAE."""
    from evaluation.selection.config import LatentStatsConfig
    from evaluation.steering.config import SteerConfig

    names = [
        f.name for f in dataclasses.fields(SteerConfig) if f.name not in ("stats", "selection")
    ]
    names += [f"stats_{f.name}" for f in dataclasses.fields(LatentStatsConfig)]
    return tuple(names)


def steer_run_identity(run: Run) -> dict[str, str]:
    """What a steer run measured: its config as logged and its judge."""
    params = run.data.params
    identity = {name: params.get(name, NOT_LOGGED) for name in _steer_config_params()}
    identity["judge"] = _judge_of(run)
    return identity


def eval_run_identity(run: Run) -> dict[str, str]:
    """What an eval run measured: the eval, its whole config (every param) and its judge."""
    identity = {k: v for k, v in run.data.params.items() if k != "judge"}
    identity["eval"] = run.data.tags.get("eval", NOT_LOGGED)
    identity["judge"] = _judge_of(run)
    return identity


def group_key(identity: dict[str, str]) -> str:
    """A short, stable name of a config group (what ``eval_group`` / ``steer_group`` take)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _describe_groups(
    identities: dict[str, dict[str, str]], records: list[_RunRecord], keys: Collection[str]
) -> str:
    """Each group with the settings that tell it from the others, and its runs and versions."""
    shown = sorted(keys)
    differing = [
        name
        for name in sorted({n for k in shown for n in identities[k]})
        if len({identities[k].get(name, NOT_LOGGED) for k in shown}) > 1
    ]
    parts = []
    for key in shown:
        mine = [r for r in records if r.group == key]
        settings = ", ".join(
            f"{name}={identities[key].get(name, NOT_LOGGED)[:60]}" for name in differing
        )
        parts.append(
            f"{key!r} ({settings}; {len(mine)} run(s) on {len({r.key for r in mine})} version(s))"
        )
    return "; ".join(parts)


def _one_group(
    kind: str,
    what: str,
    records: list[_RunRecord],
    identities: dict[str, dict[str, str]],
    wanted: str,
    parameter: str,
) -> str:
    """The config group the analysis reads: ``wanted`` if given, else the only one found;
    MixedRunsError naming the groups otherwise."""
    present = {r.group for r in records}
    groups = {key: identities[key] for key in sorted(present)}
    if wanted:
        if wanted not in present:
            raise MixedRunsError(
                f"{parameter}={wanted!r} matches none of the {kind} runs ({what}); their "
                f"config groups: {_describe_groups(identities, records, present) or 'none'}",
                groups,
            )
        return wanted
    if len(present) <= 1:
        return next(iter(present), "")
    raise MixedRunsError(
        f"the {kind} runs ({what}) come from {len(present)} config groups, which measured "
        "different things and are never pooled: "
        f"{_describe_groups(identities, records, present)}. Pick one with {parameter}=<group> "
        f"(-P {parameter}=... with mlflow run), or analyse one study's own runs with "
        "study_run_id=<its study run id>.",
        groups,
    )


# ---------------------------------------------------------------------------------------------
# reading and joining


def version_rows(client: MlflowClient, names: set[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Registry facts of every version of the named registered models."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name in sorted(names):
        escaped = name.replace("'", "\\'")
        token = None
        while True:
            page = client.search_model_versions(
                f"name = '{escaped}'", max_results=PAGE_SIZE, page_token=token
            )
            for mv in page:
                tags = mv.tags or {}
                measured = tags.get("l0_measured") or tags.get("metric.l0")
                rows[(mv.name, str(mv.version))] = {
                    "registered_model": mv.name,
                    "version": int(mv.version),
                    "model_uri": f"models:/{mv.name}/{mv.version}",
                    "lm_name": lm_of(tags) or "unknown",
                    "layer": _float(tags.get("layer")),
                    "d_sae": _float(tags.get("d_sae")),
                    "architecture": tags.get("architecture", "unknown"),
                    "target_l0": _float(tags.get("target_l0")),
                    "l0": _float(measured)
                    if measured is not None
                    else _float(tags.get("target_l0")),
                    "is_control": tags.get(BASELINE_TAG) == "random_init",
                    # Runs about this version carry the same tag (project.runs.run_tags).
                    TRAINING_RUN_TAG: tags.get(TRAINING_RUN_TAG) or mv.run_id or "",
                }
            token = page.token
            if not token:
                break
    return rows


def _records(
    runs: Iterator[Run],
    needed: tuple[str, ...],
    optional: tuple[str, ...],
    identity_of: Any,
    identities: dict[str, dict[str, str]],
) -> list[_RunRecord]:
    """The runs about a version that logged every ``needed`` metric, as records."""
    out = []
    for run in runs:
        key = _version_key(run)
        metrics = run.data.metrics
        if key is None or any(m not in metrics for m in needed):
            continue
        identity = identity_of(run)
        group = group_key(identity)
        identities.setdefault(group, identity)
        out.append(
            _RunRecord(
                run_id=run.info.run_id,
                start_time=int(run.info.start_time or 0),
                key=key,
                group=group,
                training_run_id=run.data.tags.get(TRAINING_RUN_TAG, ""),
                metrics={m: float(metrics[m]) for m in (*needed, *optional) if m in metrics},
                selection=run.data.tags.get("selection", NO_SELECTION),
            )
        )
    # Newest first across query chunks too; the run id breaks ties as the paged order does.
    out.sort(key=lambda r: r.run_id)
    out.sort(key=lambda r: r.start_time, reverse=True)
    return out


def _newest(records: list[_RunRecord]) -> dict[tuple[str, str], _RunRecord]:
    out: dict[tuple[str, str], _RunRecord] = {}
    for record in records:  # newest first
        out.setdefault(record.key, record)
    return out


def _uri(key: tuple[str, str]) -> str:
    return f"models:/{key[0]}/{key[1]}"


def _about_their_version(
    records: list[_RunRecord],
    facts: dict[tuple[str, str], dict[str, Any]],
    kind: str,
    missing: list[tuple[str, str]],
) -> list[_RunRecord]:
    """The records whose run was about the SAE its version holds now; the others listed."""
    kept = []
    for record in records:
        fact = facts.get(record.key)
        if fact is None:
            continue
        version_run = fact[TRAINING_RUN_TAG]
        if record.training_run_id and version_run and record.training_run_id != version_run:
            missing.append(
                (
                    fact["model_uri"],
                    f"{kind} run {record.run_id} was about another SAE (training run "
                    f"{record.training_run_id}; this version's is {version_run}): left out",
                )
            )
            continue
        kept.append(record)
    return kept


def collect(
    client: MlflowClient,
    *,
    experiments: list[str] | None = None,
    interp_metric: str = "autointerp_score",
    utility_metric: str = "steering_score",
    steer_mode: str = "latent",
    selection: str = NO_SELECTION,
    run_ids: Collection[str] | None = None,
    eval_group: str = "",
    steer_group: str = "",
    companion_metric: str = "",
) -> StudyData:
    """Join µ (eval runs), g (steer runs) and the registry's facts per model version.

    ``run_ids``: read only these runs (a study's own, :func:`study_run_ids`); ``eval_group`` /
    ``steer_group``: the config group to read where the runs span several
    (:class:`MixedRunsError` names them otherwise). ``companion_metric``: a second steer
    metric read from the same runs (columns ``<metric>``, ``<metric>_none``, ``<metric>_gain``),
    e.g. ``steering_score_lift`` beside ``steering_score``."""
    with _without_cyclic_gc():
        return _collect(
            client,
            experiments,
            interp_metric,
            utility_metric,
            steer_mode,
            selection,
            None if run_ids is None else list(dict.fromkeys(run_ids)),
            eval_group,
            steer_group,
            companion_metric,
        )


def _gain(score: float, base: float) -> float:
    return (score - base) / base * 100 if base and not math.isnan(base) else math.nan


def _collect(
    client: MlflowClient,
    experiments: list[str] | None,
    interp_metric: str,
    utility_metric: str,
    steer_mode: str,
    selection: str,
    run_ids: list[str] | None,
    eval_group: str,
    steer_group: str,
    companion_metric: str,
) -> StudyData:
    ids = experiment_ids(client, experiments)
    identities: dict[str, dict[str, str]] = {}
    eval_records = _records(
        _iter_chosen_runs(client, ids, f"tags.`{RUN_TYPE_TAG}` = '{EVAL_RUN_TYPE}'", run_ids),
        (interp_metric,),
        (),
        eval_run_identity,
        identities,
    )
    # The none score the selection's gain was measured against: steer logs it on the
    # selection run as none_<metric> (the none run of the selection run's own config).
    companions = (companion_metric,) if companion_metric else ()
    optional = (
        *companions,
        f"none_{utility_metric}",
        *(f"none_{m}" for m in companions),
        FREE_SHARE_METRIC,
    )
    steer_records = _records(
        _iter_chosen_runs(
            client,
            ids,
            f"tags.`{RUN_TYPE_TAG}` = '{STEER_RUN_TYPE}' AND tags.steer_mode = '{steer_mode}'",
            run_ids,
        ),
        (utility_metric,),
        optional,
        steer_run_identity,
        identities,
    )

    missing: list[tuple[str, str]] = []
    keys = {r.key for r in eval_records} | {r.key for r in steer_records}
    facts = version_rows(client, {name for name, _ in keys})
    for key in sorted(keys - set(facts), key=lambda k: (k[0], int(k[1]))):
        missing.append((_uri(key), "no registered version (deleted?)"))
    eval_records = _about_their_version(eval_records, facts, "eval", missing)
    steer_records = _about_their_version(steer_records, facts, "steer", missing)

    chosen_eval = _one_group(
        "eval",
        f"that logged {interp_metric}",
        eval_records,
        identities,
        eval_group,
        "eval_group",
    )
    compared = {selection, NO_SELECTION}
    relevant = [r for r in steer_records if r.selection in compared]
    chosen_steer = _one_group(
        "steer",
        f"mode {steer_mode}, selection {' and '.join(sorted(compared))}, that logged "
        f"{utility_metric}",
        relevant,
        identities,
        steer_group,
        "steer_group",
    )
    mu_runs = _newest([r for r in eval_records if r.group == chosen_eval])
    in_group = [r for r in steer_records if r.group == chosen_steer]
    steer_runs = {
        chosen: _newest([r for r in in_group if r.selection == chosen])
        for chosen in dict.fromkeys(r.selection for r in in_group)
    }
    g_runs, none_runs = steer_runs.get(selection, {}), steer_runs.get(NO_SELECTION, {})

    used = set(mu_runs) | {k for by_version in steer_runs.values() for k in by_version}
    rows = []
    for key in sorted(used, key=lambda k: (k[0], int(k[1]))):
        fact = facts[key]
        mu_run, g_run, none_run = mu_runs.get(key), g_runs.get(key), none_runs.get(key)
        row = dict(
            fact,
            mu=mu_run.metrics[interp_metric] if mu_run else math.nan,
            eval_run_id=mu_run.run_id if mu_run else "",
            steer_run_id=g_run.run_id if g_run else "",
        )
        for metric, prefix in ((utility_metric, "g"), *((m, m) for m in companions)):
            score = g_run.metrics.get(metric, math.nan) if g_run else math.nan
            base = none_run.metrics.get(metric, math.nan) if none_run else math.nan
            if g_run is not None and selection != NO_SELECTION:
                base = g_run.metrics.get(f"none_{metric}", base)
            row[prefix] = score
            row[f"{prefix}_none"] = base
            row[f"{prefix}_gain" if prefix != "g" else "gain"] = _gain(score, base)
        # How much of g a concept already present unsteered could have earned (issue 18).
        row[FREE_SHARE_METRIC] = (
            g_run.metrics.get(FREE_SHARE_METRIC, math.nan) if g_run else math.nan
        )
        lacks = [
            what
            for what, value in (
                (interp_metric, row["mu"]),
                (f"{utility_metric} ({selection})", row["g"]),
            )
            if math.isnan(value)
        ]
        if lacks:
            missing.append((row["model_uri"], "no " + " and no ".join(lacks)))
        elif selection != NO_SELECTION and math.isnan(row["gain"]):
            why = (
                f"its selection={NO_SELECTION} {utility_metric} is 0"
                if row["g_none"] == 0
                else f"no selection={NO_SELECTION} run to measure it against"
            )
            missing.append((row["model_uri"], f"no steering gain of {selection}: {why}"))
        rows.append(row)
    columns = [
        "registered_model", "version", "model_uri", "lm_name", "layer", "d_sae", "architecture",
        "target_l0", "l0", "is_control", "mu", "g", "g_none", "gain",
        *(c for m in companions for c in (m, f"{m}_none", f"{m}_gain")), FREE_SHARE_METRIC,
        "eval_run_id", "steer_run_id", TRAINING_RUN_TAG,
    ]  # fmt: skip
    everything = pd.DataFrame(rows, columns=columns)
    for column in ("layer", "d_sae"):  # whole numbers, so group labels read "layer=10"
        values = everything[column].dropna()
        if (values == values.round()).all():
            everything[column] = everything[column].astype("Int64")
    complete = everything.dropna(subset=["mu", "g"])
    by_selection = [
        dict(facts[key], selection=chosen, steering_score=record.metrics[utility_metric])
        for chosen, by_version in steer_runs.items()
        for key, record in by_version.items()
    ]
    return StudyData(
        table=complete[~complete["is_control"]].reset_index(drop=True),
        missing=missing,
        controls=complete[complete["is_control"]].reset_index(drop=True),
        steering_by_selection=pd.DataFrame(by_selection),
        grid=everything[~everything["is_control"]].reset_index(drop=True),
        eval_group=chosen_eval,
        steer_group=chosen_steer,
    )
