"""Entry point ``steer``: the AxBench steering score of registered SAEs, one MLflow run each.

    mlflow run . -e steer --env-manager local -P model_uri=models:/NAME/1 \\
        -P mode=concept -P selection=none -P judge=offline

``model_uri`` is ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``models:/NAME`` (every
version). Each (version, mode, selection, judge, config) gets one run tagged
``saeflow.run_type=steer``, ``steer_mode``, ``selection``, the version's tags and links
(``registered_model``, ``model_version``, ``model_uri``, ``lm_name``, ``training_run_id``) and
``eval_config_hash``; a FINISHED run with the same hash is reported instead of recomputed unless
``force=true``. The version gets the tag ``steer.<mode>.run_id``.

Logged: metrics ``steering_score``, ``concept_score``, ``instruct_score``, ``fluency_score``
(and ``steering_score_ci_low/high``, a bootstrap interval over concepts); the unsteered floor as
``unsteered_*``; in concept mode the references as ``diffmean_*``, ``random_*``, ``prompt_*``,
and each method paired with the random-direction floor by concept: ``<method>_minus_random_
steering`` / ``_concept`` with ``_ci_low`` / ``_ci_high`` (``sae_`` for the SAE's latent).
Tables ``tables/per_concept.json``, ``tables/per_factor.json`` and ``tables/generations.json``
(every generation with its three ratings, for re-judging); ``steer_config.json`` and
``judge.json`` (the judge's identity, description and unparsable answers).

With ``selection`` other than ``none``, the run also logs its **steering gain**: the metric
``steering_gain`` = ``100 · (steering_score − s_none) / s_none``, s_none the ``steering_score``
of the same version's ``selection=none`` run with the same config otherwise (found by hash, or
computed first as its own linked run), whose id is the tag ``none_run_id`` and whose score is
the metric ``none_steering_score``. A zero (or missing) s_none defines no gain: the metric is
not logged and the tag ``steering_gain_status`` says why (``logged`` otherwise).

Judge options pass as ``--judge.<option> VALUE`` (``-P judge.model=...`` through mlflow run).
Everything that can be wrong with the input fails before any generation (exit code 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from evaluation.selection.config import LatentStatsConfig
from evaluation.selection.latent_stats import latent_stats_for_version
from evaluation.selection.registry import SelectionContext, select
from evaluation.steering.config import SteerConfig, parse_factors
from evaluation.steering.latent_targets import (
    ExplainedPool,
    explained_pool,
    instructions_without_echo,
    pool_size,
    sample_latents,
    seeded_order,
)
from evaluation.steering.protocol import (
    ProtocolJob,
    SteeringResult,
    Target,
    concept_targets,
    judge_steering_prompts,
    run_protocols,
)
from evaluation.steering.trained.config import check_layers, save_adapter
from evaluation.steering.trained.steering import (
    TrainedSetup,
    train_for_targets,
    trained_config,
)
from project.checks import resolved_device
from project.cli import (
    PartialFailureError,
    parse_bool,
    parse_int,
    parse_optional_list,
    parse_prefixed_options,
    run_entry_point,
)
from project.concepts import (
    Concept,
    Instruction,
    load_concepts,
    load_instructions,
)
from project.judges import JUDGE_NAMES, Judge, judge_for
from project.judges.agreement import measured_agreement
from project.lm import LoadedLM, lm_dtype
from project.registry import load_version, sae_identity
from project.runs import (
    config_hash,
    find_finished_run,
    load_sites,
    parent_run,
    resolve_versions,
    run_tags,
    version_uri,
)
from project.saes import SparseAutoencoder
from project.tracking import (
    DEFAULT_EXPERIMENT,
    RUN_TYPE_TAG,
    configure_tracking,
    set_version_tag,
    ui_hint,
)

log = logging.getLogger(__name__)

STEER_RUN_TYPE = "steer"
BATCH_RUN_TYPE = "steer_batch"
VERSION_LINK_TAG = "steer.{mode}.run_id"
NO_SELECTION = "none"
# The steering gain of a selection run (METHODS §3) and what it is measured against.
GAIN_METRIC = "steering_gain"
GAIN_NONE_RUN_TAG = "none_run_id"
GAIN_STATUS_TAG = "steering_gain_status"
# Versions set up and generated together. Batches of 48 rows are already at the LM's decode
# plateau on a CPU, so staging more only adds memory (every staged SAE stays loaded: a 16k
# SAE of a 2,304-wide LM is ~300 MB).
STAGED_VERSIONS = 10


@dataclass
class SteerRunResult:
    model_uri: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0
    # Selection runs only: the gain over the version's selection=none run (None: undefined).
    gain: float | None = None
    none_run_id: str | None = None
    # Set where the run failed (no run logged): why.
    error: str | None = None


def _judge_identity(judge: Judge) -> dict[str, Any]:
    identity = getattr(judge, "identity", None)
    return identity() if callable(identity) else judge.describe()


def _latent_targets(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    candidates: list[int],
    max_activation_F: torch.Tensor,
    judge: Judge,
    config: SteerConfig,
    sae_key: str,
) -> tuple[list[Target], ExplainedPool]:
    """``n_concepts`` latents sampled from an explained pool of the candidates
    (:mod:`evaluation.steering.latent_targets`), each with its explanation as the concept."""
    from evaluation.interpretability.autointerp import AutointerpConfig, explain_latents

    explain_config = AutointerpConfig(
        corpus=config.stats.corpus, text_column=config.stats.text_column, seed=config.seed
    )
    # Explained in an order seeded by the SAE (see latent_targets): not the same ids per width.
    spread = seeded_order(candidates, len(max_activation_F), config.seed, sae_key, "steer")
    pool = explained_pool(
        spread,
        pool_size(config.explain_pool, config.n_concepts),
        lambda ask: explain_latents(sae, lm, layer, ask, judge, explain_config, sae_key),
        judge,
    )
    latents = sample_latents(pool, config.n_concepts, config.seed, sae_key)
    if not latents:
        raise RuntimeError(
            f"no candidate latent could be explained informatively ({pool.n_explained} asked, "
            f"{pool.n_unexplained} unexplained, {pool.n_uninformative} only common tokens)"
        )
    if len(latents) < config.n_concepts:
        log.warning(
            "only %d latents could be explained (%d asked)", len(latents), config.n_concepts
        )
    targets = [
        Target(
            key=f"latent {latent}",
            concept=pool.explanations[latent],
            genre=None,
            latent=latent,
            max_activation=float(max_activation_F[latent]),
            # The floor (config.random_floor): a direction of its own per SAE and latent, at
            # the latent's norm.
            random_D=_random_unit(lm.d_model, config.seed, sae_key, latent),
            random_scale=float(max_activation_F[latent]),
        )
        for latent in latents
    ]
    return targets, pool


def _split_instructions(
    targets: list[Target], pool: list[Instruction], judge: Judge, config: SteerConfig
) -> tuple[list[Target], dict[str, float]]:
    """Each target's dev/test instructions, none of which already holds its concept's
    evidence (:func:`instructions_without_echo`); a target with too few such instructions is
    dropped. Returns the kept targets and the counts (metrics)."""
    kept: list[Target] = []
    excluded_total = 0
    for target in targets:
        split, excluded = instructions_without_echo(
            target.key,
            target.concept,
            pool,
            config.n_instructions,
            target.genre,
            config.seed,
            judge,
        )
        excluded_total += excluded
        if split is None:
            log.warning(
                "%s dropped: %d of %d instructions already hold its concept %r",
                target.key,
                excluded,
                len(pool),
                target.concept,
            )
            continue
        target.split = split
        kept.append(target)
    if not kept:
        raise RuntimeError(
            f"every target's concept is already in all but fewer than n_instructions="
            f"{config.n_instructions} of the {len(pool)} instructions"
        )
    return kept, {
        "echo_excluded_instructions": float(excluded_total),
        "echo_dropped_targets": float(len(targets) - len(kept)),
    }


def _random_unit(d_model: int, seed: int, sae_key: str, latent: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{sae_key}:{latent}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    vector = torch.randn(d_model, generator=generator)
    return vector / vector.norm()


@dataclass
class _Prepared:
    """A version's steering set-up: its targets (latent table, selection, explanations and
    instruction splits done) and what the run logs beside the protocol's results."""

    job: ProtocolJob
    extra: dict[str, Any]
    echo: dict[str, float]
    explained: ExplainedPool | None
    setup_seconds: float
    trained: TrainedSetup | None = None


