"""Convert a dictionary_learning checkpoint directory into a saeflow SAE.

dictionary_learning (github.com/saprmarks/dictionary_learning) saves a trained dictionary as a
directory with

- ``ae.pt``: ``torch.save(ae.state_dict())``, read here with ``weights_only=True`` so a file
  holding anything but tensors is refused instead of unpickled;
- ``config.json``: ``{"trainer": trainer.config, "buffer": buffer.config}``; the trainer part
  names ``dict_class`` (and ``trainer_class``), ``activation_dim``, ``dict_size``, ``k``,
  ``layer``, ``lm_name`` and ``submodule_name``; the buffer part ``io`` ("out" = the module's
  output) and ``ctx_len``.

Supported classes and their state-dict keys (shapes: D activation_dim, F dict_size):

==========================  ==========  ======================================================
dict_class                  saeflow     keys
==========================  ==========  ======================================================
AutoEncoder                 relu        encoder.weight [F,D], encoder.bias [F],
                                        decoder.weight [D,F], bias [D]
AutoEncoderNew              relu        encoder.weight, encoder.bias, decoder.weight,
                                        decoder.bias [D] (no input centring)
AutoEncoderTopK             topk        encoder.*, decoder.weight, b_dec [D]; buffers k, threshold
BatchTopKSAE                batchtopk   as TopK; the scalar ``threshold`` is the inference
                                        threshold (must have been set, i.e. >= 0)
MatryoshkaBatchTopKSAE      matryoshka  W_enc [D,F], b_enc, W_dec [F,D], b_dec, k, threshold,
                                        group_sizes (prefixes = their cumulative sums)
JumpReluAutoEncoder         jumprelu    W_enc, b_enc, W_dec, b_dec, threshold [F]
                                        (no input centring)
GatedAutoEncoder            gated       encoder.weight, decoder.weight, decoder_bias, r_mag,
                                        gate_bias, mag_bias
==========================  ==========  ======================================================

The converted SAE gives the same ``encode``/``decode`` as dictionary_learning's own class in
its inference mode (BatchTopK and Matryoshka: ``use_threshold=True``; TopK: per-token top-k).
One deliberate difference, which matches ``AutoEncoder.from_pretrained`` (its default
``normalize_decoder=True``): a standard ``AutoEncoder`` whose decoder columns are not unit norm
gets the norms folded into the encoder, so its latents are in "unit decoder" units while
``decode(encode(x))`` is unchanged.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from project.saes import SAEConfig, SparseAutoencoder, build_sae
from project.saes.base import DTYPES

logger = logging.getLogger(__name__)

AE_FILENAME = "ae.pt"
CONFIG_FILENAME = "config.json"


@dataclass(frozen=True)
class _Layout:
    """How one dictionary_learning class maps onto a saeflow architecture."""

    architecture: str
    keys: frozenset[str]
    optional: frozenset[str] = frozenset()
    # Key holding the encoder weight and whether it is stored [F, D] (nn.Linear) or [D, F].
    encoder_key: str = "encoder.weight"
    encoder_is_linear: bool = True


_LINEAR_TOPK_KEYS = frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"})
_PARAM_KEYS = frozenset({"W_enc", "b_enc", "W_dec", "b_dec"})
LAYOUTS: dict[str, _Layout] = {
    "AutoEncoder": _Layout(
        "relu", frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "bias"})
    ),
    "AutoEncoderNew": _Layout(
        "relu", frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"})
    ),
    # Older versions keep k as a plain attribute and have no threshold buffer.
    "AutoEncoderTopK": _Layout("topk", _LINEAR_TOPK_KEYS, frozenset({"k", "threshold"})),
    "BatchTopKSAE": _Layout("batchtopk", _LINEAR_TOPK_KEYS | {"threshold"}, frozenset({"k"})),
    "MatryoshkaBatchTopKSAE": _Layout(
        "matryoshka",
        _PARAM_KEYS | {"threshold", "group_sizes"},
        frozenset({"k"}),
        encoder_key="W_enc",
        encoder_is_linear=False,
    ),
    "JumpReluAutoEncoder": _Layout(
        "jumprelu", _PARAM_KEYS | {"threshold"}, encoder_key="W_enc", encoder_is_linear=False
    ),
    "GatedAutoEncoder": _Layout(
        "gated",
        frozenset(
            {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"}
        ),
    ),
}
# Trainer classes whose config lacks a dict_class (older checkpoints) -> their default class.
TRAINER_DICT_CLASSES = {
    "StandardTrainer": "AutoEncoder",
    "StandardTrainerAprilUpdate": "AutoEncoder",
    "PAnnealTrainer": "AutoEncoder",
    "TrainerTopK": "AutoEncoderTopK",
    "TopKTrainer": "AutoEncoderTopK",
    "TrainerBatchTopK": "BatchTopKSAE",
    "BatchTopKTrainer": "BatchTopKSAE",
    "MatryoshkaBatchTopKTrainer": "MatryoshkaBatchTopKSAE",
    "TrainerJumpRelu": "JumpReluAutoEncoder",
    "JumpReluTrainer": "JumpReluAutoEncoder",
    "GatedSAETrainer": "GatedAutoEncoder",
    "GatedAnnealTrainer": "GatedAutoEncoder",
}
_K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")


@dataclass
class DictionaryLearningCheckpoint:
    """A converted checkpoint and what its config says about where it belongs.

    ``hook_name`` is in TransformerLens form (``blocks.L.hook_resid_post`` /
    ``hook_resid_pre``) when the config names a residual-stream site, else the raw
    ``submodule_name``, or None when the config says nothing.
    """

    sae: SparseAutoencoder
    dict_class: str
    lm_name: str | None
    hook_name: str | None
    config: dict[str, Any] = field(default_factory=dict)


def is_checkpoint_dir(path: str | Path) -> bool:
    """True if ``path`` holds ``ae.pt`` and ``config.json``."""
    p = Path(path)
    return (p / AE_FILENAME).is_file() and (p / CONFIG_FILENAME).is_file()


def load_checkpoint(directory: str | Path) -> DictionaryLearningCheckpoint:
    """Read and convert a dictionary_learning checkpoint directory (eval mode).

    Raises:
        ValueError: a file is missing or unreadable, the class is unknown, keys or shapes do
            not match the class, a tensor is not finite, or a threshold is missing/unset.
    """
    path = Path(directory)
    if not is_checkpoint_dir(path):
        raise ValueError(
            f"{path} is not a dictionary_learning checkpoint: it needs {AE_FILENAME} and "
            f"{CONFIG_FILENAME}"
        )
    try:
        config = json.loads((path / CONFIG_FILENAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG_FILENAME} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILENAME} must hold a JSON object")
    trainer: dict[str, Any] = config.get("trainer", config)
    buffer: dict[str, Any] = config.get("buffer") or {}
    state = _load_state_dict(path / AE_FILENAME)
    dict_class = _dict_class(trainer, state, path)
    sae = convert_state_dict(state, dict_class, trainer, where=str(path / AE_FILENAME))
    lm_name = trainer.get("lm_name")
    hook = _hook_name(trainer, buffer)
    sae.cfg.metadata.update(
        {
            key: value
            for key, value in {
                "model_name": lm_name,
                "hook_name": hook,
                "context_size": buffer.get("ctx_len"),
                "dictionary_learning_class": dict_class,
                "dictionary_learning_trainer": trainer.get("trainer_class"),
            }.items()
            if value is not None
        }
    )
    return DictionaryLearningCheckpoint(
        sae=sae, dict_class=dict_class, lm_name=lm_name, hook_name=hook, config=config
    )


def convert_state_dict(
    state: dict[str, Tensor],
    dict_class: str,
    trainer: dict[str, Any] | None = None,
    *,
    where: str = "state dict",
) -> SparseAutoencoder:
    """A saeflow SAE (eval mode) from a dictionary_learning ``state_dict`` of ``dict_class``.

    ``trainer`` (config.json's "trainer") supplies ``k``/``target_l0`` where the state dict
    lacks them and is checked against the tensors' sizes.
    """
    trainer = trainer or {}
    layout = LAYOUTS.get(dict_class)
    if layout is None:
        raise ValueError(
            f"dictionary_learning class {dict_class!r} is not supported; supported: "
            f"{sorted(LAYOUTS)}"
        )
    _check_keys(state, layout, dict_class, where)
    _check_finite(state, where)

    enc = state[layout.encoder_key]
    if enc.ndim != 2:
        raise ValueError(f"{where}: {layout.encoder_key} must be 2-D, has shape {tuple(enc.shape)}")
    d_sae, d_in = enc.shape if layout.encoder_is_linear else enc.shape[::-1]
    for name, size in (("activation_dim", d_in), ("dict_size", d_sae)):
        declared = trainer.get(name)
        if declared is not None and int(declared) != size:
            raise ValueError(
                f"{where}: config {name}={declared} does not match the weights ({size})"
            )
    _check_shapes(state, d_in, d_sae, where)
    dtype = _dtype_name(enc.dtype)
    tensors, extra = _saelens_tensors(layout, dict_class, state, d_sae, where)

    k = _k(state, trainer, where) if layout.architecture in _K_ARCHITECTURES else None
    target_l0 = trainer.get("target_l0")
    cfg = SAEConfig(
        architecture=layout.architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        target_l0=float(target_l0) if target_l0 is not None and k is None else None,
        dtype=dtype,
        metadata={},
        **extra,
    )
    sae = build_sae(cfg)
    target = cfg.torch_dtype
    sae.load_saelens_tensors({name: t.to(target) for name, t in tensors.items()})
    return sae.eval()


# ---------------------------------------------------------------------------------------------
# reading


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        # weights_only refuses arbitrary pickled objects (code execution on load).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} is not a plain torch state_dict that loads with weights_only=True "
            f"(saeflow never unpickles arbitrary objects): {err}"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} must hold a state_dict (a dict of name -> tensor)")
    # torch.compile'd modules prefix every key.
    return {name.removeprefix("_orig_mod."): t for name, t in state.items()}


def _dict_class(trainer: dict[str, Any], state: dict[str, Tensor], path: Path) -> str:
    """The class named by the config, its trainer's default, or the one the keys fit."""
    named = trainer.get("dict_class")
    if named:
        # Some configs hold the class repr, "<class 'dictionary_learning.dictionary.X'>".
        return re.findall(r"\w+", str(named))[-1]
    trainer_class = trainer.get("trainer_class")
    if trainer_class in TRAINER_DICT_CLASSES:
        return TRAINER_DICT_CLASSES[trainer_class]
    keys = set(state)
    fits = [
        name
        for name, layout in LAYOUTS.items()
        if layout.keys <= keys <= layout.keys | layout.optional
    ]
    if len(fits) == 1:
        logger.info("%s names no dict_class; its keys fit %s", path, fits[0])
        return fits[0]
    raise ValueError(
        f"{path / CONFIG_FILENAME} names no trainer.dict_class and the state-dict keys "
        f"{sorted(keys)} do not identify one (candidates: {fits or sorted(LAYOUTS)})"
    )


def _hook_name(trainer: dict[str, Any], buffer: dict[str, Any]) -> str | None:
    """The residual-stream hook in TransformerLens form, or the raw submodule name."""
    layer = trainer.get("layer")
    submodule = trainer.get("submodule_name")
    io = buffer.get("io", "out")
    if io not in ("in", "out"):
        raise ValueError(
            f"buffer io={io!r}: only SAEs on a module's input or output are supported "
            "(transcoders, io='in_and_out', are not)"
        )
    side = "pre" if io == "in" else "post"
    if submodule is None:
        return None if layer is None else f"blocks.{int(layer)}.hook_resid_{side}"
    submodule = str(submodule)
    named = re.fullmatch(r"resid_(post|pre)_layer_(\d+)", submodule)
    block = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)$", submodule)
    if named:
        side, number = named.group(1), int(named.group(2))
    elif block:
        number = int(block.group(1))
    else:
        return submodule  # not recognisably residual: the importer rejects it by name
    if layer is not None and int(layer) != number:
        raise ValueError(
            f"config layer={layer} contradicts submodule_name={submodule!r} (layer {number})"
        )
    return f"blocks.{number}.hook_resid_{side}"


