"""Entry point ``import_sae``: register an SAE saeflow did not train, like one it did.

    mlflow run . -e import_sae --env-manager local -P source=PATH_OR_RELEASE -P model=LM

``source`` is one of

- ``sae_lens:RELEASE/SAE_ID``: a SAELens pretrained release, through
  ``sae_lens.SAE.from_pretrained`` (needs the Hugging Face hub, or HF_HUB_OFFLINE=1 and a copy
  in the local hub cache; an unreachable hub fails within seconds, naming the source);
- a local SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), also one SAELens
  itself wrote;
- a dictionary_learning checkpoint directory (``ae.pt`` + ``config.json``), converted by
  :mod:`project.dictionary_learning`;
- ``random:models:/NAME/VERSION`` (or ``@ALIAS``): a control, an SAE of that version's exact
  config freshly initialised (seeded; no training), for the same LM and layer. It joins the
  same registered model by default with the tags ``baseline=random_init`` and ``baseline_of``,
  so ``evaluate -P model_uri=models:/NAME`` scores it beside the trained versions.

The version looks like a trained one: the SAELens-format artifact, the version tags of
``VERSION_TAG_KEYS`` (``n_tokens`` is "0": saeflow harvested nothing for it;
``training_run_id`` is the import run), plus ``source``, ``source_format`` and
``target_l0_source``. The import run is short (tag ``saeflow.run_type=import``, params
source/model/layer/registered_model).

``target_l0``: the config's ``k`` for the TopK family, a target L0 the source states
(saeflow directories, dictionary_learning JumpReLU), otherwise the L0 measured on
``MEASURE_TOKENS`` tokens of the default corpus (the Python standard library's docstrings,
which every machine has, so the number is reproducible offline) run through the LM to the
SAE's hook; the BOS position is left out (its activation is an outlier SAEs are not trained
on). The same sample gives the ``metric.*`` version tags (l0, explained_variance, mse,
cossim). ``target_l0_source`` says which ("config" or "measured").

Every check runs before the run is opened, so a failure logs and registers nothing: the
source's architecture is one saeflow implements, a JumpReLU(-like) SAE has its threshold,
every weight is finite, the hook is a residual-stream one (``blocks.L.hook_resid_post``,
``blocks.L.hook_resid_pre`` = resid_post of L-1, or a decoder block's output such as
``model.layers.L``) whose layer the LM has, and d_in equals the LM's hidden size. A SAELens
release is also compared with SAELens' own encode/decode on the sampled activations.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from torch import Tensor

from project import dictionary_learning
from project.cli import parse_int, run_entry_point
from project.corpus import DEFAULT_CORPUS, iter_texts, resolve_corpus, token_windows
from project.lm import DEFAULT_LM, LoadedLM, check_layer, hook_name, load_lm, residual_activations
from project.registry import (
    default_registered_model_name,
    load_version,
    model_version,
    register_sae,
)
from project.saes import SparseAutoencoder, build_sae, load_sae_dir
from project.saes.base import explained_variance
from project.saes.io import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, saeflow_config_from_saelens
from project.tracking import (
    DEFAULT_EXPERIMENT,
    LM_TAG,
    MODEL_VERSION_TAG,
    RUN_TYPE_TAG,
    configure_tracking,
    lm_of,
    ui_hint,
)

log = logging.getLogger(__name__)

SAE_LENS_PREFIX = "sae_lens:"
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
# The same tag training.run sets on its runs (kept here so project/ does not import training/).
# Activation sample for the measured L0 / metrics and the SAELens comparison.
MEASURE_TOKENS = 2048
MEASURE_CONTEXT = 128
ENCODE_BATCH = 512
# Seconds to wait for the Hugging Face hub before declaring it unreachable.
HUB_TIMEOUT_S = 5.0
_AUTO = frozenset({"", "auto", "none"})

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
# A decoder block's output (HF module path): model.layers.L, transformer.h.L, gpt_neox.layers.L.
_BLOCK_OUTPUT = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:layers|h)\.(\d+)$")


@dataclass
class LoadedSource:
    """An SAE read from a source, before any LM is involved."""

    sae: SparseAutoencoder
    source_format: str  # "sae_lens_release", "sae_lens_dir", "dictionary_learning", "random_init"
    model_name: str | None  # the LM the source says it belongs to
    hook_name: str | None
    # A target L0 the source states (k, or a saeflow/dictionary_learning target), if any.
    stated_target_l0: float | None
    # SAELens' own module, to compare encode/decode with (releases only).
    reference: Any = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    # The registered model an "auto" name resolves to (a control joins its reference's).
    registered_model: str | None = None


# ---------------------------------------------------------------------------------------------
# public API


def import_sae(
    source: str,
    *,
    model: str | None = None,
    registered_model: str = "auto",
    layer: int | None = None,
) -> ModelVersion:
    """Register the SAE at ``source`` as a new model version; returns it.

    Args:
        source: ``sae_lens:RELEASE/SAE_ID``, a SAELens directory, or a dictionary_learning
            checkpoint directory.
        model: the LM the SAE reads (any form ``load_lm`` accepts); None = the LM the source
            names, else the default LM.
        registered_model: registered model name; "auto" = ``sae-<lm>-l<layer>-resid-post``, or
            for a ``random:`` control the registered model of the version it copies.
        layer: the residual-stream layer (resid_post of decoder block ``layer``); None = from
            the source's hook name. Given both, they must agree.

    Raises:
        ValueError: bad input or a failed check (see the module docstring); nothing is logged
            or registered then.
    """
    loaded = load_source(source)
    sae = loaded.sae
    resolved_layer = _resolve_layer(loaded.hook_name, layer, source)
    lm_name = model or loaded.model_name or DEFAULT_LM
    try:
        lm = load_lm(lm_name)
    except ValueError as err:
        if model is not None:
            raise
        raise ValueError(f"{err} (the LM {source} names; pass model=... to choose one)") from err
    check_layer(lm, resolved_layer)
    if sae.cfg.d_in != lm.d_model:
        raise ValueError(
            f"SAE d_in {sae.cfg.d_in} does not fit LM {lm.name}: its hidden size at "
            f"{hook_name(resolved_layer)} is {lm.d_model}"
        )
    acts_ND = sample_activations(lm, resolved_layer)
    if loaded.reference is not None:
        compare_with_saelens(sae, loaded.reference, acts_ND, source)
    metrics = measure(sae, acts_ND)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise ValueError(f"{source}: the SAE gives non-finite metrics {metrics} on the LM")
    if metrics["explained_variance"] < 0:
        log.warning(
            "%s explains %.3f of the variance at %s of %s: is it the right LM and layer?",
            source,
            metrics["explained_variance"],
            hook_name(resolved_layer),
            lm.name,
        )
    if loaded.stated_target_l0 is not None:
        target_l0, target_source = _format_l0(loaded.stated_target_l0), "config"
    else:
        target_l0, target_source = f"{metrics['l0']:.1f}", "measured"

    name = registered_model
    if name.strip().lower() in _AUTO:
        name = loaded.registered_model or default_registered_model_name(lm.name, resolved_layer)
    hook = hook_name(resolved_layer)
    sae.cfg.metadata.update(
        {
            LM_TAG: lm.name,
            "hook_name": hook,
            "hook_layer": resolved_layer,
            "saeflow_source": _origin(source),
            **({"source_model_name": loaded.model_name} if loaded.model_name else {}),
            **({"source_hook_name": loaded.hook_name} if loaded.hook_name else {}),
        }
    )
    return _register(
        sae,
        source=source,
        loaded=loaded,
        lm=lm,
        layer=resolved_layer,
        model_arg=model,
        registered_model=name,
        metrics=metrics,
        target_l0=target_l0,
        target_source=target_source,
    )


def load_source(source: str) -> LoadedSource:
    """Read the SAE at ``source`` and run the checks that need no LM."""
    if source.startswith(SAE_LENS_PREFIX):
        loaded = _load_release(source)
    elif source.startswith(RANDOM_PREFIX):
        loaded = _random_like(source.removeprefix(RANDOM_PREFIX))
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.name in {
            SAE_CFG_FILENAME,
            SAE_WEIGHTS_FILENAME,
            dictionary_learning.AE_FILENAME,
        }:
            path = path.parent
        if not path.is_dir():
            raise ValueError(
                f"source {source!r} is neither an existing directory nor "
                f"{SAE_LENS_PREFIX}RELEASE/SAE_ID"
            )
        if (path / SAE_CFG_FILENAME).is_file() and (path / SAE_WEIGHTS_FILENAME).is_file():
            loaded = _load_saelens_dir(path)
        elif dictionary_learning.is_checkpoint_dir(path):
            loaded = _load_dictionary_learning(path)
        else:
            nested = sorted(
                p.parent.name for p in path.glob(f"*/{dictionary_learning.AE_FILENAME}")
            )
            hint = f"; its subdirectories {nested} are checkpoints: pass one" if nested else ""
            raise ValueError(
                f"source directory {source!r} is neither a SAELens directory ({SAE_CFG_FILENAME}"
                f" + {SAE_WEIGHTS_FILENAME}) nor a dictionary_learning checkpoint "
                f"({dictionary_learning.AE_FILENAME} + {dictionary_learning.CONFIG_FILENAME})"
                f"{hint}"
            )
    check_finite(loaded.sae, source)
    return loaded


def _random_like(model_uri: str) -> LoadedSource:
    """A freshly initialised SAE with the config of the registered version ``model_uri``."""
    if not model_uri.startswith("models:/"):
        raise ValueError(
            f"source {RANDOM_PREFIX}{model_uri!r}: after {RANDOM_PREFIX!r} give a registered "
            "version, models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    try:
        version = model_version(model_uri)
        reference = load_version(version)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise ValueError(f"source {RANDOM_PREFIX}{model_uri}: {err}") from err
    cfg = copy.deepcopy(reference.cfg)
    for key in ("saeflow_source", "source_model_name", "source_hook_name"):
        cfg.metadata.pop(key, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        sae = build_sae(cfg)
    stated = float(cfg.k) if cfg.k else (cfg.target_l0 or None)
    tags = version.tags or {}
    return LoadedSource(
        sae=sae,
        source_format="random_init",
        # The version's tags name its site even where the SAE's own metadata does not.
        model_name=lm_of(tags) or cfg.metadata.get("model_name"),
        hook_name=tags.get("hook_name") or cfg.metadata.get("hook_name"),
        stated_target_l0=stated,
        extra_tags={"baseline": "random_init", "baseline_of": model_uri},
        registered_model=version.name,
    )


def _origin(source: str) -> str:
    """What the ``source`` tag records: the release as given, a directory as absolute path."""
    if source.startswith((SAE_LENS_PREFIX, RANDOM_PREFIX)):
        return source
    return str(Path(source).expanduser().resolve())


def residual_layer(hook: str) -> int:
    """The layer whose resid_post ``hook`` is; ValueError for a non-residual hook."""
    if match := _RESID_POST.match(hook):
        return int(match.group(1))
    if match := _RESID_PRE.match(hook):
        block = int(match.group(1))
        if block == 0:
            raise ValueError(
                f"hook {hook!r} reads the embeddings, which saeflow does not hook "
                "(residual layers start after decoder block 0)"
            )
        return block - 1  # resid_pre of block L is resid_post of block L-1
    if match := _BLOCK_OUTPUT.match(hook):
        return int(match.group(1))
    raise ValueError(
        f"hook {hook!r} is not a residual-stream hook saeflow supports: expected "
        "blocks.L.hook_resid_post, blocks.L.hook_resid_pre, or a decoder block's output such as "
        "model.layers.L"
    )


def check_finite(sae: SparseAutoencoder, source: str) -> None:
    """ValueError naming the first tensor with NaN/inf values (in SAELens' saved form)."""
    for name, tensor in sae.saelens_tensors().items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise ValueError(
                f"{source}: weight {name!r} has {int((~finite).sum())} non-finite values "
                "(NaN/inf); nothing imported"
            )


@torch.no_grad()
def sample_activations(
    lm: LoadedLM, layer: int, n_tokens: int = MEASURE_TOKENS, context_size: int = MEASURE_CONTEXT
) -> Tensor:
    """``[N, D]`` float32 resid_post activations of ``layer`` on the default corpus (no BOS)."""
    windows = list(
        token_windows(
            iter_texts(resolve_corpus(DEFAULT_CORPUS)), lm.tokenizer, context_size, n_tokens
        )
    )
    if not windows:
        raise ValueError(f"the {DEFAULT_CORPUS} corpus yields no windows of {context_size} tokens")
    ids_BT = torch.stack(windows)
    chunks = []
    for start in range(0, ids_BT.shape[0], 8):
        acts_BTD = residual_activations(lm, ids_BT[start : start + 8], layer)
        if lm.tokenizer.bos_token_id is not None:
            acts_BTD = acts_BTD[:, 1:]
        chunks.append(acts_BTD.reshape(-1, acts_BTD.shape[-1]).float())
    return torch.cat(chunks)


@torch.no_grad()
def measure(sae: SparseAutoencoder, acts_ND: Tensor) -> dict[str, float]:
    """l0, explained_variance, mse (per element), cossim: the keys training reports."""
    sae.eval()
    f_parts, x_hat_parts = [], []
    for start in range(0, acts_ND.shape[0], ENCODE_BATCH):
        x_BD = acts_ND[start : start + ENCODE_BATCH]
        f_BF = sae.encode(x_BD)
        f_parts.append((f_BF != 0).sum(dim=-1).float())
        x_hat_parts.append(sae.decode(f_BF).float())
    x_hat_ND = torch.cat(x_hat_parts)
    return {
        "l0": float(torch.cat(f_parts).mean()),
        "explained_variance": float(explained_variance(acts_ND, x_hat_ND)),
        "mse": float((x_hat_ND - acts_ND).pow(2).mean()),
        "cossim": float(torch.nn.functional.cosine_similarity(acts_ND, x_hat_ND, dim=-1).mean()),
    }


@torch.no_grad()
def compare_with_saelens(
    sae: SparseAutoencoder, reference: Any, acts_ND: Tensor, source: str, n: int = 256
) -> None:
    """ValueError unless saeflow's encode/decode reproduce SAELens' on ``n`` activations."""
    x_BD = acts_ND[:n]
    reference = reference.eval()
    ref_f = reference.encode(x_BD.to(reference.W_enc.dtype))
    ref_f = ref_f.to_dense() if ref_f.is_sparse else ref_f
    ref_x_hat = reference.decode(ref_f)
    f = sae.encode(x_BD)
    x_hat = sae.decode(f)
    for what, ours, theirs in (("encode", f, ref_f), ("decode", x_hat, ref_x_hat)):
        theirs = theirs.to(ours.dtype)
        tolerance = 1e-4 * max(1.0, float(theirs.abs().max()))
        diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
        if ours.shape != theirs.shape or not diff <= tolerance:
            raise ValueError(
                f"{source}: saeflow's {what} differs from SAELens' by {diff:.3g} (tolerance "
                f"{tolerance:.3g}); the conversion is not faithful, nothing imported"
            )


# ---------------------------------------------------------------------------------------------
# sources


def _load_release(source: str) -> LoadedSource:
    import huggingface_hub

    spec = source.removeprefix(SAE_LENS_PREFIX)
    release, _, sae_id = spec.partition("/")
    if not release or not sae_id:
        raise ValueError(f"source {source!r} must read {SAE_LENS_PREFIX}RELEASE/SAE_ID")
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory,
        get_repo_id_and_folder_name,
    )

    directory = get_pretrained_saes_directory()
    if release not in directory:
        import difflib

        close = difflib.get_close_matches(release, list(directory), n=5)
        raise ValueError(
            f"source {source!r}: SAELens has no release {release!r}"
            + (f"; close matches: {close}" if close else "")
        )
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        raise ValueError(
            f"source {source!r}: release {release!r} has no SAE {sae_id!r}; it has "
            f"{ids[:8]}{' ...' if len(ids) > 8 else ''}"
        )
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    reachable = not offline and _hub_reachable(repo_id)
    previous = huggingface_hub.constants.HF_HUB_OFFLINE
    try:
        # An unreachable hub: read the local cache only, instead of retrying for minutes.
        huggingface_hub.constants.HF_HUB_OFFLINE = not reachable
        reference, cfg_dict, _ = SAE.from_pretrained_with_cfg_and_sparsity(
            release, sae_id, device="cpu"
        )
    except Exception as err:  # hub, cache and conversion errors come in many types
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if offline
            else "the Hugging Face hub could not be reached and it is not in the local cache"
            if not reachable
            else "SAELens could not load it"
        )
        raise ValueError(
            f"cannot import {source!r} ({repo_id}/{folder}): {why} ({type(err).__name__}: "
            f"{err}). Without a network, download it elsewhere, save it with "
            "SAE.save_model(DIR) and import DIR"
        ) from err
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = previous
    with tempfile.TemporaryDirectory(prefix="saeflow-import-") as tmp:
        reference.save_model(tmp)
        loaded = _load_saelens_dir(Path(tmp), label=source)
    loaded.source_format = "sae_lens_release"
    loaded.reference = reference
    loaded.model_name = loaded.model_name or lookup.model
    loaded.extra_tags["sae_lens_repo"] = f"{repo_id}/{folder}"
    return loaded


