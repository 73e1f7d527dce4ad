"""Entry point ``evaluate``: SAEBench-style evaluations of registered SAEs, one MLflow run each.

    mlflow run . -e evaluate --env-manager local -P model_uri=models:/NAME \\
        -P evals=core,sparse_probing,absorption,autointerp -P judge=offline

``model_uri`` is ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``models:/NAME`` (every
version). Each (model version, eval) gets one run tagged ``saeflow.run_type=eval``, ``eval``,
``registered_model``, ``model_version``, ``model_uri``, ``training_run_id``, the version's
own tags (its LM's name as ``lm_name``; vocabulary in project/tracking.py) and ``eval_config_hash``; its params are the eval
config, its metrics the eval's (SAEBench names), and its artifact the SAEBench-schema document
``<eval>_eval_results.json``. The version gets a tag ``eval.<eval>.run_id`` pointing at it.

A (version, eval, config) that already has a FINISHED run is reported, not recomputed, unless
``force=true``. The config hash that decides this covers the eval's whole config, the judge's
identity (kind, model, endpoint, temperature, calibration), the LM's weights
(``project.lm.lm_fingerprint``) and saeflow's code (``saeflow_version``: the package version
plus a hash of the source of the ``evaluation`` and ``project`` packages, so fixing an eval,
committed or not, recomputes its results, while a change to the README or the training entry
points does not). Everything that can be wrong with the input (eval names, the URI, the LM, eval
configs, the judge) fails before any evaluation runs; an eval that fails later marks only its
own run FAILED, the others go on, and the process exits non-zero at the end.

Eval config fields can be overridden on the command line as ``--<eval>.<field> VALUE``
(``-P core.n_tokens=8192`` through ``mlflow run``); ``k_values``-like tuple fields take
comma-separated values. Judge options likewise: ``-P judge.model=NAME`` (``hf`` needs one: a judge
never silently grades with the evaluated LM), ``-P judge.temperature=0.7``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from evaluation.interpretability.schema import EvalOutput, sae_bench_document
from project.cli import config_from_overrides, parse_bool, run_entry_point
from project.hook_cache import HookCache, default_hook_cache_dir
from project.lm import LoadedLM, lm_fingerprint
from project.registry import load_sae
from project.runs import (
    EVAL_LINK_TAG,
    config_hash,
    find_existing_run,
    judge_identity,
    load_sites,
    parent_run,
    resolve_versions,
    run_tags,
    saeflow_version,
    version_uri,
)
from project.saes import SparseAutoencoder
from project.tracking import (
    DEFAULT_EXPERIMENT,
    configure_tracking,
    set_version_tag,
    ui_hint,
)

log = logging.getLogger(__name__)

# Command-line overrides ``--judge.<option> VALUE`` set the judge's options, not an eval's.
JUDGE_OPTIONS_PREFIX = "judge"


@dataclass(frozen=True)
class EvalSpec:
    """Where an eval lives; imported only when used, so a missing module fails only its name."""

    module: str
    config_class: str
    uses_hook_cache: bool = False
    uses_judge: bool = False

    def load(self) -> tuple[type, Callable[..., EvalOutput]]:
        """(config class, compute); ValueError if the module cannot be imported."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise ValueError(f"eval module {self.module} cannot be imported: {err}") from err
        return getattr(module, self.config_class), module.compute

    def eval_type_id(self, name: str) -> str:
        """SAEBench's ``eval_type_id`` (the module's ``EVAL_TYPE_ID``, else the eval's name)."""
        return str(getattr(importlib.import_module(self.module), "EVAL_TYPE_ID", name))


EVALS: dict[str, EvalSpec] = {
    "core": EvalSpec("evaluation.interpretability.core", "CoreConfig", uses_hook_cache=True),
    "sparse_probing": EvalSpec(
        "evaluation.interpretability.sparse_probing", "SparseProbingConfig", uses_hook_cache=True
    ),
    "absorption": EvalSpec("evaluation.interpretability.absorption", "AbsorptionConfig"),
    "autointerp": EvalSpec(
        "evaluation.interpretability.autointerp", "AutointerpConfig", uses_judge=True
    ),
}


def eval_registry() -> dict[str, tuple[type, Callable[..., EvalOutput]]]:
    """name → (config class, compute) for every eval whose module imports."""
    registry = {}
    for name, spec in EVALS.items():
        try:
            registry[name] = spec.load()
        except ValueError as err:
            log.warning("eval %s is unavailable: %s", name, err)
    return registry


@dataclass
class EvalRunResult:
    """What happened to one (model version, eval)."""

    model_uri: str  # models:/NAME/VERSION
    eval_name: str
    status: str  # "FINISHED" or "FAILED"
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"