# ---------------------------------------------------------------------------------------------
# checks


def _check_keys(state: dict[str, Tensor], layout: _Layout, dict_class: str, where: str) -> None:
    keys = set(state)
    missing = sorted(layout.keys - keys)
    if "threshold" in missing:
        raise ValueError(
            f"{where}: the {dict_class} checkpoint has no 'threshold' tensor; a "
            f"{layout.architecture} SAE needs its inference threshold"
        )
    if missing:
        raise ValueError(f"{where}: {dict_class} keys {missing} are missing (has {sorted(keys)})")
    unexpected = sorted(keys - layout.keys - layout.optional)
    if unexpected:
        # Ignoring them could silently change the SAE (e.g. whitening buffers act_mean).
        raise ValueError(
            f"{where}: unexpected keys {unexpected} for {dict_class}; supported keys: "
            f"{sorted(layout.keys | layout.optional)}"
        )


def _check_finite(state: dict[str, Tensor], where: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf)")


def _check_shapes(state: dict[str, Tensor], d_in: int, d_sae: int, where: str) -> None:
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_in, d_sae),
        "decoder.bias": (d_in,),
        "bias": (d_in,),
        "b_dec": (d_in,),
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "decoder_bias": (d_in,),
        "r_mag": (d_sae,),
        "gate_bias": (d_sae,),
        "mag_bias": (d_sae,),
    }
    for name, t in state.items():
        shape = expected.get(name)
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} "
                f"(activation_dim {d_in}, dict_size {d_sae})"
            )