def _prepare(
    mv: ModelVersion,
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    judge: Judge,
    config: SteerConfig,
    concepts: list[Concept],
    pool: list[Instruction],
    *,
    force: bool = False,
) -> _Prepared:
    """Everything before generation for one SAE; the latent table is read from (or logged to)
    the version's ``latent_stats`` run."""
    started = time.perf_counter()
    stats, stats_run, _ = latent_stats_for_version(mv, sae, lm, layer, config.stats, force=force)
    max_F, freq_F = stats["max_activation"], stats["firing_frequency"]
    live = (freq_F > 0) & (max_F > 0)
    if not bool(live.any()):
        raise RuntimeError(f"no latent of {mv.name}/{mv.version} fired in the held-out scan")
    reference_scale = float(max_F[live].median())
    context = SelectionContext(sae, lm, layer, max_F, freq_F, config.seed)
    candidates = select(config.selection, context)
    explained: ExplainedPool | None = None
    if config.mode == "concept":
        targets = concept_targets(sae, lm, layer, concepts, candidates, max_F, config)
    else:
        sae_key = sae_identity(mv)
        targets, explained = _latent_targets(
            sae, lm, layer, candidates, max_F, judge, config, sae_key
        )
    targets, echo = _split_instructions(targets, pool, judge, config)
    trained = None
    steering_prompts = None
    if config.trained:
        # Asked once here: the training pairs and the prompting reference share them.
        steering_prompts = judge_steering_prompts(targets, judge)
        # After the splits: training instructions must avoid each concept's dev and test ones.
        trained = train_for_targets(
            targets,
            lm,
            judge,
            config,
            pool,
            steering_prompts,
            {c.concept: c.positives for c in concepts},
        )
    return _Prepared(
        ProtocolJob(targets, sae, config, reference_scale, steering_prompts),
        {"latent_stats_run_id": stats_run, "n_candidates": len(candidates)},
        echo,
        explained,
        time.perf_counter() - started,
        trained,
    )


