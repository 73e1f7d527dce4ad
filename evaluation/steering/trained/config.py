"""What a trained method is (:class:`TrainedConfig`), what training returns
(:class:`TrainedAdapter`), its parameter count and its files."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from project.checks import check_int, check_ints
from project.lm import LoadedLM, decoder_blocks

METHODS = ("lora", "loreft")
# AxBench's layers on Gemma-2-2B (26 blocks), which default_layers scales to another depth.
AXBENCH_LAYERS = (5, 10, 15, 20)
AXBENCH_N_LAYERS = 26
# AxBench's LoReFT positions: the first 5 and last 5 prompt tokens (f5+l5).
LOREFT_FIRST = 5
LOREFT_LAST = 5
# AxBench's LoRA target: the attention output projection of each chosen block.
LORA_TARGET = "o_proj"
# The CPU defaults' lr, measured on SmolLM2 (bench/bench_trained.py, 3 epochs of 36 pairs, the
# held-out response loss): LoRA gains little past 5e-3 (1e-2 only overfits the pairs more);
# LoReFT fails to learn at 1e-2 (its intervention starts random: Wh + b − Rh ≠ 0) and is about
# as good at 3e-3 as at 5e-3, so it takes the one further from that edge. AxBench's lrs too put
# LoReFT's at or below LoRA's.
_DEFAULT_LR = {"lora": 5e-3, "loreft": 3e-3}


def default_layers(n_layers: int) -> tuple[int, ...]:
    """AxBench's layers 5/10/15/20 of Gemma-2-2B's 26 blocks at the same relative depth in an LM
    of ``n_layers`` blocks: ``⌊l · n_layers / 26 + ½⌋`` for each, clipped to the last block,
    duplicates (small LMs) dropped. 26 blocks give 5/10/15/20, SmolLM2's 30 give 6/12/17/23, a
    4-block test LM 1/2/3."""
    check_int("n_layers", n_layers, 1)
    scaled = (
        min(n_layers - 1, math.floor(layer * n_layers / AXBENCH_N_LAYERS + 0.5))
        for layer in AXBENCH_LAYERS
    )
    return tuple(sorted(set(scaled)))


@dataclass(frozen=True)
class TrainedConfig:
    """One trained steering method, with defaults for this 2-core CPU (bench/bench_trained.py).

    AxBench's paper scale (Gemma-2-2B): ``rank=4``, ``lora_alpha=32``, ``lora_dropout=0.05``,
    layers 5/10/15/20, ``lr=9e-4``, ``epochs=24``, ``batch_size=36``, responses cut to 128
    tokens: about 24 minutes a concept for SmolLM2 here. The CPU budget is 8 epochs (32 steps
    for a concept's 24 pairs) with responses cut to 64 tokens at a higher lr (``lr=None``:
    5e-3 for LoRA, 3e-3 for LoReFT): ~15k tokens, ~75 s a concept on SmolLM2 at ~200 tokens/s.
    At 3 epochs (the budget until stop 28) LoRA's concept lead over the unsteered model in a
    20-concept comparison was 0.09 [0.00, 0.19]; at 8 it is 0.22 [0.09, 0.36] (README,
    ``compare``): 3 epochs learnt the concept texts' register, not their topic.

    - ``method``: ``lora`` (rsLoRA on the ``o_proj`` of each layer, via ``peft``) or
      ``loreft`` (``h + Rᵀ(Wh + b − Rh)`` at each layer's block output, on the first and last
      five prompt positions only).
    - ``layers``: decoder blocks; empty means :func:`default_layers` of the LM.
    - ``lora_alpha`` and ``lora_dropout``: LoRA only (rsLoRA's scaling is ``alpha/√rank``).
    - ``lr``: AdamW's peak lr, decayed linearly to 0 with no warm-up; None: the method's
      CPU default.
    - ``max_response_tokens``: each response (with its EOS) cut to this many tokens.
    """

    method: str = "lora"
    rank: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    layers: tuple[int, ...] = ()
    lr: float | None = None
    epochs: int = 8
    batch_size: int = 6
    max_response_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {', '.join(METHODS)}")
        check_ints(self, {"rank": 1, "epochs": 1, "batch_size": 1, "max_response_tokens": 1})
        check_int("seed", self.seed, 0)
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a number > 0")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must lie in [0, 1)")
        if self.lr is not None and (not _is_number(self.lr) or not 0 < self.lr <= 1):
            raise ValueError(f"lr={self.lr!r} must lie in (0, 1], or be None (the default)")
        if isinstance(self.layers, list):  # a list from a caller or JSON: the same layers
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple):
            raise ValueError(f"layers={self.layers!r} must be a tuple of block indices")
        for layer in self.layers:
            check_int("layers[...]", layer, 0)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers!r} names a block twice")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's CPU default."""
        return float(self.lr) if self.lr is not None else _DEFAULT_LR[self.method]


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_layers(config: TrainedConfig, n_layers: int) -> tuple[int, ...]:
    """The blocks ``config`` trains at in an LM of ``n_layers`` blocks (sorted), or a
    ValueError naming the first that is out of range."""
    layers = config.layers or default_layers(n_layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: the LM has {n_layers} decoder blocks, valid "
                f"layers are 0..{n_layers - 1}"
            )
    return tuple(sorted(layers))


def lora_target(lm: LoadedLM, layer: int) -> str:
    """The name, inside block ``layer``, of the module LoRA adapts (AxBench: ``o_proj``)."""
    names = [
        name
        for name, module in decoder_blocks(lm.model)[layer].named_modules()
        if name.split(".")[-1] == LORA_TARGET and isinstance(module, torch.nn.Linear)
    ]
    if len(names) != 1:
        raise ValueError(
            f"LoRA adapts the {LORA_TARGET!r} linear module of each block, but block {layer} of "
            f"{lm.name} has {len(names)} such modules ({names}); LoRA needs a Llama-style LM"
        )
    return names[0]


def trainable_parameters(config: TrainedConfig, lm: LoadedLM) -> int:
    """What ``config`` trains on ``lm``: ``rank · (d_in + d_out)`` per layer for LoRA (A and B
    of ``o_proj``), ``2 · rank · d_model + rank`` for LoReFT (R, W and b). SmolLM2 at four
    layers, rank 4: 18,432 and 18,448."""
    total = 0
    for layer in check_layers(config, lm.n_layers):
        if config.method == "lora":
            module = decoder_blocks(lm.model)[layer].get_submodule(lora_target(lm, layer))
            total += config.rank * (module.in_features + module.out_features)
        else:
            total += 2 * config.rank * lm.d_model + config.rank
    return total


@dataclass(frozen=True, eq=False)
class TrainedAdapter:
    """A trained method's weights as plain tensors, and how its training went.

    ``tensors`` by layer ``L``: LoRA ``layers.L.lora_A`` [rank, d_in] and ``layers.L.lora_B``
    [d_out, rank], applied as ``o_proj(x) + scaling · B A x`` to the module ``target`` of
    block L; LoReFT ``layers.L.R`` [rank, d_model] (orthonormal rows), ``layers.L.W``
    [rank, d_model] and ``layers.L.b`` [rank], applied as ``h + Rᵀ(Wh + b − Rh)`` to block L's
    output. ``losses``: the training loss of every optimiser step; ``n_tokens`` and ``seconds``:
    what training went through (real tokens, padding left out) and how long it took.
    """

    config: TrainedConfig
    tensors: dict[str, Tensor]
    d_model: int
    scaling: float = 1.0
    target: str = ""
    lm_name: str = ""
    losses: tuple[float, ...] = ()
    n_tokens: int = 0
    seconds: float = 0.0

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({int(name.split(".")[1]) for name in self.tensors}))

    @property
    def n_parameters(self) -> int:
        """Trainable parameters (:func:`trainable_parameters`)."""
        return sum(t.numel() for t in self.tensors.values())

    def lora(self, layer: int) -> tuple[Tensor, Tensor]:
        """(A [rank, d_in], B [d_out, rank]) of ``layer``."""
        return self.tensors[f"layers.{layer}.lora_A"], self.tensors[f"layers.{layer}.lora_B"]

    def loreft(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(R [rank, d_model], W [rank, d_model], b [rank]) of ``layer``."""
        return tuple(self.tensors[f"layers.{layer}.{k}"] for k in ("R", "W", "b"))  # type: ignore[return-value]


_TENSORS_FILE = "adapter.safetensors"
_META_FILE = "adapter.json"


def save_adapter(adapter: TrainedAdapter, path: str | Path) -> Path:
    """Write ``adapter`` into the directory ``path`` (created): its tensors as safetensors, the
    rest as JSON. Returns the directory."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in adapter.tensors.items()},
        str(folder / _TENSORS_FILE),
    )
    meta = {
        "config": asdict(adapter.config),
        "d_model": adapter.d_model,
        "scaling": adapter.scaling,
        "target": adapter.target,
        "lm_name": adapter.lm_name,
        "losses": list(adapter.losses),
        "n_tokens": adapter.n_tokens,
        "seconds": adapter.seconds,
    }
    (folder / _META_FILE).write_text(json.dumps(meta, indent=1))
    return folder


def load_adapter(path: str | Path) -> TrainedAdapter:
    """The adapter :func:`save_adapter` wrote into ``path`` (exactly)."""
    folder = Path(path)
    if not (folder / _TENSORS_FILE).is_file() or not (folder / _META_FILE).is_file():
        raise ValueError(f"{folder} holds no saved adapter ({_TENSORS_FILE} and {_META_FILE})")
    meta = json.loads((folder / _META_FILE).read_text())
    config = TrainedConfig(**{**meta["config"], "layers": tuple(meta["config"]["layers"])})
    return TrainedAdapter(
        config=config,
        tensors=load_file(str(folder / _TENSORS_FILE)),
        d_model=int(meta["d_model"]),
        scaling=float(meta["scaling"]),
        target=str(meta["target"]),
        lm_name=str(meta["lm_name"]),
        losses=tuple(float(x) for x in meta["losses"]),
        n_tokens=int(meta["n_tokens"]),
        seconds=float(meta["seconds"]),
    )


def with_layers(config: TrainedConfig, layers: tuple[int, ...]) -> TrainedConfig:
    """``config`` with its layers resolved (what an adapter records)."""
    return replace(config, layers=tuple(layers))
