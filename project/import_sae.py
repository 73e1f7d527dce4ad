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
  config freshly initialised (seeded; no training), for the same LM and layer, centred and
  calibrated to the version's sparsity (see "Random-init controls" below). It joins the
  same registered model by default with the tags ``baseline=random_init`` and ``baseline_of``,
  so ``evaluate -P model_uri=models:/NAME`` scores it beside the trained versions.

The version looks like a trained one: the SAELens-format artifact, the version tags of
``VERSION_TAG_KEYS`` (``n_tokens`` is "0": saeflow harvested nothing for it;
``training_run_id`` is the import run), plus ``source``, ``source_format`` and
``target_l0_source``. The import run is short (tag ``saeflow.run_type=import``, params
source/model/layer/registered_model).

``target_l0``: the config's ``k`` for the TopK family, a target L0 the source states
(saeflow directories, dictionary_learning JumpReLU), otherwise the L0 measured on
``MEASURE_TOKENS`` tokens of the default corpus's eval region (the Python standard library's
docstrings, which every machine has, so the number is reproducible offline; the region no
harvest reads, see ``project.corpus.iter_texts``) run through the LM to the
SAE's hook; the BOS position is left out (its activation is an outlier SAEs are not trained
on). The same sample gives the ``metric.*`` version tags (l0, explained_variance, mse,
cossim). ``target_l0_source`` says which ("config" or "measured").

Every check runs before the run is opened, so a failure logs and registers nothing: the
source's architecture is one saeflow implements, a JumpReLU(-like) SAE has its threshold,
every weight is finite, the hook is a residual-stream one (``blocks.L.hook_resid_post``,
``blocks.L.hook_resid_pre`` = resid_post of L-1, or a decoder block's output such as
``model.layers.L``) whose layer the LM has, and d_in equals the LM's hidden size. A SAELens
release is also compared with SAELens' own encode/decode on the sampled activations.

Random-init controls. A control differs from its reference in training only, not in centring
or sparsity (either would confound every trained-vs-control comparison: an uncentred random
SAE, or a BatchTopK one whose threshold is still 0, fires on ~d_sae/2 latents per token):

1. it is initialised as training initialises an SAE: ``initialize_from_data`` (``b_dec`` =
   geometric median, plus any architecture-specific init) on ``INIT_TOKENS`` activations of
   the reference's LM and layer from the corpus's harvest region;