def _finish(
    prepared: _Prepared, result: SteeringResult
) -> tuple[dict[str, float], dict[str, dict[str, list[Any]]], dict[str, Any]]:
    """(metrics, tables, extra params) of one SAE's run from its protocol result."""
    result.metrics.update(prepared.echo)
    result.metrics["setup_seconds"] = prepared.setup_seconds
    if prepared.trained is not None:
        result.metrics.update(prepared.trained.metrics)
        result.tables["training_pairs"] = prepared.trained.pairs_table()
    explained = prepared.explained
    if explained is not None:
        result.metrics.update(explained.metrics())
        # Per steered latent: how common its explanation's tokens are in ordinary text.
        table = result.tables["per_concept"]
        table["explanation_token_rates"] = [
            json.dumps(explained.token_rates.get(latent, {})) if latent >= 0 else ""
            for latent in table["latent"]
        ]
    return result.metrics, result.tables, prepared.extra


def _params(config: SteerConfig, judge_name: str) -> dict[str, str]:
    values = asdict(config)
    stats = values.pop("stats")
    params = {
        k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
        for k, v in values.items()
    }
    params.update({f"stats_{k}": str(v) for k, v in stats.items()})
    params["judge"] = judge_name
    return params


def steering_gain(score: float, none_score: float) -> float | None:
    """Percentage lift of a selection's steering score over the same SAE's ``selection=none``
    score (METHODS §3), ``100 · (score − none_score) / none_score``; None where no lift is
    defined: a zero (or NaN) baseline, or a NaN score. ``analysis/collect.py`` uses the same
    rule (NaN there)."""
    if math.isnan(score) or math.isnan(none_score) or none_score == 0:
        return None
    return 100.0 * (score - none_score) / none_score


def _log_gain(run_id: str, metrics: dict[str, float], baseline: SteerRunResult) -> float | None:
    """Log on ``run_id`` its steering gain over ``baseline`` (metric ``steering_gain``), the
    baseline's run id and whether the gain is defined (tags); returns the gain."""
    client = MlflowClient()
    score = metrics.get("steering_score", math.nan)
    none_score = baseline.metrics.get("steering_score", math.nan)
    gain = steering_gain(score, none_score)
    client.set_tag(run_id, GAIN_NONE_RUN_TAG, baseline.run_id)
    if not math.isnan(none_score):
        client.log_metric(run_id, "none_steering_score", none_score)
    # The baseline's lift score too, so that a gain by lift is taken over the same none run.
    none_lift = baseline.metrics.get("steering_score_lift", math.nan)
    if not math.isnan(none_lift):
        client.log_metric(run_id, "none_steering_score_lift", none_lift)
    if gain is None:
        why = (
            "the selection=none steering score is 0"
            if none_score == 0
            else "a steering score is missing (NaN)"
        )
        client.set_tag(run_id, GAIN_STATUS_TAG, f"undefined: {why}")
        log.warning("steering gain of run %s not logged: %s", run_id, why)
    else:
        client.set_tag(run_id, GAIN_STATUS_TAG, "logged")
        client.log_metric(run_id, GAIN_METRIC, gain)
    return gain


