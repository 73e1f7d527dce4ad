"""Runs about a registered version: resolving model URIs, the reuse hash and finding a
FINISHED run again, the tags that link a run to its version, and the code-version hashes.

Every evaluation family (interpretability, selection, steering, probing), the training code
version and the analysis use these; the ``evaluate`` entry point
(evaluation/interpretability/evaluate.py) is one of them. ``saeflow_version`` hashes the
source of the ``evaluation`` and ``project`` packages (by name: project imports no
evaluation module).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from project.lm import LoadedLM, check_layer, hook_name, load_lm
from project.registry import parse_model_uri
from project.tracking import (
    LM_TAG,
    MODEL_VERSION_NUMBER_TAG,
    REGISTERED_MODEL_TAG,
    RUN_TYPE_TAG,
    TRAINING_RUN_TAG,
    lm_of,
    version_run_tags,
)

EVAL_RUN_TYPE = "eval"
# The `mlflow run` launcher run that holds a batch of eval runs (:func:`parent_run`).
BATCH_RUN_TYPE = "evaluate"
CONFIG_HASH_TAG = "eval_config_hash"
# torch's intra-op thread count where an eval ran: sums split over another number of threads
# round differently, and a sampled generation can then take another token (a Ray worker with
# num_cpus=1 runs one thread; the local executor one per core).
TORCH_THREADS_TAG = "saeflow.torch_threads"
# An eval run's link on its version: ``eval.<eval>.run_id``.
EVAL_LINK_TAG = "eval.{name}.run_id"
_ALL_VERSIONS_URI = re.compile(r"^models:/(?P<name>[^/@]+)/?$")
# Version tags that are not the SAE's own description (links and training metrics).
_SKIP_VERSION_TAG_PREFIXES = ("eval.", "metric.", "mlflow.")


def resolve_versions(model_uri: str) -> list[ModelVersion]:
    """The model versions a URI names: one for /VERSION or @ALIAS, all for a bare name."""
    client = MlflowClient()
    bare = _ALL_VERSIONS_URI.match(model_uri)
    if bare:
        name = bare["name"]
        escaped = name.replace("'", "\\'")
        try:
            versions = client.search_model_versions(f"name = '{escaped}'")
        except mlflow.exceptions.MlflowException as err:
            raise ValueError(f"model URI {model_uri!r} does not resolve: {err.message}") from err
        if not versions:
            raise ValueError(
                f"model URI {model_uri!r} does not resolve: no registered model {name!r} with "
                "any version"
            )
        return sorted(versions, key=lambda v: int(v.version))
    try:
        name, version, alias = parse_model_uri(model_uri)
    except ValueError as err:
        raise ValueError(f"{err}, or models:/NAME for every version") from None
    try:
        if version:
            return [client.get_model_version(name, version)]
        return [client.get_model_version_by_alias(name, alias)]
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"model URI {model_uri!r} does not resolve: {err.message}") from err


def version_uri(mv: ModelVersion) -> str:
    return f"models:/{mv.name}/{mv.version}"


def version_site(mv: ModelVersion) -> tuple[str, int]:
    """(LM name, layer) of a version, from its tags; ValueError if they are missing or odd."""
    tags = mv.tags or {}
    missing = [k for k, v in ((LM_TAG, lm_of(tags)), ("layer", tags.get("layer"))) if v is None]
    if missing:
        raise ValueError(f"{version_uri(mv)} lacks the version tags {missing}")
    try:
        layer = int(tags["layer"])
    except ValueError:
        raise ValueError(
            f"{version_uri(mv)} has a non-integer layer tag {tags['layer']!r}"
        ) from None
    hook = tags.get("hook_name", hook_name(layer))
    if hook != hook_name(layer):
        raise ValueError(
            f"{version_uri(mv)} is an SAE at {hook!r}; evaluation supports the residual stream "
            f"after a block ({hook_name(layer)!r})"
        )
    return str(lm_of(tags)), layer


@lru_cache(maxsize=1)
def saeflow_version() -> str:
    """``<package version>+src.<hash>``: the hash covers every ``.py`` file of the
    ``evaluation`` and ``project`` packages (the code an eval result depends on), so any change
    to them, committed or not, makes a new version, and nothing else does."""
    return code_version(("evaluation", "project"))


@lru_cache(maxsize=8)
def code_version(packages: tuple[str, ...]) -> str:
    """``<package version>+src.<hash>`` of every ``.py`` file of the named (sub)packages, e.g.
    ``("training", "project.saes")``: what a result of that code is reused by."""
    try:
        version = importlib_metadata.version("saeflow")
    except importlib_metadata.PackageNotFoundError:
        version = "0+unknown"
    h = hashlib.sha256()
    for name in packages:
        package = importlib.import_module(name)
        root = Path(next(iter(package.__path__)))
        for path in sorted(root.rglob("*.py")):
            h.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return f"{version}+src.{h.hexdigest()[:12]}"


def judge_identity(judge: Any) -> dict[str, str] | str | None:
    """A judge's ``identity()`` where it has one, else its name (or None: no judge)."""
    if judge is None or isinstance(judge, str | dict):
        return judge
    identity = getattr(judge, "identity", None)
    if callable(identity):
        return {str(k): str(v) for k, v in identity().items()}
    return str(getattr(judge, "name", type(judge).__name__))