class EvaluationFailed(RuntimeError):
    """Some evals failed (their runs are FAILED); ``results`` holds every outcome."""

    def __init__(self, results: list[EvalRunResult]) -> None:
        self.results = results
        failed = [f"{r.eval_name} on {r.model_uri}: {r.error}" for r in results if not r.ok]
        super().__init__(f"{len(failed)} evaluation(s) failed: " + "; ".join(failed))


# ---------------------------------------------------------------------------------------------
# input resolution (everything here runs before any evaluation)


def parse_evals(evals: list[str] | str) -> list[str]:
    """Eval names in order, deduplicated; ValueError naming unknown ones and the valid ones."""
    names = [e.strip() for e in evals.split(",")] if isinstance(evals, str) else list(evals)
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in EVALS]
    if unknown or not names:
        raise ValueError(
            f"unknown eval name(s) {unknown or names}; valid evals: {', '.join(EVALS)}"
        )
    return names


# ---------------------------------------------------------------------------------------------
# runs


def _params(config: Any, judge: str | None) -> dict[str, str]:
    values = asdict(config) if is_dataclass(config) else dict(config)
    params = {
        k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
        for k, v in values.items()
    }
    if judge is not None:
        params["judge"] = judge
    return params


def _sae_lens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _log_eval_run(
    name: str,
    spec: EvalSpec,
    compute: Callable[..., EvalOutput],
    config: Any,
    mv: ModelVersion,
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    judge_name: str | None,
    judge: Any,
    hook_cache: HookCache,
    digest: str,
    started_runs: list[str],
    provenance: dict[str, str],
) -> EvalRunResult:
    uri = version_uri(mv)
    started = time.perf_counter()
    with mlflow.start_run(
        run_name=f"{name}-{mv.name}-v{mv.version}",
        nested=mlflow.active_run() is not None,
        tags={**run_tags(mv, name, digest), **provenance},
    ) as run:
        started_runs.append(run.info.run_id)
        mlflow.log_params(_params(config, judge_name))
        if spec.uses_judge:
            output = compute(sae, lm, layer, config, judge)
        elif spec.uses_hook_cache:
            output = compute(sae, lm, layer, config, hook_cache=hook_cache)
        else:
            output = compute(sae, lm, layer, config)
        metrics = output.flat_metrics()
        mlflow.log_metrics(metrics)
        document = sae_bench_document(
            spec.eval_type_id(name),
            config,
            output,
            sae_cfg_dict=sae.saelens_cfg(),
            registry_uri=uri,
            sae_lens_version=_sae_lens_version(),
        )
        mlflow.log_dict(document, f"{name}_eval_results.json")
        for table_name, table in output.tables.items():
            mlflow.log_table(table, f"tables/{table_name}.json")
        seconds = time.perf_counter() - started
        mlflow.set_tag("eval_seconds", f"{seconds:.1f}")
    set_version_tag(mv.name, mv.version, EVAL_LINK_TAG.format(name=name), run.info.run_id)
    log.info("%s on %s finished in %.1fs (run %s)", name, uri, seconds, run.info.run_id)
    return EvalRunResult(uri, name, "FINISHED", run.info.run_id, metrics, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# public API


def evaluate(
    model_uri: str,
    evals: list[str],
    judge: str = "offline",
    force: bool = False,
    *,
    configs: dict[str, Any] | None = None,
    hook_cache: HookCache | None = None,
    lms: dict[str, LoadedLM] | None = None,
    judge_options: dict[str, Any] | None = None,
) -> list[EvalRunResult]:
    """Evaluate every version ``model_uri`` names with each eval; one MLflow run per pair.

    Args:
        model_uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``models:/NAME``.
        evals: eval names (keys of ``EVALS``).
        judge: judge for evals that use one (autointerp): "offline", "hf" or "openai".
        force: recompute even where a FINISHED run with the same config exists.
        configs: eval name → config instance (default: each eval's default config).
        hook_cache: shared hook activations (default: in memory and under
            ``$SAEFLOW_CACHE_DIR/hook_activations``).
        lms: already loaded LMs by name (as in the versions' ``lm_name`` tag).
        judge_options: the judge's settings (``model``, ``base_url``, ``temperature``, ...;
            ``-P judge.model=NAME`` on the command line). ``hf`` needs ``model``.

    Raises:
        ValueError: bad input (eval names, URI, LM, configs, judge), before any run starts.
        EvaluationFailed: after every eval was tried, if any failed (its run is FAILED).
    """
    names = parse_evals(evals)
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise ValueError(f"configs given for evals not requested: {unknown}")
    loaded = {name: EVALS[name].load() for name in names}
    for name, (config_cls, _) in loaded.items():
        config = configs.setdefault(name, config_cls())
        if not isinstance(config, config_cls):
            raise ValueError(f"config for {name} must be a {config_cls.__name__}")
        if callable(getattr(config, "validate", None)):
            config.validate()
    versions = resolve_versions(model_uri)
    sites, lms = load_sites(versions, lms)
    judges: dict[str, Any] = {}
    if any(EVALS[n].uses_judge for n in names):
        try:
            from project.judges import build_judge
        except ImportError as err:
            raise ValueError(f"judge {judge!r} needs project.judges: {err}") from err
        for lm_name, lm in lms.items():
            judges[lm_name] = build_judge(judge, lm=lm, **(judge_options or {}))
    hook_cache = hook_cache if hook_cache is not None else HookCache(default_hook_cache_dir())
    # Part of every reuse hash: other weights under the same LM name are another evaluation.
    fingerprints = {lm_name: lm_fingerprint(lm) for lm_name, lm in lms.items()}

    results: list[EvalRunResult] = []
    with parent_run():
        for mv in versions:
            results.extend(
                _evaluate_version(
                    mv,
                    names,
                    loaded,
                    configs,
                    sites,
                    lms,
                    judge,
                    judges,
                    force,
                    hook_cache,
                    fingerprints,
                )
            )
    if any(not r.ok for r in results):
        raise EvaluationFailed(results)
    return results


def _evaluate_version(
    mv: ModelVersion,
    names: list[str],
    loaded: dict[str, tuple[type, Callable[..., EvalOutput]]],
    configs: dict[str, Any],
    sites: dict[str, tuple[str, int]],
    lms: dict[str, LoadedLM],
    judge_name: str,
    judges: dict[str, Any],
    force: bool,
    hook_cache: HookCache,
    fingerprints: dict[str, str],
) -> list[EvalRunResult]:
    uri = version_uri(mv)
    lm_name, layer = sites[version_uri(mv)]
    results = []
    sae: SparseAutoencoder | None = None
    for name in names:
        spec = EVALS[name]
        judge_used = judge_name if spec.uses_judge else None
        # The judge object's identity (model, endpoint, ...), not just its kind.
        identity = judge_identity(judges.get(lm_name, judge_used)) if spec.uses_judge else None
        digest = config_hash(
            name, configs[name], identity, mv, lm_fingerprint=fingerprints[lm_name]
        )
        provenance = {"saeflow_version": saeflow_version(), "lm_fingerprint": fingerprints[lm_name]}
        if identity is not None:
            provenance["judge_identity"] = json.dumps(identity, sort_keys=True)
        existing = None if force else find_existing_run(mv, name, digest)
        if existing is not None:
            run_id = existing.info.run_id
            log.info("%s on %s: reusing FINISHED run %s (force=true recomputes)", name, uri, run_id)
            set_version_tag(mv.name, mv.version, EVAL_LINK_TAG.format(name=name), run_id)
            results.append(
                EvalRunResult(uri, name, "FINISHED", run_id, dict(existing.data.metrics), True)
            )
            continue
        started = time.perf_counter()
        started_runs: list[str] = []
        try:
            if sae is None:
                sae = load_sae(uri)
            results.append(
                _log_eval_run(
                    name,
                    spec,
                    loaded[name][1],
                    configs[name],
                    mv,
                    sae,
                    lms[lm_name],
                    layer,
                    judge_used,
                    judges.get(lm_name),
                    hook_cache,
                    digest,
                    started_runs,
                    provenance,
                )
            )
        except Exception as err:  # noqa: BLE001 - this eval's run is FAILED; the others go on
            log.exception("%s on %s failed", name, uri)
            results.append(
                EvalRunResult(
                    uri,
                    name,
                    "FAILED",
                    started_runs[0] if started_runs else None,
                    error=f"{type(err).__name__}: {err}",
                    seconds=time.perf_counter() - started,
                )
            )
    return results


# ---------------------------------------------------------------------------------------------
# command line


def _overrides(extra: list[str]) -> dict[str, dict[str, str]]:
    """``--eval.field VALUE`` / ``--eval.field=VALUE`` pairs, by eval."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(
                f"unexpected argument {arg!r}; eval config overrides look like --core.n_tokens 8192"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise ValueError(f"{arg} needs a value")
            value = extra[i + 1]
            i += 1
        eval_name, _, field_name = key.partition(".")
        if eval_name not in EVALS and eval_name != JUDGE_OPTIONS_PREFIX:
            raise ValueError(
                f"override {arg!r} names unknown eval {eval_name!r}; valid: {', '.join(EVALS)} "
                f"(or {JUDGE_OPTIONS_PREFIX}.<option> for the judge)"
            )
        out.setdefault(eval_name, {})[field_name] = value
        i += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--evals", default="core,sparse_probing,absorption,autointerp")
    parser.add_argument("--judge", default="offline")
    parser.add_argument("--force", type=parse_bool, default=False)
    args, extra = parser.parse_known_args()
    names = parse_evals(args.evals)
    overrides = _overrides(extra)
    judge_options = overrides.pop(JUDGE_OPTIONS_PREFIX, {})
    not_requested = sorted(set(overrides) - set(names))
    if not_requested:
        raise ValueError(f"config overrides given for evals not requested: {not_requested}")
    configs = {
        name: config_from_overrides(EVALS[name].load()[0], values, name)
        for name, values in overrides.items()
    }
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    try:
        results = evaluate(
            args.model_uri,
            names,
            args.judge,
            args.force,
            configs=configs,
            judge_options=judge_options,
        )
    except EvaluationFailed as failed:
        _print_results(failed.results, tracking_uri)
        raise
    _print_results(results, tracking_uri)


# The metrics of each eval that the summary table shows (all are logged in the runs). A metric
# with a logged interval (<metric>_ci_low / _ci_high) shows it beside the value; autointerp's
# score stands beside its floor, the score of a judge that always gives the same answer.
SUMMARY_METRICS = (
    ("core", "explained_variance", "EV"),
    ("core", "ce_loss_score", "CE score"),
    ("sparse_probing", "sae_top_1_test_accuracy", "probe top-1"),
    ("absorption", "mean_absorption_fraction_score", "absorption"),
    ("absorption", "mean_main_latents_test_f1", "letter F1"),
    ("autointerp", "autointerp_score", "autointerp"),
    ("autointerp", "constant_answer_score", "floor"),
    ("autointerp", "autointerp_balanced_accuracy", "balanced acc"),
)
SUMMARY_NOTE = (
    "[low, high]: 95% bootstrap interval (over probing tasks, letters or latents); "
    "floor: the autointerp score of a judge that always answers the same; "
    "balanced acc: autointerp with that floor at 0.5"
)


def _cell(row: dict[str, float], key: str) -> str:
    value = row.get(key)
    if value is None or value != value:  # missing, or NaN
        return "-"
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None or low != low or high != high:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def summary_table(results: list[EvalRunResult]) -> list[str]:
    """One line per model version: its architecture and L0 target (or that it is a random
    control) and the headline metrics of each eval that ran, with their intervals where logged;
    a last line says what the brackets and the floor are when any is shown."""
    by_version: dict[str, dict[str, float]] = {}
    for r in results:
        row = by_version.setdefault(r.model_uri, {})
        row.update({f"{r.eval_name}:{k}": v for k, v in r.metrics.items()})
    columns: list[tuple[str, str]] = []
    for eval_name, metric, title in SUMMARY_METRICS:
        key = f"{eval_name}:{metric}"
        if any(key in row for row in by_version.values()):
            columns.append((key, title))
    client = MlflowClient()
    cells = {uri: [_cell(row, key) for key, _ in columns] for uri, row in by_version.items()}
    widths = [
        max(len(title), *(len(c[i]) for c in cells.values()))
        for i, (_, title) in enumerate(columns)
    ]
    width = max(len("version"), *(len(uri) for uri in by_version))
    header = f"{'version':<{width}} {'SAE':<22}"
    lines = [header + "".join(f"  {t:>{w}}" for (_, t), w in zip(columns, widths, strict=True))]
    for uri in by_version:
        name, version = uri.removeprefix("models:/").rsplit("/", 1)
        tags = client.get_model_version(name, version).tags
        kind = f"{tags.get('architecture', '?')} L0 {tags.get('target_l0', '?')}"
        if tags.get("baseline"):
            kind += f" ({tags['baseline']})"
        row = "".join(f"  {c:>{w}}" for c, w in zip(cells[uri], widths, strict=True))
        lines.append(f"{uri:<{width}} {kind:<22}{row}")
    if any("[" in c for row in cells.values() for c in row) or any(
        key.endswith("constant_answer_score") for key, _ in columns
    ):
        lines.append(SUMMARY_NOTE)
    return lines


def _print_results(results: list[EvalRunResult], tracking_uri: str) -> None:
    for r in results:
        state = "reused" if r.reused else r.status.lower()
        where = f"run {r.run_id}" if r.run_id else "no run"
        print(
            f"{r.eval_name:>15} {r.model_uri}: {state}, {where}"
            + (f" ({r.error})" if r.error else "")
        )
    try:
        print("\n".join(summary_table(results)))
    except Exception as err:  # noqa: BLE001 - the runs are logged; a summary is a convenience
        log.warning("no summary table: %s", err)
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