@dataclass
class _Site:
    """What every steer run on one LM shares: the judge (its name, options and object), the LM,
    the hook layer, the concepts and the instruction pool."""

    judge: str
    judge_options: dict[str, Any] | None
    judge_obj: Judge
    lm: LoadedLM
    layer: int
    concepts: list[Concept]
    pool: list[Instruction]


class SteeringFailed(PartialFailureError):
    """Some steer runs failed (exit code 3); ``results`` holds every outcome (``error`` set on
    the failed ones, which logged no run)."""

    def __init__(self, results: list[SteerRunResult]) -> None:
        self.results = results
        failed = [f"{r.model_uri}: {r.error}" for r in results if r.error]
        super().__init__(
            f"{len(failed)} steer run(s) failed: " + "; ".join(failed),
            [r.model_uri for r in results if r.error],
        )


def _digest(mv: ModelVersion, config: SteerConfig, site: _Site) -> str:
    identity = _judge_identity(site.judge_obj)
    return config_hash(
        f"{STEER_RUN_TYPE}:{config.mode}",
        asdict(config),
        json.dumps(
            {"judge": site.judge, "identity": identity, "options": site.judge_options or {}},
            sort_keys=True,
            default=str,
        ),
        mv,
    )


def _reused(
    mv: ModelVersion, config: SteerConfig, digest: str, baseline: SteerRunResult | None
) -> SteerRunResult | None:
    """The version's FINISHED run with this hash, as a result (with its gain over
    ``baseline`` brought up to date), or None."""
    existing = find_finished_run(mv, STEER_RUN_TYPE, digest)
    if existing is None:
        return None
    uri = version_uri(mv)
    run_id = existing.info.run_id
    log.info(
        "steer %s (selection %s) on %s: reusing FINISHED run %s (force=true recomputes)",
        config.mode,
        config.selection,
        uri,
        run_id,
    )
    set_version_tag(mv.name, mv.version, VERSION_LINK_TAG.format(mode=config.mode), run_id)
    metrics = dict(existing.data.metrics)
    result = SteerRunResult(uri, run_id, metrics, True)
    if baseline is not None:
        # A run from before the gain existed, or one whose baseline was recomputed since,
        # gets the gain over the current none run; an up-to-date one is left as it is.
        tags = existing.data.tags
        if tags.get(GAIN_NONE_RUN_TAG) != baseline.run_id or GAIN_STATUS_TAG not in tags:
            result.gain = _log_gain(run_id, metrics, baseline)
        else:
            result.gain = metrics.get(GAIN_METRIC)
        result.none_run_id = baseline.run_id
    return result


def _log_adapters(targets: list[Target]) -> None:
    """Each trained adapter as safetensors under ``adapters/<method>/<nn>-<concept>/`` of the
    active run, so a result can be generated again without training (``load_adapter``)."""
    if not any(t.adapters for t in targets):
        return
    with tempfile.TemporaryDirectory() as folder:
        for index, target in enumerate(targets):
            slug = re.sub(r"[^a-z0-9]+", "-", target.concept.lower()).strip("-")[:40]
            for method, adapter in target.adapters.items():
                save_adapter(adapter, Path(folder) / method / f"{index:02d}-{slug}")
        mlflow.log_artifacts(folder, "adapters")


