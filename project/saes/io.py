"""SAELens v6 directory format: ``cfg.json`` + ``sae_weights.safetensors``.

``save_sae`` writes what ``sae_lens.SAE.load_from_disk`` reads (same encode/decode), plus:

- ``cfg.json["saeflow"]``: the whole :class:`SAEConfig` (SAELens ignores unknown keys), so
  ``load_sae_dir`` restores the training architecture (batchtopk and matryoshka are
  ``jumprelu`` to SAELens, relu is ``standard``);
- ``saeflow_state.safetensors`` (only when needed): saeflow state SAELens has no slot for,
  e.g. JumpReLU's ``log_threshold`` (``threshold`` = exp of it would not round-trip bit for
  bit) and BatchTopK's running threshold statistics.

``load_sae_dir`` reads with safetensors only (never unpickles) and also loads directories
written by SAELens itself (architectures standard, topk, jumprelu, gated).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from project.saes.base import NORMALIZE_CHOICES, SAEConfig, SparseAutoencoder

logger = logging.getLogger(__name__)

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAEFLOW_STATE_FILENAME = "saeflow_state.safetensors"

# SAELens inference architecture -> the saeflow class that reproduces it.
SAELENS_TO_SAEFLOW = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# SAELens cfg keys that older versions kept at top level instead of under "metadata".
_LLM_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "model_from_pretrained_kwargs",
    "neuronpedia_id",
)


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae`` as a SAELens v6 directory (created if missing); returns its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = sae.saelens_tensors()
    save_file(tensors, path / SAE_WEIGHTS_FILENAME, metadata={"format": "pt"})
    extra = {
        name: value.detach().contiguous()
        for name, value in sae.state_dict().items()
        if name not in tensors
    }
    state_path = path / SAEFLOW_STATE_FILENAME
    if extra:
        save_file(extra, state_path, metadata={"format": "pt"})
    elif state_path.exists():
        state_path.unlink()  # a stale file from an earlier save would be loaded back
    with open(path / SAE_CFG_FILENAME, "w") as f:
        json.dump(sae.saelens_cfg(), f, indent=2)
    logger.info("saved %s SAE to %s", sae.cfg.architecture, path)
    return path


def load_sae_dir(directory: str | Path) -> SparseAutoencoder:
    """Load a SAELens-format directory (saeflow- or SAELens-written) in eval mode."""
    path = Path(directory)
    cfg_path = path / SAE_CFG_FILENAME
    weights_path = path / SAE_WEIGHTS_FILENAME
    for required in (cfg_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: not a SAELens SAE directory")
    with open(cfg_path) as f:
        cfg_dict: dict[str, Any] = json.load(f)
    sae = SparseAutoencoder.from_saelens(cfg_dict, load_file(weights_path))
    state_path = path / SAEFLOW_STATE_FILENAME
    if "saeflow" in cfg_dict and state_path.is_file():
        extra = load_file(state_path)
        unknown = sorted(set(extra) - set(sae.state_dict()))
        if unknown:
            raise ValueError(
                f"{state_path} holds tensors {unknown} unknown to {type(sae).__name__}"
            )
        sae.copy_tensors(extra)
    return sae.eval()


def saeflow_config_from_saelens(cfg_dict: dict[str, Any]) -> SAEConfig:
    """The saeflow config of a ``cfg.json``: the stored one, or one derived from SAELens keys."""
    if "saeflow" in cfg_dict:
        return SAEConfig.from_dict(cfg_dict["saeflow"])
    architecture = cfg_dict.get("architecture")
    k = cfg_dict.get("k")
    if architecture is None:  # pre-6.0 SAELens config
        is_topk = cfg_dict.get("activation_fn", cfg_dict.get("activation_fn_str")) == "topk"
        architecture = "topk" if is_topk else "standard"
        if is_topk:
            k = (cfg_dict.get("activation_fn_kwargs") or {}).get("k")
    if architecture not in SAELENS_TO_SAEFLOW:
        raise ValueError(
            f"SAELens architecture {architecture!r} is not supported; "
            f"supported: {sorted(SAELENS_TO_SAEFLOW)}"
        )
    normalize = cfg_dict.get("normalize_activations") or "none"
    if isinstance(normalize, bool):  # pre-6.0 flag
        normalize = "expected_average_only_in" if normalize else "none"
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(
            f"normalize_activations={normalize!r} needs run-time normalisation saeflow does not "
            f"implement; supported: {list(NORMALIZE_CHOICES)}"
        )
    if cfg_dict.get("reshape_activations", "none") != "none":
        logger.warning(
            "reshape_activations=%r: saeflow takes the flattened [.., d_in] activations",
            cfg_dict["reshape_activations"],
        )
    metadata = dict(cfg_dict.get("metadata") or {})
    for key in _LLM_METADATA_KEYS:
        if key in cfg_dict and key not in metadata:
            metadata[key] = cfg_dict[key]
    dtype = str(cfg_dict.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig(
        architecture=SAELENS_TO_SAEFLOW[architecture],
        d_in=int(cfg_dict["d_in"]),
        d_sae=int(cfg_dict["d_sae"]),
        k=int(k) if architecture == "topk" and k is not None else None,
        dtype=dtype,
        apply_b_dec_to_input=bool(cfg_dict.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        metadata=metadata,
    )