def _k(state: dict[str, Tensor], trainer: dict[str, Any], where: str) -> int:
    in_state = int(state["k"].item()) if "k" in state else None
    in_config = trainer.get("k")
    if in_state is None and in_config is None:
        raise ValueError(f"{where}: neither the state dict nor config.json gives k")
    if in_state is not None and in_config is not None and int(in_config) != in_state:
        # The buffer is what the module uses (the trainer's k is a target when k is annealed).
        logger.warning(
            "%s: config k=%s but state-dict k=%d; using %d", where, in_config, in_state, in_state
        )
    return in_state if in_state is not None else int(in_config)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"weights of dtype {dtype} are not supported; supported: {sorted(DTYPES)}")


# ---------------------------------------------------------------------------------------------
# conversion


def _saelens_tensors(
    layout: _Layout,
    dict_class: str,
    state: dict[str, Tensor],
    d_sae: int,
    where: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """SAELens-named tensors for ``load_saelens_tensors`` and the SAEConfig fields they need."""
    s = {name: t.detach() for name, t in state.items()}
    extra: dict[str, Any] = {}
    if layout.encoder_is_linear:
        W_enc_DF = s["encoder.weight"].T
        W_dec_FD = s["decoder.weight"].T
    else:
        W_enc_DF, W_dec_FD = s["W_enc"], s["W_dec"]

    if dict_class == "AutoEncoder":
        b_enc_F = s["encoder.bias"]
        norm_F = W_dec_FD.norm(dim=-1)
        if not torch.allclose(norm_F, torch.ones_like(norm_F), atol=1e-4):
            # As AutoEncoder.from_pretrained(normalize_decoder=True) does; zero rows stay.
            norm_F = torch.where(norm_F > 0, norm_F, torch.ones_like(norm_F))
            W_enc_DF, b_enc_F = W_enc_DF * norm_F, b_enc_F * norm_F
            W_dec_FD = W_dec_FD / norm_F[:, None]
            logger.info("%s: folded decoder norms into the encoder (unit-norm decoder)", where)
        tensors = {"W_enc": W_enc_DF, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": s["bias"]}
    elif dict_class == "AutoEncoderNew":
        tensors = {
            "W_enc": W_enc_DF,
            "b_enc": s["encoder.bias"],
            "W_dec": W_dec_FD,
            "b_dec": s["decoder.bias"],
        }
        extra["apply_b_dec_to_input"] = False
    elif dict_class == "GatedAutoEncoder":
        tensors = {
            "W_enc": W_enc_DF,
            "W_dec": W_dec_FD,
            "b_dec": s["decoder_bias"],
            "b_gate": s["gate_bias"],
            "b_mag": s["mag_bias"],
            "r_mag": s["r_mag"],
        }
    elif dict_class == "JumpReluAutoEncoder":
        threshold_F = s["threshold"]
        if tuple(threshold_F.shape) != (d_sae,):
            raise ValueError(
                f"{where}: threshold has shape {tuple(threshold_F.shape)}, expected ({d_sae},)"
            )
        tensors = {
            "W_enc": W_enc_DF,
            "b_enc": s["b_enc"],
            "W_dec": W_dec_FD,
            "b_dec": s["b_dec"],
            "threshold": threshold_F,
        }
        # dictionary_learning's JumpReLU never subtracts b_dec from the input.
        extra["apply_b_dec_to_input"] = False
    else:  # TopK, BatchTopK, Matryoshka: centred input, bias on the encoder
        b_enc_F = s["encoder.bias"] if layout.encoder_is_linear else s["b_enc"]
        tensors = {"W_enc": W_enc_DF, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": s["b_dec"]}
        if layout.architecture in ("batchtopk", "matryoshka"):
            theta = s["threshold"]
            if theta.numel() != 1 or float(theta.item()) < 0:
                value = theta.flatten()[:3].tolist()
                raise ValueError(
                    f"{where}: the {dict_class} inference threshold is {value}: it was never "
                    "set during training (dictionary_learning starts it at -1), so the SAE has "
                    "no per-token inference mode"
                )
            tensors["threshold"] = theta.reshape(()).expand(d_sae).clone()
        if layout.architecture == "matryoshka":
            sizes = [int(v) for v in s["group_sizes"].tolist()]
            if sum(sizes) != d_sae or any(v <= 0 for v in sizes):
                raise ValueError(
                    f"{where}: group_sizes {sizes} must be positive and sum to dict_size {d_sae}"
                )
            ends = torch.tensor(sizes).cumsum(0).tolist()
            extra["matryoshka_prefixes"] = [int(v) for v in ends]
    return {name: t.contiguous() for name, t in tensors.items()}, extra