def _log_run(
    mv: ModelVersion,
    config: SteerConfig,
    digest: str,
    site: _Site,
    prepared: _Prepared,
    result: SteeringResult,
    baseline: SteerRunResult | None,
) -> SteerRunResult:
    """One version's steer run: params, metrics, tables and judge record in one MLflow run
    (nested under the caller's), the version's link tag, and the gain over ``baseline``."""
    uri = version_uri(mv)
    identity = _judge_identity(site.judge_obj)
    tags = run_tags(mv, STEER_RUN_TYPE, digest)
    tags.update(
        {
            RUN_TYPE_TAG: STEER_RUN_TYPE,
            "steer_mode": config.mode,
            "selection": config.selection,
            "judge": site.judge,
            # What makes two judges' ratings comparable (kind, model, endpoint, rule version):
            # the analysis groups runs by it.
            "judge_identity": json.dumps(identity, sort_keys=True, default=str),
        }
    )
    metrics, tables, extra = _finish(prepared, result)
    # This run's share of the batched stages plus its own set-up.
    seconds = (
        prepared.setup_seconds
        + metrics.get("generation_seconds", 0.0)
        + metrics.get("judge_seconds", 0.0)
        + metrics.get("floor_seconds", 0.0)
    )
    with mlflow.start_run(
        run_name=f"steer-{config.mode}-{config.selection}-{mv.name}-v{mv.version}",
        nested=mlflow.active_run() is not None,
        tags=tags,
    ) as run:
        mlflow.log_params(_params(config, site.judge))
        mlflow.log_dict(asdict(config), "steer_config.json")
        mlflow.log_params({k: str(v) for k, v in extra.items()})
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        mlflow.log_metrics(finite)
        for name, table in tables.items():
            mlflow.log_table(table, f"tables/{name}.json")
        _log_adapters(prepared.job.targets)
        # How far to trust this judge: its measured agreement with careful reading
        # (bench/judge_agreement.py), where it was measured.
        agreement = measured_agreement(identity)
        mlflow.set_tag("judge_agreement", "measured" if agreement else "not measured")
        if agreement:
            mlflow.log_metrics(
                {
                    f"judge_{key}": float(value)
                    for key, value in agreement.items()
                    if key.endswith(("_kappa", "_spearman"))
                }
            )
        judge_obj = site.judge_obj
        mlflow.log_dict(
            {
                "identity": identity,
                "agreement": agreement,
                "describe": judge_obj.describe(),
                "options": site.judge_options or {},
                "parse_failures": judge_obj.parse_failures,
                "failure_log": judge_obj.failure_log,
            },
            "judge.json",
        )
        gain = None
        if baseline is not None:
            gain = _log_gain(run.info.run_id, metrics, baseline)
        mlflow.log_metric("steer_seconds", seconds)
    set_version_tag(mv.name, mv.version, VERSION_LINK_TAG.format(mode=config.mode), run.info.run_id)
    log.info(
        "steer %s (selection %s) on %s finished in %.1fs (run %s)",
        config.mode,
        config.selection,
        uri,
        seconds,
        run.info.run_id,
    )
    out = SteerRunResult(uri, run.info.run_id, metrics, False, seconds)
    if baseline is not None:
        out.gain, out.none_run_id = gain, baseline.run_id
    return out


def _steer_batch(
    versions: list[ModelVersion],
    config: SteerConfig,
    sites: dict[str, _Site],
    site_of: dict[str, str],
    *,
    force: bool,
    baselines: dict[str, SteerRunResult] | None = None,
) -> list[SteerRunResult]:
    """One steer run per version for ``config`` (reused by hash unless ``force``), the new
    ones staged together: every version's set-up, then one batched generation and one judge
    call per LM site for all of them (:func:`run_protocols`), then each run logged. With
    ``baselines`` (a version's ``selection=none`` run by URI) each run gets its steering gain.
    A version whose set-up fails gets ``error`` and no run; the others go on. Versions are
    staged :data:`STAGED_VERSIONS` at a time: each holds its SAE until its run is logged."""
    if len(versions) > STAGED_VERSIONS:
        return [
            result
            for start in range(0, len(versions), STAGED_VERSIONS)
            for result in _steer_batch(
                versions[start : start + STAGED_VERSIONS],
                config,
                sites,
                site_of,
                force=force,
                baselines=baselines,
            )
        ]
    baselines = baselines or {}
    results: dict[str, SteerRunResult] = {}
    todo: dict[str, list[tuple[ModelVersion, str, _Prepared]]] = {}
    for mv in versions:
        uri = version_uri(mv)
        site = sites[site_of[uri]]
        digest = _digest(mv, config, site)
        reused = None if force else _reused(mv, config, digest, baselines.get(uri))
        if reused is not None:
            results[uri] = reused
            continue
        try:
            sae = load_version(mv)
            prepared = _prepare(
                mv,
                sae,
                site.lm,
                site.layer,
                site.judge_obj,
                config,
                site.concepts,
                site.pool,
                force=force,
            )
        except Exception as err:  # noqa: BLE001 - this version fails, the others go on
            log.exception("steering %s (selection %s): set-up failed", uri, config.selection)
            results[uri] = SteerRunResult(uri, "", error=f"{type(err).__name__}: {err}")
            continue
        todo.setdefault(site_of[uri], []).append((mv, digest, prepared))
    for site_name, members in todo.items():
        site = sites[site_name]
        outcomes = run_protocols(
            [prepared.job for _, _, prepared in members], site.lm, site.layer, site.judge_obj
        )
        for (mv, digest, prepared), outcome in zip(members, outcomes, strict=True):
            uri = version_uri(mv)
            results[uri] = _log_run(mv, config, digest, site, prepared, outcome, baselines.get(uri))
    return [results[version_uri(mv)] for mv in versions]