2. the reference's L0 and the control's are measured on the same ``CALIBRATION_TOKENS``
   held-out activations (the default corpus's eval region), and the control's sparsity knob
   is set from a quantile of its pre-activations so that its L0 matches (deterministic: no
   search over random draws):

   - ``topk``: ``k``, the integer whose per-token L0 ``mean(min(k, #positive))`` is closest;
   - ``batchtopk``, ``matryoshka``: the single inference threshold θ (their only inference
     knob), the ``L0·N``-th largest positive pre-activation;
   - ``jumprelu``: a per-latent θ, each latent's quantile at which it fires on
     ``L0/d_sae`` of the tokens. This is JumpReLU's own initialisation rule
     (``_initialize_from_data`` starts each θ at a per-latent quantile) at the reference's L0
     instead of twice the target, so the control is what a fresh JumpReLU would be at that
     sparsity, with no dead or dense latent. (One shared θ would be almost as even on
     SmolLM2-135M layer 4, d_sae 2304, L0 37: no dead latent, the busiest 1% of latents
     3.5% of the firings; the per-latent rule keeps that true for any LM and layer);
   - ``relu``, ``gated``: one shared shift of the encoder (gate) bias that initialisation
     left (0 for every latent, or per-latent quantiles under L0 control): the shift keeps
     the latents as alike as initialisation made them.

   If the control's measured L0 is not within ``L0_TOLERANCE`` (10%) of the reference's, or
   the reference never fires there, the import fails naming the reason and registers nothing.
   The version is tagged ``baseline_reference_l0`` and ``l0_measured`` (both on the held-out
   sample), ``calibration`` (the knob and its value) and ``calibration_data``.
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
from project.corpus import (
    DEFAULT_CORPUS,
    iter_texts,
    region_rule,
    resolve_corpus,
    token_windows,
)
from project.lm import DEFAULT_LM, LoadedLM, check_layer, hook_name, load_lm, residual_activations
from project.registry import (
    default_registered_model_name,
    load_version,
    model_version,
    register_sae,
)
from project.saes import SparseAutoencoder, build_sae, load_sae_dir
from project.saes.base import explained_variance
from project.saes.gated import GatedSAE
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
# Activation sample for the measured L0 / metrics and the SAELens comparison.
MEASURE_TOKENS = 2048
MEASURE_CONTEXT = 128
ENCODE_BATCH = 512
# Random-init controls: harvest-region activations for initialize_from_data (training uses
# min(8192, cache) too), held-out ones the reference and control L0s are measured on, and how
# far apart those L0s may be.
INIT_TOKENS = 8192
CALIBRATION_TOKENS = 8192
L0_TOLERANCE = 0.10
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
    # A random control's reference SAE (the version it copies), to calibrate against.
    baseline_reference: SparseAutoencoder | None = None


@dataclass
class Calibration:
    """How a random control was matched to its reference's sparsity on held-out data."""

    knob: str  # "k", "threshold", "per_latent_threshold", "b_enc_shift" or "b_gate_shift"
    value: float  # k, θ, the median per-latent θ, or the bias shift
    reference_l0: float
    l0: float


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
    calibration: Calibration | None = None
    if loaded.baseline_reference is not None:
        # A control's metrics are those of the held-out sample it was calibrated on.
        try:
            acts_ND, calibration = make_control(sae, loaded.baseline_reference, lm, resolved_layer)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        loaded.extra_tags.update(_calibration_tags(calibration))
    else:
        acts_ND = sample_activations(lm, resolved_layer, region="eval")
    if loaded.reference is not None:
        compare_with_saelens(sae, loaded.reference, acts_ND, source)
    metrics = measure(sae, acts_ND)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise ValueError(f"{source}: the SAE gives non-finite metrics {metrics} on the LM")
    # An untrained control explains little or nothing: no hint of a wrong LM there.
    if metrics["explained_variance"] < 0 and calibration is None:
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
        calibration=calibration,
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
    """A freshly built SAE with the config of the registered version ``model_uri`` (seeded);
    :func:`make_control` initialises and calibrates it once the LM is loaded."""
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
        baseline_reference=reference,
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
    lm: LoadedLM,
    layer: int,
    n_tokens: int = MEASURE_TOKENS,
    context_size: int = MEASURE_CONTEXT,
    *,
    region: str = "harvest",
) -> Tensor:
    """``[N, D]`` float32 resid_post activations of ``layer`` on the default corpus (no BOS),
    from its ``region`` ("harvest" or "eval")."""
    windows = list(
        token_windows(
            iter_texts(resolve_corpus(DEFAULT_CORPUS), region=region),
            lm.tokenizer,
            context_size,
            n_tokens,
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
# random-init controls


def make_control(
    sae: SparseAutoencoder, reference: SparseAutoencoder, lm: LoadedLM, layer: int
) -> tuple[Tensor, Calibration]:
    """Initialise the fresh ``sae`` as training does and match its L0 to ``reference``'s.

    Returns the held-out activations both were measured on, and the calibration.

    Raises:
        ValueError: the reference never fires on the held-out activations, or the control's L0
            cannot be brought within ``L0_TOLERANCE`` of it (the message says why).
    """
    heldout_ND = sample_activations(lm, layer, CALIBRATION_TOKENS, region="eval")
    reference_l0 = measure(reference, heldout_ND)["l0"]
    if not reference_l0 > 0:
        raise ValueError(
            f"the reference SAE has L0 {reference_l0:g} on {_calibration_data()}: a control "
            "cannot be calibrated to an SAE that never fires"
        )
    sae.initialize_from_data(sample_activations(lm, layer, INIT_TOKENS))
    return heldout_ND, calibrate_l0(sae, heldout_ND, reference_l0)


@torch.no_grad()
def calibrate_l0(sae: SparseAutoencoder, x_ND: Tensor, target_l0: float) -> Calibration:
    """Set ``sae``'s sparsity knob (module docstring) so that its L0 on ``x_ND`` is
    ``target_l0``; the knob is read off the sorted pre-activations, so it is deterministic.

    Raises:
        ValueError: no rule for the architecture, or the L0 reached is not within
            ``L0_TOLERANCE`` of ``target_l0``.
    """
    architecture = sae.cfg.architecture
    rule = _CALIBRATION_RULES.get(architecture)
    if rule is None:
        raise ValueError(
            f"no L0 calibration rule for a {architecture!r} control; known: "
            f"{sorted(_CALIBRATION_RULES)}"
        )
    sae.eval()
    pre_NF = torch.cat(
        [
            _firing_preacts(sae, x_ND[start : start + ENCODE_BATCH])
            for start in range(0, x_ND.shape[0], ENCODE_BATCH)
        ]
    )
    knob, value = rule(sae, pre_NF, target_l0)
    l0 = measure(sae, x_ND)["l0"]
    if not abs(l0 - target_l0) <= L0_TOLERANCE * target_l0:
        reachable = float((pre_NF > 0).sum(dim=-1).float().mean())
        hint = (
            f"; untrained, it fires on at most its positive pre-activations, L0 {reachable:.1f}"
            if l0 < target_l0 and architecture != "relu"
            else ""
        )
        raise ValueError(
            f"calibration failed: the {architecture} control reaches L0 {l0:.2f} on "
            f"{_calibration_data()} with {knob} = {value:.6g}, not within "
            f"{L0_TOLERANCE:.0%} of the reference's L0 {target_l0:.2f}{hint}; nothing registered"
        )
    return Calibration(knob=knob, value=value, reference_l0=target_l0, l0=l0)


def _firing_preacts(sae: SparseAutoencoder, x_BD: Tensor) -> Tensor:
    """The pre-activations whose value decides whether a latent fires. Gated: the gate's,
    -inf where the magnitude path is not positive (no gate bias can make those fire)."""
    xc_BD = sae.center(x_BD)
    if isinstance(sae, GatedSAE):
        gate_BF = sae.gate_preacts(xc_BD).float()
        return gate_BF.masked_fill(sae.mag_preacts(xc_BD) <= 0, -math.inf)
    return sae.preacts(xc_BD).float()  # type: ignore[attr-defined]


def _between(values_N: Tensor, n: int) -> float:
    """A value with exactly ``n`` entries of ``values_N`` above it: midway between the n-th and
    (n+1)-th largest, so float rounding of the knob cannot move a token across it."""
    total = values_N.numel()
    if n <= 0:
        top = float(values_N.max())
        return top + abs(top) + 1.0
    if n >= total:
        low = float(values_N.min())
        return low - abs(low) - 1.0
    nth = values_N.kthvalue(total - n + 1).values.double()
    next_ = values_N.kthvalue(total - n).values.double()
    return float((nth + next_) / 2)


def _calibrate_topk(sae: SparseAutoencoder, pre_NF: Tensor, target: float) -> tuple[str, float]:
    # A token keeps its k largest pre-activations, ReLU'd: L0 = mean(min(k, #positive)).
    positive_N = (pre_NF > 0).sum(dim=-1)

    def l0_at(k: int) -> float:
        return float(positive_N.clamp(max=k).double().mean())

    low, high = 1, sae.cfg.d_sae - 1
    while low < high:  # the smallest k whose L0 reaches the target (L0 grows with k)
        mid = (low + high) // 2
        low, high = (low, mid) if l0_at(mid) >= target else (mid + 1, high)
    k = low - 1 if low > 1 and target - l0_at(low - 1) <= l0_at(low) - target else low
    sae.cfg.k = k
    sae.cfg.target_l0 = float(k)  # the topk family's target_l0 is k
    return "k", float(k)


def _calibrate_batchtopk(
    sae: SparseAutoencoder, pre_NF: Tensor, target: float
) -> tuple[str, float]:
    # Inference: ReLU(z)·[z > θ], one θ for all latents; θ ≥ 0 (a negative θ adds nothing).
    positive = pre_NF[pre_NF > 0]
    n_keep = round(target * pre_NF.shape[0])
    theta = max(_between(positive, n_keep), 0.0) if positive.numel() else 0.0
    sae.threshold.fill_(theta)  # type: ignore[union-attr]
    sae.threshold_value.fill_(theta)  # type: ignore[union-attr]
    return "threshold", theta


def _calibrate_jumprelu(sae: SparseAutoencoder, pre_NF: Tensor, target: float) -> tuple[str, float]:
    # Each latent fires on ~target/d_sae of the tokens; the first (total mod d_sae) latents on
    # one token more, so that the total is exact.
    n, d_sae = pre_NF.shape
    base, extra = divmod(round(target * n), d_sae)
    m_F = torch.full((d_sae,), base, dtype=torch.long)
    m_F[:extra] += 1
    depth = min(base + 2, n)
    top_MF = pre_NF.topk(depth, dim=0).values.double()  # each latent's largest, descending
    above_F = torch.where(
        m_F > 0,
        top_MF.gather(0, (m_F - 1).clamp(min=0)[None]).squeeze(0),
        top_MF[0] + top_MF[0].abs() + 1,
    )
    below_F = torch.where(
        m_F < n,
        top_MF.gather(0, m_F.clamp(max=depth - 1)[None]).squeeze(0),
        top_MF[-1] - top_MF[-1].abs() - 1,
    )
    # θ > 0 (it is stored as log θ): a latent short of positive values fires on all of them.
    tiny = torch.finfo(torch.float32).tiny
    theta_F = ((above_F + below_F) / 2).clamp_min(tiny)
    sae.log_threshold.copy_(theta_F.log().to(sae.log_threshold.dtype))  # type: ignore[union-attr]
    return "per_latent_threshold", float(theta_F.median())


def _calibrate_bias_shift(
    sae: SparseAutoencoder, pre_NF: Tensor, target: float
) -> tuple[str, float]:
    # Fires iff z - shift > 0 (Gated: z is -inf where the magnitude path is not positive).
    shift = _between(pre_NF.reshape(-1), round(target * pre_NF.shape[0]))
    if isinstance(sae, GatedSAE):
        sae.b_gate.sub_(shift)
        return "b_gate_shift", shift
    assert sae.b_enc is not None
    sae.b_enc.sub_(shift)
    return "b_enc_shift", shift


_CALIBRATION_RULES = {
    "topk": _calibrate_topk,
    "batchtopk": _calibrate_batchtopk,
    "matryoshka": _calibrate_batchtopk,
    "jumprelu": _calibrate_jumprelu,
    "relu": _calibrate_bias_shift,
    "gated": _calibrate_bias_shift,
}


def _calibration_data() -> str:
    return (
        f"{CALIBRATION_TOKENS} tokens of the {DEFAULT_CORPUS} corpus's eval region (rule "
        f"{region_rule()}; windows of {MEASURE_CONTEXT}, BOS excluded)"
    )


def _calibration_tags(calibration: Calibration) -> dict[str, str]:
    return {
        "baseline_reference_l0": f"{calibration.reference_l0:.4f}",
        "l0_measured": f"{calibration.l0:.4f}",
        "calibration": f"{calibration.knob}={calibration.value:.6g}",
        "calibration_data": _calibration_data(),
    }


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
    calibration: Calibration | None = None,
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
        if calibration is None:
            description = (
                f"{architecture} SAE imported from {source} ({loaded.source_format}), not "
                f"trained by saeflow: d_sae {sae.cfg.d_sae}, on {lm.name} {hook_name(layer)}. "
                f"On {MEASURE_TOKENS} tokens of the {DEFAULT_CORPUS} corpus's eval region: L0 "
                f"{metrics['l0']:.2f}, explained variance {metrics['explained_variance']:.3f}."
            )
        else:
            description = (
                f"Random-init control of {loaded.extra_tags['baseline_of']}: {architecture}, "
                f"d_sae {sae.cfg.d_sae}, on {lm.name} {hook_name(layer)}, untrained; centred "
                f"like a fresh SAE and calibrated ({calibration.knob} = "
                f"{calibration.value:.6g}) to the reference's L0 {calibration.reference_l0:.2f}"
                f". On {_calibration_data()}: L0 {metrics['l0']:.2f}, explained variance "
                f"{metrics['explained_variance']:.3f}."
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