def _hub_reachable(repo_id: str) -> bool:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError as err:
        # The hub answered (e.g. 401/404): reachable; let SAELens report the rest.
        log.debug("hub answered for %s: %s", repo_id, err)
        return True
    except Exception as err:  # network errors come in many types (httpx, OSError, ...)
        log.warning("the Hugging Face hub is unreachable (%s): using the local cache only", err)
        return False
    return True


def _load_saelens_dir(path: Path, label: str | None = None) -> LoadedSource:
    import json

    from safetensors import safe_open

    label = label or str(path)
    try:
        cfg_dict: dict[str, Any] = json.loads((path / SAE_CFG_FILENAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {SAE_CFG_FILENAME} is not valid JSON: {err}") from err
    cfg = saeflow_config_from_saelens(cfg_dict)  # ValueError for an unknown architecture
    with safe_open(str(path / SAE_WEIGHTS_FILENAME), framework="pt") as weights:
        names = set(weights.keys())
    if cfg_dict.get("architecture") == "jumprelu" and not names & {"threshold", "log_threshold"}:
        raise ValueError(
            f"{label}: a jumprelu SAE needs its 'threshold' tensor; {SAE_WEIGHTS_FILENAME} "
            f"holds only {sorted(names)}"
        )
    metadata = cfg.metadata
    if metadata.get("hook_head_index") is not None:
        raise ValueError(
            f"{label}: the SAE reads one attention head (hook_head_index="
            f"{metadata['hook_head_index']}); saeflow imports residual-stream SAEs only"
        )
    sae = load_sae_dir(path)
    stated = None
    if sae.cfg.k is not None:
        stated = float(sae.cfg.k)
    elif "saeflow" in cfg_dict and sae.cfg.target_l0 is not None:
        stated = float(sae.cfg.target_l0)
    return LoadedSource(
        sae=sae,
        source_format="sae_lens_dir",
        model_name=metadata.get("model_name"),
        hook_name=metadata.get("hook_name"),
        stated_target_l0=stated,
    )


def _load_dictionary_learning(path: Path) -> LoadedSource:
    checkpoint = dictionary_learning.load_checkpoint(path)
    sae = checkpoint.sae
    stated = sae.cfg.k if sae.cfg.k is not None else sae.cfg.target_l0
    return LoadedSource(
        sae=sae,
        source_format="dictionary_learning",
        model_name=checkpoint.lm_name,
        hook_name=checkpoint.hook_name,
        stated_target_l0=float(stated) if stated is not None else None,
        extra_tags={"dictionary_learning_class": checkpoint.dict_class},
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _resolve_layer(hook: str | None, layer: int | None, source: str) -> int:
    from_hook = residual_layer(hook) if hook else None
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise ValueError(f"layer={layer!r} must be an integer")
    if from_hook is not None and layer is not None and from_hook != layer:
        raise ValueError(
            f"layer={layer} contradicts the source's hook {hook!r} (layer {from_hook})"
        )
    resolved = from_hook if from_hook is not None else layer
    if resolved is None:
        raise ValueError(f"{source}: the source names no hook; pass the layer it reads")
    return resolved


def _format_l0(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _register(
    sae: SparseAutoencoder,
    *,
    source: str,
    loaded: LoadedSource,
    lm: LoadedLM,
    layer: int,
    model_arg: str | None,
    registered_model: str,
    metrics: dict[str, float],
    target_l0: str,
    target_source: str,
) -> ModelVersion:
    """The only part that writes: a short import run and the registered version."""
    architecture = sae.cfg.architecture
    short = Path(source.removeprefix(SAE_LENS_PREFIX).rstrip("/")).name or source
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=f"import-{architecture}-{short}", nested=nested) as run:
        run_id = run.info.run_id
        params = {
            "source": source,
            "model": model_arg or lm.name,
            "layer": layer,
            "registered_model": registered_model,
        }
        # `mlflow run` has already logged the MLproject parameters it was given.
        logged = mlflow.get_run(run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        mlflow.set_tags(
            {
                RUN_TYPE_TAG: "import",
                "source": _origin(source),
                "source_format": loaded.source_format,
                "architecture": architecture,
                "target_l0": target_l0,
                **loaded.extra_tags,
            }
        )
        mlflow.log_metrics(metrics)
        tags = {
            "architecture": architecture,
            "target_l0": target_l0,
            "target_l0_source": target_source,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            LM_TAG: lm.name,
            "hook_name": hook_name(layer),
            "layer": layer,
            "n_tokens": 0,
            "training_run_id": run_id,
            "source": _origin(source),
            "source_format": loaded.source_format,
            **loaded.extra_tags,
        }
        description = (
            f"{architecture} SAE imported from {source} ({loaded.source_format}), not trained "
            f"by saeflow: d_sae {sae.cfg.d_sae}, on {lm.name} {hook_name(layer)}. On "
            f"{MEASURE_TOKENS} tokens of the {DEFAULT_CORPUS} corpus: L0 {metrics['l0']:.2f}, "
            f"explained variance {metrics['explained_variance']:.3f}."
        )
        version = register_sae(
            sae,
            registered_model=registered_model,
            tags=tags,
            metrics=metrics,
            description=description,
        )
        mlflow.set_tag(MODEL_VERSION_TAG, f"models:/{version.name}/{version.version}")
    return version


def _parse_layer(text: str) -> int | None:
    """``--layer``: "auto"/"none" or an integer as MLflow may pass it ("4", "4.0")."""
    if text.strip().lower() in _AUTO:
        return None
    return parse_int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        required=True,
        help="sae_lens:RELEASE/SAE_ID, a SAELens or dictionary_learning dir",
    )
    parser.add_argument(
        "--model", default="auto", help="the LM the SAE reads ('auto': the one the source names)"
    )
    parser.add_argument("--registered_model", default="auto")
    parser.add_argument(
        "--layer", type=_parse_layer, default=None, help="residual layer ('auto': from the hook)"
    )
    args = parser.parse_args()
    tracking_uri = configure_tracking(experiment=DEFAULT_EXPERIMENT)
    model = None if args.model.strip().lower() in _AUTO else args.model
    version = import_sae(
        args.source, model=model, registered_model=args.registered_model, layer=args.layer
    )
    print(f"imported {args.source} as models:/{version.name}/{version.version}")
    print(f"tags: {dict(sorted(version.tags.items()))}")
    print(f"browse: {ui_hint(tracking_uri)}")


if __name__ == "__main__":
    run_entry_point(main)