def steer(
    model_uri: str | list[str],
    config: SteerConfig | None = None,
    judge: str = "offline",
    *,
    judge_options: dict[str, Any] | None = None,
    force: bool = False,
    lms: dict[str, LoadedLM] | None = None,
    judges: dict[str, Judge] | None = None,
) -> list[SteerRunResult]:
    """Steer every version ``model_uri`` names (one URI or a list); one MLflow run per
    version (reused by hash).

    The new runs are staged together: each version's set-up, then the generations of all of
    them on one LM and layer in shared batches and their ratings in one judge call, then each
    run logged. A run's numbers are those it would get alone (per-prompt sampling seeds).

    With a selection other than ``none``, each version's ``selection=none`` run with the same
    config otherwise (mode, concepts, factors, instructions, judge, seed, ...) is found, or
    computed first (all versions' together) as a run of its own, and the selection's run logs
    its steering gain over it (:func:`steering_gain`). ``force`` recomputes the runs asked
    for, not that baseline. Returns the asked-for runs only (their ``none_run_id`` names the
    baseline).

    ``lms`` and ``judges`` (by LM name; a judge built here is added to ``judges``) let a
    caller that steers many runs load each LM and build each judge once: the offline judge
    keeps its embeddings and fluency NLLs between runs.

    Raises:
        ValueError: bad input (URI, LM, config, judge, concept or instruction files), before
            any generation.
        SteeringFailed: after every version was tried, if any failed (``results`` holds all).
    """
    config = config or SteerConfig()
    if judge not in JUDGE_NAMES:
        raise ValueError(f"unknown judge {judge!r}; valid: {', '.join(JUDGE_NAMES)}")
    pool = load_instructions(config.instructions)
    if len(pool) < config.n_instructions:
        raise ValueError(
            f"n_instructions={config.n_instructions} but the instruction pool has {len(pool)}"
        )
    concepts = (
        load_concepts(config.concepts, config.n_concepts, config.n_examples, config.seed)
        if config.mode == "concept"
        else []
    )
    uris = [model_uri] if isinstance(model_uri, str) else list(model_uri)
    if not uris:
        raise ValueError("no model URI given")
    versions = [mv for uri in uris for mv in resolve_versions(uri)]
    versions = list({(mv.name, mv.version): mv for mv in versions}.values())
    site_layers, lms = load_sites(
        versions, lms, dtype=lm_dtype(config.lm_dtype), device=resolved_device(config.device)
    )
    for method in config.trained:
        for lm in lms.values():
            check_layers(trained_config(config, method), lm.n_layers)
    judges = judges if judges is not None else {}
    for name, lm in lms.items():
        judge_for(judges, name, judge, lm=lm, **(judge_options or {}))
    sites: dict[str, _Site] = {}
    site_of: dict[str, str] = {}  # version URI -> its site
    for uri, (lm_name, layer) in site_layers.items():
        key = f"{lm_name}@{layer}"
        site_of[uri] = key
        if key not in sites:
            sites[key] = _Site(
                judge, judge_options, judges[lm_name], lms[lm_name], layer, concepts, pool
            )

    launcher = os.environ.get("MLFLOW_RUN_ID")
    with parent_run():
        active = mlflow.active_run()
        if launcher and active is not None and active.info.run_id == launcher:
            mlflow.set_tag(RUN_TYPE_TAG, BATCH_RUN_TYPE)  # the `mlflow run` launcher run
        baselines: dict[str, SteerRunResult] = {}
        if config.selection != NO_SELECTION:
            none_runs = _steer_batch(
                versions, replace(config, selection=NO_SELECTION), sites, site_of, force=False
            )
            baselines = {r.model_uri: r for r in none_runs if not r.error}
            failed = {r.model_uri: r for r in none_runs if r.error}
        else:
            failed = {}
        ready = [mv for mv in versions if version_uri(mv) not in failed]
        batch = _steer_batch(ready, config, sites, site_of, force=force, baselines=baselines)
    by_uri = {r.model_uri: r for r in batch}
    results = []
    for mv in versions:
        uri = version_uri(mv)
        if uri in failed:
            error = f"its selection=none baseline failed: {failed[uri].error}"
            results.append(SteerRunResult(uri, "", error=error))
        else:
            results.append(by_uri[uri])
    if any(r.error for r in results):
        raise SteeringFailed(results)
    return results