def load_sites(
    versions: list[ModelVersion],
    lms: dict[str, LoadedLM] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[dict[str, tuple[str, int]], dict[str, LoadedLM]]:
    """(version URI → (LM name, layer), LM name → loaded LM) for ``versions``: each LM loaded
    once (``lms`` may hold some already; the others are loaded in ``dtype`` on ``device``), its
    layer checked, and each version's d_in checked against the LM's width; ValueError before
    any work otherwise. Keyed by URI: version numbers repeat across registered models."""
    sites = {version_uri(mv): version_site(mv) for mv in versions}
    lms = dict(lms or {})
    for lm_name, layer in sites.values():
        if lm_name not in lms:
            lms[lm_name] = load_lm(lm_name, dtype=dtype, device=device)
        check_layer(lms[lm_name], layer)
    for mv in versions:
        d_in = (mv.tags or {}).get("d_in")
        lm = lms[sites[version_uri(mv)][0]]
        if d_in is not None and int(d_in) != lm.d_model:
            raise ValueError(f"{version_uri(mv)} has d_in {d_in} but {lm.name} has {lm.d_model}")
    return sites, lms


def config_hash(
    eval_name: str,
    config: Any,
    judge: Any,
    mv: ModelVersion,
    *,
    lm_fingerprint: str = "",
    code_version: str | None = None,
) -> str:
    """Identity of an evaluation: eval, whole config, judge identity (if one is used: a judge
    object, its ``identity()`` dict or its name), the exact version, the LM's fingerprint and
    saeflow's code version (default: :func:`saeflow_version`)."""
    payload = {
        "eval": eval_name,
        "config": asdict(config) if is_dataclass(config) else dict(config),
        "judge": judge_identity(judge),
        "version": [mv.name, str(mv.version), mv.run_id, mv.source],
        "lm": lm_fingerprint,
        "saeflow": code_version if code_version is not None else saeflow_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def find_finished_run(mv: ModelVersion, run_type: str, digest: str, **tags: str) -> Any | None:
    """The latest FINISHED run of ``run_type`` about this version with this config hash (and
    these extra tag values), in any experiment; None if there is none. Every kind of run that
    is reused by config hash (eval, steer, latent stats, probe) is found here."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    name = mv.name.replace("'", "\\'")
    extra = "".join(f" AND tags.{key} = '{value}'" for key, value in tags.items())
    runs = client.search_runs(
        experiments,
        filter_string=(
            f"tags.`{RUN_TYPE_TAG}` = '{run_type}'{extra} "
            f"AND tags.{REGISTERED_MODEL_TAG} = '{name}' AND tags.{MODEL_VERSION_NUMBER_TAG} = '{mv.version}' "
            f"AND tags.{CONFIG_HASH_TAG} = '{digest}' AND attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_existing_run(mv: ModelVersion, eval_name: str, digest: str) -> Any | None:
    """The latest FINISHED eval run of this version with this config hash, if any."""
    return find_finished_run(mv, EVAL_RUN_TYPE, digest, eval=eval_name)


def run_tags(mv: ModelVersion, eval_name: str, digest: str) -> dict[str, str]:
    """Tags linking an eval run to its version, plus the version's own tags."""
    tags: dict[str, str] = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(_SKIP_VERSION_TAG_PREFIXES):
            continue
        # Versions registered before the vocabulary was fixed called the LM "model_name".
        tags[LM_TAG if key == "model_name" else key] = str(value)
    tags.update(version_run_tags(mv.name, mv.version))
    tags.update(
        {
            RUN_TYPE_TAG: EVAL_RUN_TYPE,
            "eval": eval_name,
            TRAINING_RUN_TAG: (mv.tags or {}).get(TRAINING_RUN_TAG) or mv.run_id or "",
            CONFIG_HASH_TAG: digest,
            TORCH_THREADS_TAG: str(torch.get_num_threads()),
        }
    )
    return tags


@contextmanager
def parent_run() -> Iterator[None]:
    """Nest eval runs under the caller's active run, or under the `mlflow run` launcher run."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if mlflow.active_run() is None and launcher:
        # start_run resumes $MLFLOW_RUN_ID whenever it is set, nested or not: take it out while
        # the eval runs start, or the first of them would be the launcher run itself.
        os.environ.pop("MLFLOW_RUN_ID")
        try:
            with mlflow.start_run(run_id=launcher):
                mlflow.set_tag(RUN_TYPE_TAG, BATCH_RUN_TYPE)
                yield
        finally:
            os.environ["MLFLOW_RUN_ID"] = launcher
    else:
        yield
