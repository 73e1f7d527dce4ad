"""The typed configuration of one SAE training, validated at the edge.

Every field is an `mlflow run -e train` parameter. Checks that need nothing loaded run in
:meth:`TrainConfig.validate`; checks that need the LM's width (``target_l0 < d_sae``) run in
:meth:`TrainConfig.validate_for_width` right after the LM loads and before any harvest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from project.checks import check_device, resolved_device
from project.corpus import DEFAULT_CORPUS
from project.lm import DEFAULT_LM
from project.saes import ARCHITECTURES

# Architectures whose sparsity is set by k (exact L0) rather than a penalty.
K_ARCHITECTURES = frozenset({"topk", "batchtopk", "matryoshka"})
# Architectures whose sparsity comes from an L1 penalty: λ is adapted toward target_l0 unless
# l1_coefficient fixes it.
L1_ARCHITECTURES = frozenset({"relu", "gated"})
# The inference threshold of BatchTopK/Matryoshka: METHODS' running mean, or calibrated
# after training on a sample of training activations (exact L0 = k there).
THRESHOLD_CHOICES = ("running_mean", "calibrated")
# Where and how the SAE trains (issue 19's GPU path): Lightning's accelerator and precision.
# "auto" is CUDA when torch sees a GPU, else the CPU; bf16-mixed autocasts the SAE's matmuls
# to bfloat16 with fp32 weights and optimiser state (Lightning's "bf16-mixed").
PRECISION_CHOICES = ("32-true", "bf16-mixed")
# ``ddp``: data-parallel over ``devices`` processes (gloo on CPU, NCCL on GPUs), each rank a
# slice of every global batch; ``auto``: one device.
STRATEGY_CHOICES = ("auto", "ddp")
# Auto dead-latent window: this fraction of the training tokens, within [2 batches, 10M]. The
# libraries' windows are 0.2-3% of their typical runs (SAELens 1000 steps, dictionary_learning
# 10M tokens of ~500M); 10M is Gao et al.'s window.
DEAD_WINDOW_FRACTION = 0.02
DEAD_WINDOW_MIN_BATCHES = 2
DEAD_WINDOW_MAX = 10_000_000


@dataclass
class TrainConfig:
    """One SAE training: where the activations come from, the SAE, and the optimiser."""

    model: str = DEFAULT_LM
    layer: int = 4
    dataset: str = DEFAULT_CORPUS
    text_column: str = "text"
    n_tokens: int = 200_000
    context_size: int = 128
    architecture: str = "topk"
    target_l0: int = 32
    expansion: int = 8
    # relu/gated λ: 0 = adapted during training so that L0 reaches target_l0 (starting from
    # the architecture's default λ); > 0 = this λ, fixed (L0 then follows λ, target_l0 is nominal).
    l1_coefficient: float = 0.0
    lr: float = 3e-4
    batch_size: int = 2048
    # Activation vectors seen in training; 0 = auto (several passes over a small cache, see
    # `resolved_training_tokens`), so that short harvests still give a trained SAE.
    training_tokens: int = 0
    warmup_steps: int = 1000  # METHODS §1; capped at 10% of the steps for short runs
    decay_fraction: float = 0.2  # linear decay to 0 over the last 20% of steps
    val_fraction: float = 0.05  # tail of the cache held out for the final metrics
    registered_model: str = "auto"  # "auto" = derived from the LM and hook
    cache_dir: str = ""  # "" = $SAEFLOW_CACHE_DIR/activations; may be s3://bucket/prefix
    checkpoint_dir: str = ""  # "" = ./.saeflow/checkpoints/<run id>
    # Steps between checkpoints, each also logged as the run's artifact checkpoints/last.ckpt
    # (so a job killed on one machine resumes on another); 0 = auto: max(50, a tenth of the run).
    checkpoint_every_n_steps: int = 0
    seed: int = 0
    # A latent is dead when it has not fired in this many training tokens; 0 = auto:
    # 2% of the training tokens, at least two batches, at most 10M (Gao et al.'s window).
    dead_tokens_window: int = 0
    batchtopk_threshold: str = "running_mean"  # or "calibrated" (see THRESHOLD_CHOICES)
    log_every_n_steps: int = 10
    device: str = "cpu"  # see DEVICE_CHOICES
    precision: str = "32-true"  # see PRECISION_CHOICES
    # torch.compile the SAE's training loss (and its inference encode/decode); the first steps
    # pay the compilation, later ones run the fused graph.
    compile: bool = False
    # Processes training this one SAE (strategy ``ddp``): batch_size and the token budget stay
    # the totals; each rank takes batch_size / devices rows of every batch.
    devices: int = 1
    strategy: str = "auto"

    def validate(self) -> None:
        """Fail on values that are wrong whatever the LM, naming the value and the choices."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is unknown; valid: {sorted(ARCHITECTURES)}"
            )
        positive_ints = ("n_tokens", "expansion", "batch_size", "log_every_n_steps")
        for name in positive_ints:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.target_l0 <= 0:
            raise ValueError(f"target_l0={self.target_l0} must be > 0 (and < d_sae)")
        if self.layer < 0:
            raise ValueError(f"layer={self.layer} must be >= 0")
        if self.context_size < 2:
            raise ValueError(f"context_size={self.context_size} must be >= 2")
        if self.checkpoint_every_n_steps < 0:
            raise ValueError(
                f"checkpoint_every_n_steps={self.checkpoint_every_n_steps} must be >= 0 (0 = auto)"
            )
        if self.training_tokens < 0:
            raise ValueError(f"training_tokens={self.training_tokens} must be >= 0 (0 = auto)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a finite positive number")
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise ValueError(f"l1_coefficient={self.l1_coefficient} must be >= 0 (0 = default)")
        if not 0 <= self.decay_fraction < 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in [0, 1)")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 0.5)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.dead_tokens_window < 0:
            raise ValueError(
                f"dead_tokens_window={self.dead_tokens_window} must be >= 0 (0 = auto)"
            )
        check_device(self.device)
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(
                f"precision={self.precision!r} is not supported; valid: {list(PRECISION_CHOICES)}"
            )
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(
                f"strategy={self.strategy!r} is not supported; valid: {list(STRATEGY_CHOICES)}"
            )
        if self.devices < 1 or (self.devices > 1) != (self.strategy == "ddp"):
            raise ValueError(
                f"devices={self.devices} with strategy={self.strategy!r}: give devices=1 with "
                "strategy=auto, or devices >= 2 with strategy=ddp"
            )
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size={self.batch_size} must split evenly over devices={self.devices}"
            )
        if self.batchtopk_threshold not in THRESHOLD_CHOICES:
            raise ValueError(
                f"batchtopk_threshold={self.batchtopk_threshold!r} is not supported; "
                f"valid: {list(THRESHOLD_CHOICES)}"
            )

    def validate_for_width(self, d_in: int) -> None:
        """Checks that need the LM's residual width."""
        d_sae = self.expansion * d_in
        if self.target_l0 >= d_sae:
            raise ValueError(
                f"target_l0={self.target_l0} must be < d_sae={d_sae} "
                f"(expansion {self.expansion} x d_in {d_in})"
            )

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``: what ``auto`` means on this machine."""
        return resolved_device(self.device)

    def resolved_training_tokens(self) -> int:
        """Auto: at least 500k activation vectors (several passes over a small cache), or one pass."""
        if self.training_tokens:
            return self.training_tokens
        return max(self.n_tokens, 500_000)

    def resolved_dead_tokens_window(self) -> int:
        """Auto: 2% of the training tokens, within [2 batches, 10M] (a fixed 1M window is longer
        than a 400k-token run, so no latent could ever count as dead and AuxK never engaged)."""
        if self.dead_tokens_window:
            return self.dead_tokens_window
        auto = int(DEAD_WINDOW_FRACTION * self.resolved_training_tokens())
        return min(DEAD_WINDOW_MAX, max(DEAD_WINDOW_MIN_BATCHES * self.batch_size, auto))

    def as_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