def pooled_lift(run_ids: list[str], seed: int = 0) -> dict[str, float]:
    """The steering evidence of several steer runs pooled over their targets: the mean
    per-target test score by the paper's rule and by concept lift (each target at its own α*),
    a bootstrap interval of each over all targets of all runs, and the share of targets whose
    concept the unsteered answers already carry. Where the runs steered the random floor
    (``random_floor``), also its lift score and the SAE's lead over it, paired by target:
    lift that a random push of the same norm also earns is no evidence of the latent. Per SAE
    there are only a few targets; pooled over a study's SAEs, the lift interval says whether
    steering was measured at all.

    The same for the concept rating alone (``concept_lift``: the test concept rating at α* by
    lift minus the unsteered one, floored at 0): whether the latent wrote its concept into the
    text at all, whatever became of the answer. A latent can steer (concept lift above the
    floor's) while the score, which also needs the answer on topic and fluent, shows nothing."""
    from project.statistics import bootstrap_interval

    scores: list[float] = []
    lifts: list[float] = []
    free: list[float] = []
    floor_lifts: list[float] = []
    over_floor: list[float] = []  # per target with a floor: SAE lift − floor lift
    concept: list[float] = []
    floor_concept: list[float] = []
    concept_over_floor: list[float] = []
    for run_id in run_ids:
        table = mlflow.load_table("tables/per_concept.json", run_ids=[run_id])
        sae = table[table["method"] == "sae"]
        if "test_score_lift" not in sae:
            raise ValueError(f"steer run {run_id} logged no concept lift (run before issue 18)")
        scores += sae["test_score"].astype(float).tolist()
        lifts += sae["test_score_lift"].astype(float).tolist()
        free += (sae["unsteered_concept"].astype(float) > 0).astype(float).tolist()
        sae_concept = sae["test_concept_lift"].astype(float).tolist()
        concept += sae_concept
        # The random direction at the latent's norm and α* (random_floor), in target order.
        floor = table[table["method"] == "random"]
        if len(floor) == len(sae):
            floor_values = floor["test_score_lift"].astype(float).tolist()
            floor_lifts += floor_values
            over_floor += [
                a - b
                for a, b in zip(sae["test_score_lift"].astype(float), floor_values, strict=True)
            ]
            floor_concept_values = floor["test_concept_lift"].astype(float).tolist()
            floor_concept += floor_concept_values
            concept_over_floor += [
                a - b for a, b in zip(sae_concept, floor_concept_values, strict=True)
            ]
    out = {"pooled_n_targets": float(len(lifts)), "pooled_n_runs": float(len(run_ids))}
    pooled = [
        ("steering_score", scores),
        ("steering_score_lift", lifts),
        ("concept_lift", concept),
    ]
    if over_floor:
        pooled += [
            ("random_steering_score_lift", floor_lifts),
            ("steering_score_lift_minus_random", over_floor),
            ("random_concept_lift", floor_concept),
            ("concept_lift_minus_random", concept_over_floor),
        ]
        out["pooled_n_floor_targets"] = float(len(over_floor))
    for name, values in pooled:
        finite = [v for v in values if not math.isnan(v)]
        low, high = bootstrap_interval(finite, seed)
        out[f"pooled_{name}"] = float(sum(finite) / len(finite)) if finite else math.nan
        out[f"pooled_{name}_ci_low"], out[f"pooled_{name}_ci_high"] = low, high
    out["pooled_free_concept_share"] = float(sum(free) / len(free)) if free else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# command line


def _print_results(results: list[SteerRunResult], config: SteerConfig) -> None:
    """One line per run: its state, scores and, for a selection, its gain over none."""
    for r in results:
        state = "reused" if r.reused else f"finished in {r.seconds:.0f}s"
        m = r.metrics
        line = (
            f"steer {config.mode} {r.model_uri}: {state}, run {r.run_id}, steering_score "
            f"{m.get('steering_score', math.nan):.3f} (by concept lift "
            f"{m.get('steering_score_lift', math.nan):.3f}; concept free unsteered on "
            f"{m.get('free_concept_share', math.nan):.0%} of targets)"
        )
        for ref in ("diffmean", "random", "prompt", "unsteered"):
            if f"{ref}_steering_score" in m:
                line += f", {ref} {m[f'{ref}_steering_score']:.3f}"
        for method in ("sae", "diffmean", "prompt"):
            lead = f"{method}_minus_random_concept"
            if lead in m:
                line += (
                    f"; {method} − random concept {m[lead]:+.3f} "
                    f"[{m[f'{lead}_ci_low']:+.3f}, {m[f'{lead}_ci_high']:+.3f}]"
                )
        if r.none_run_id is not None:
            gain = "undefined (tag steering_gain_status)" if r.gain is None else f"{r.gain:+.1f}%"
            line += f", gain over none {gain} (run {r.none_run_id})"
        print(line)


def parse_supervised_k(text: str) -> tuple[int, ...]:
    """``none`` (or empty) for no supervised method, else comma-separated K's."""
    return parse_optional_list(text, int, "supervised_k", "integer")


def parse_trained(text: str) -> tuple[str, ...]:
    """``none`` (or empty) for no trained method, else comma-separated method names."""
    return parse_optional_list(text, str, "trained", "method name (lora, loreft)")


def main() -> None:
    defaults = SteerConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--mode", default=defaults.mode)
    parser.add_argument("--selection", default=defaults.selection)
    parser.add_argument("--judge", default="offline")
    parser.add_argument("--intervention", default=defaults.intervention)
    parser.add_argument("--n_concepts", type=parse_int, default=defaults.n_concepts)
    parser.add_argument("--factors", default=",".join(map(str, defaults.factors)))
    parser.add_argument("--n_instructions", type=parse_int, default=defaults.n_instructions)
    parser.add_argument("--max_new_tokens", type=parse_int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=parse_int, default=defaults.seed)
    parser.add_argument("--batch_size", type=parse_int, default=defaults.batch_size)
    parser.add_argument("--concepts", default=defaults.concepts)
    parser.add_argument("--instructions", default=defaults.instructions)
    parser.add_argument("--n_examples", type=parse_int, default=defaults.n_examples)
    parser.add_argument("--explain_pool", type=parse_int, default=defaults.explain_pool)
    parser.add_argument("--random_floor", type=parse_bool, default=defaults.random_floor)
    parser.add_argument("--stats_n_tokens", type=parse_int, default=defaults.stats.n_tokens)
    parser.add_argument(
        "--trained",
        default="none",
        help="concept mode: trained reference methods, comma-separated lora,loreft (none: off)",
    )
    parser.add_argument("--trained_pairs", type=parse_int, default=defaults.trained_pairs)
    parser.add_argument("--trained_min_pairs", type=parse_int, default=defaults.trained_min_pairs)
    parser.add_argument("--trained_epochs", type=parse_int, default=defaults.trained_epochs)
    parser.add_argument("--trained_lr", type=float, default=defaults.trained_lr)
    parser.add_argument(
        "--trained_layers", default="auto", help="blocks the trained methods adapt (auto: four)"
    )
    parser.add_argument(
        "--trained_response_tokens", type=parse_int, default=defaults.trained_response_tokens
    )
    parser.add_argument(
        "--supervised_k",
        default="none",
        help="concept mode: comma-separated K's for supervised select-and-label (none: off)",
    )
    parser.add_argument("--lm_dtype", default=defaults.lm_dtype, help="float32 or bfloat16")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or auto")
    parser.add_argument(
        "--compile", type=parse_bool, default=False, help="torch.compile the LM's generation"
    )
    parser.add_argument("--force", type=parse_bool, default=False)
    args, extra = parser.parse_known_args()
    config = SteerConfig(
        mode=args.mode,
        selection=args.selection,
        intervention=args.intervention,
        n_concepts=args.n_concepts,
        factors=parse_factors(args.factors),
        n_instructions=args.n_instructions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        concepts=args.concepts,
        instructions=args.instructions,
        n_examples=args.n_examples,
        explain_pool=args.explain_pool,
        random_floor=args.random_floor,
        stats=replace(LatentStatsConfig(), n_tokens=args.stats_n_tokens),
        supervised_k=parse_supervised_k(args.supervised_k),
        trained=parse_trained(args.trained),
        trained_pairs=args.trained_pairs,
        trained_min_pairs=args.trained_min_pairs,
        trained_epochs=args.trained_epochs,
        trained_lr=args.trained_lr,
        trained_response_tokens=args.trained_response_tokens,
        trained_layers=parse_optional_list(
            args.trained_layers, int, "trained_layers", "integer", off="auto"
        ),
        lm_dtype=args.lm_dtype,
        device=args.device,
        compile=args.compile,
    )
    judge_options = parse_prefixed_options(extra)
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    started = time.perf_counter()
    try:
        results = steer(
            args.model_uri, config, args.judge, judge_options=judge_options, force=args.force
        )
    except SteeringFailed as failed:
        _print_results([r for r in failed.results if not r.error], config)
        for r in failed.results:
            if r.error:
                print(f"steer {config.mode} {r.model_uri}: FAILED ({r.error})")
        raise
    _print_results(results, config)
    print(f"total {time.perf_counter() - started:.0f}s; browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
