"""The shared nouns of every SAE architecture: config, train-step input/output, base module.

Shapes in names: B batch, D d_in, F d_sae, N a data sample, K latents kept per token.
Each architecture lives in its own file and is listed in ``project.saes.ARCHITECTURES``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from project.saes.sparse import SPARSE_MAX_DENSITY

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# SAELens applies "expected_average_only_in" outside the SAE (the scale is folded into the
# weights before saving), so inside the SAE both choices are the identity.
NORMALIZE_CHOICES = ("none", "expected_average_only_in")
# How relu/gated set λ: fixed, or adapted during training so that L0 reaches target_l0.
L1_CONTROLS = ("fixed", "target_l0")


@dataclass
class SAEConfig:
    """Everything that defines one SAE; validated on construction.

    Defaults are the papers' values (METHODS.md §1) unless said otherwise:

    - ``k``: latents kept per token (topk) or on average per token (batchtopk, matryoshka).
    - ``target_l0``: jumprelu's L0 target (falls back to ``k`` if only that is given); for the
      topk family it equals ``k``; for relu/gated the target of ``l1_control="target_l0"``
      (with a fixed λ only a label: their L0 follows λ).
    - ``l1_coefficient`` (relu, gated): λ of the April-2024 update, penalty
      ``λ Σ_i f_i ‖W_dec,i‖`` (the starting λ when ``l1_control="target_l0"``). Anthropic's
      λ = 5 is defined on inputs scaled so that
      E‖x‖ = √d_in; saeflow trains on raw activations and multiplies λ by the batch's
      mean ‖x‖ / √d_in, which is the April loss on normalised inputs divided by a constant
      (with the batch estimating the dataset's mean norm), so 5.0 means the same thing for
      every LM and layer. (Raw-unit equivalent on
      SmolLM2-135M layer 3, mean ‖x‖ ≈ 91 vs √576 = 24: λ_raw ≈ 19.)
    - ``l1_warmup_fraction``: λ ramps linearly from 0 over this fraction of the steps (5%).
    - ``l1_control`` (relu, gated): ``"fixed"`` keeps λ = ``l1_coefficient`` (the papers'
      recipe, where L0 follows λ); ``"target_l0"`` (saeflow's choice) multiplies λ by a gain
      that a controller adapts every training step so that the batch L0 reaches
      ``target_l0`` (see :class:`L1Controller`; ``l1_control_rate`` its integral rate in log
      space per step, 0.05 by default).
    - ``l0_coefficient`` (jumprelu): c in the penalty ``c · E‖x‖² · (L0/target_l0 - 1)²``
      (saeflow's choice, 0.1; see ``project.saes.jumprelu`` for why it lands near the target).
    - ``jumprelu_bandwidth`` / ``jumprelu_init_threshold``: the paper's 1e-3 / 1e-3, in its
      units (activations of unit mean squared norm): saeflow scales the bandwidth by the
      batch's RMS norm; the initial threshold is used as is only without data-dependent init.
      ``jumprelu_ste_to_input``: the L0 estimator also reaches the encoder (default True).
    - ``aux_k_coefficient``: AuxK weight 1/32; ``aux_k``: dead latents used, default d_in // 2
      (Gao et al.).
    - ``threshold_momentum`` / ``threshold_start_step``: BatchTopK's inference threshold is a
      running mean with momentum 0.999 from step 1000; ``threshold_start_fraction``
      (saeflow's choice) brings the start forward to that fraction of a shorter run (see
      ``BatchTopKSAE.threshold_start``).
    - ``matryoshka_prefixes``: nested dictionary sizes, strictly increasing, last = d_sae;
      default SAEBench's group fractions 1/32, 1/16, 1/8, 1/4, 1/2 + 1/32 as cumulative prefixes.
    - ``dead_tokens_threshold``: a latent is dead if it has not fired in this many tokens
      (1M standalone; ``TrainConfig.dead_tokens_window`` scales it with the run).
    - ``unit_norm_decoder``: None = the architecture's default (True except relu, whose April
      recipe leaves decoder norms free and penalises them through the L1 term).
    - ``metadata``: free-form (model_name, hook_name, hook_layer, context_size, ...), written
      to the SAELens ``cfg.json``.
    """

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    target_l0: float | None = None
    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05
    l1_control: str = "fixed"
    l1_control_rate: float = 0.05
    l0_coefficient: float = 0.1
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    jumprelu_ste_to_input: bool = True
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    threshold_momentum: float = 0.999
    threshold_start_step: int = 1000
    threshold_start_fraction: float = 0.1
    matryoshka_prefixes: list[int] | None = None
    dead_tokens_threshold: int = 1_000_000
    unit_norm_decoder: bool | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from project.saes import ARCHITECTURES  # the registry imports this module

        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; valid: {sorted(ARCHITECTURES)}"
            )
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.k is not None:
            _check_sparsity("k", self.k, self.d_sae)
        if self.target_l0 is not None:
            _check_sparsity("target_l0", self.target_l0, self.d_sae)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; valid: {sorted(DTYPES)}")
        if self.normalize_activations not in NORMALIZE_CHOICES:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported; "
                f"valid: {list(NORMALIZE_CHOICES)}"
            )
        _check_range("l1_coefficient", self.l1_coefficient, 0.0, math.inf)
        _check_range("l1_warmup_fraction", self.l1_warmup_fraction, 0.0, 1.0)
        if self.l1_control not in L1_CONTROLS:
            raise ValueError(
                f"l1_control={self.l1_control!r} is not supported; valid: {list(L1_CONTROLS)}"
            )
        if self.l1_control == "target_l0" and self.target_l0 is None:
            raise ValueError('l1_control="target_l0" needs target_l0 (0 < target_l0 < d_sae)')
        _check_range("l1_control_rate", self.l1_control_rate, 0.0, 1.0)
        _check_range("l0_coefficient", self.l0_coefficient, 0.0, math.inf)
        _check_range("aux_k_coefficient", self.aux_k_coefficient, 0.0, math.inf)
        _check_range("threshold_momentum", self.threshold_momentum, 0.0, 1.0)
        _check_range("threshold_start_fraction", self.threshold_start_fraction, 0.0, 1.0)
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)
        if self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k!r} must be a positive integer")
        if self.dead_tokens_threshold <= 0:
            raise ValueError(f"dead_tokens_threshold={self.dead_tokens_threshold!r} must be > 0")
        if self.threshold_start_step < 0:
            raise ValueError(f"threshold_start_step={self.threshold_start_step!r} must be >= 0")
        sae_cls = ARCHITECTURES[self.architecture]
        if self.unit_norm_decoder is None:
            self.unit_norm_decoder = sae_cls.default_unit_norm_decoder
        sae_cls.validate_config(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what is logged as params and written under ``cfg.json["saeflow"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (written by a newer saeflow)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown SAEConfig keys %s", unknown)
        return cls(**{key: value for key, value in data.items() if key in names})


def _check_sparsity(name: str, value: float, d_sae: int) -> None:
    if not 0 < value < d_sae:
        raise ValueError(f"{name}={value!r} must satisfy 0 < {name} < d_sae={d_sae}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high) or math.isnan(value):
        raise ValueError(f"{name}={value!r} must lie in [{low}, {high}]")


@dataclass
class TrainStep:
    """Where training is: ``step`` is the 0-based global step out of ``total_steps``."""

    step: int
    total_steps: int


class SAELoss:
    """One training step's output.

    ``loss`` is what to backpropagate; ``mse`` the per-token squared error summed over d_in and
    averaged over the batch (every architecture's reconstruction term); ``l0`` the mean number
    of active latents per token; ``x_hat_BD`` the reconstruction; ``f_BF`` the latents; ``aux``
    extra scalars to log (already part of ``loss`` where they are penalties; never add them
    again).

    A plain class rather than a dataclass so that ``f_BF`` can be built on first access: the
    sparse TopK-family path never materialises the dense B×F latents unless asked (there
    ``f_BF`` is detached).
    """

    __slots__ = ("_f_BF", "aux", "l0", "loss", "mse", "x_hat_BD")

    def __init__(
        self,
        loss: Tensor,
        mse: Tensor,
        l0: Tensor,
        x_hat_BD: Tensor,
        f_BF: Tensor | Callable[[], Tensor],
        aux: dict[str, Tensor] | None = None,
    ) -> None:
        self.loss = loss
        self.mse = mse
        self.l0 = l0
        self.x_hat_BD = x_hat_BD
        self._f_BF = f_BF
        self.aux = aux if aux is not None else {}

    @property
    def f_BF(self) -> Tensor:
        if not isinstance(self._f_BF, Tensor):
            self._f_BF = self._f_BF()
        return self._f_BF

    def __repr__(self) -> str:
        return (
            f"SAELoss(loss={self.loss.item():.4g}, mse={self.mse.item():.4g}, "
            f"l0={self.l0.item():.4g}, aux={sorted(self.aux)})"
        )


def sum_squared_error(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """‖x - x̂‖² summed over d_in, mean over the batch (SAELens' ``mse_loss``)."""
    return (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def explained_variance(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """``1 - Var(x - x̂)/Var(x)``, variances summed over dimensions (SAEBench)."""
    total = x_BD.var(dim=0).sum()
    return 1 - (x_BD - x_hat_BD).var(dim=0).sum() / total.clamp_min(1e-12)


@torch.no_grad()
def firing_quantile(pre_NF: Tensor, init_l0: float) -> Tensor:
    """Per latent, the pre-activation value exceeded on a share ``init_l0 / F`` of the
    sample's tokens: a threshold (or minus an encoder bias) at which L0 starts at ``init_l0``."""
    n, d_sae = pre_NF.shape
    rank = min(n, max(1, math.ceil(n * (1 - init_l0 / d_sae))))
    return pre_NF.kthvalue(rank, dim=0).values


@torch.no_grad()
def geometric_median(x_ND: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; robust to the few huge-norm tokens residual streams have."""
    x_ND = x_ND.double()
    median_D = x_ND.mean(dim=0)
    for _ in range(max_iter):
        weights_N = 1 / (x_ND - median_D).norm(dim=-1).clamp_min(1e-8)
        new_D = (weights_N[:, None] * x_ND).sum(dim=0) / weights_N.sum()
        shift = (new_D - median_D).norm()
        median_D = new_D
        if shift <= tol * median_D.norm().clamp_min(1.0):
            break
    return median_D


def _sae_lens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - sae-lens is a dep
        return "6.0.0"


class SparseAutoencoder(nn.Module, ABC):
    """Base of every architecture: ``x̂ = W_decᵀ f(x) + b_dec`` with an architecture's encoder.

    Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc
    [d_sae]``, ``b_dec [d_in]``. ``encode`` in eval mode is exactly SAELens' ``encode`` for the
    architecture saved by :meth:`saelens_cfg`; ``loss`` is the training objective.
    """

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    # Name of this architecture in SAELens' ``metadata.training_architecture``.
    saelens_training_architecture: ClassVar[str]
    default_unit_norm_decoder: ClassVar[bool] = True
    has_b_enc: ClassVar[bool] = True
    # relu/jumprelu/gated: a training step takes the sparse path (project.saes.sparse) when
    # at most this share of the batch's latents carry a gradient; 0 forces the dense step.
    sparse_max_density: float = SPARSE_MAX_DENSITY

    tokens_since_fired_F: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs architecture={self.architecture!r}, "
                f"got {cfg.architecture!r}"
            )
        self.cfg = cfg
        dtype = cfg.torch_dtype
        # Random unit-norm decoder rows and W_enc = W_decᵀ (Gao et al.; the April-2024 update).
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, dtype=torch.float32)
        W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD.to(dtype))
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous().to(dtype))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        else:
            self.register_parameter("b_enc", None)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        # Training statistic, not part of the saved SAE (a loaded SAE starts counting afresh);
        # a Lightning checkpoint keeps it through ``training_state`` (resume keeps counting).
        self.register_buffer(
            "tokens_since_fired_F", torch.zeros(cfg.d_sae, dtype=torch.long), persistent=False
        )

    # ----------------------------------------------------------------- config hooks
    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Architecture-specific checks, run by ``SAEConfig.__post_init__``."""

    # ----------------------------------------------------------------- inference
    def center(self, x_BD: Tensor) -> Tensor:
        """SAELens' ``process_sae_in``: cast, subtract ``b_dec`` if ``apply_b_dec_to_input``."""
        x_BD = x_BD.to(self.W_enc.dtype)
        return x_BD - self.b_dec * self.cfg.apply_b_dec_to_input

    @abstractmethod
    def encode(self, x_BD: Tensor) -> Tensor:
        """Latents ``f_BF``; in eval mode identical to SAELens' encode of the saved SAE."""

    def decode(self, f_BF: Tensor) -> Tensor:
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BD))

    # ----------------------------------------------------------------- training
    @abstractmethod
    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        """The training objective on one batch; in train mode also updates running statistics."""

    @torch.no_grad()
    def record_firing(self, fired_F: Tensor, n_tokens: int) -> None:
        """Dead-latent bookkeeping: ``fired_F`` a bool mask or indices of latents that fired."""
        if not self.training:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Data-parallel ranks each saw a slice of the batch: a latent fired if it fired on
            # any rank, and the window counts the whole batch's tokens.
            mask_F = torch.zeros_like(self.tokens_since_fired_F, dtype=torch.int32)
            mask_F[fired_F] = 1
            dist.all_reduce(mask_F, op=dist.ReduceOp.MAX)
            fired_F, n_tokens = mask_F.bool(), n_tokens * dist.get_world_size()
        self.tokens_since_fired_F += n_tokens
        self.tokens_since_fired_F[fired_F] = 0

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired_F >= self.cfg.dead_tokens_threshold

    def dead_fraction(self) -> float:
        """Share of latents that have not fired in the last ``dead_tokens_threshold`` tokens."""
        return self.dead_mask().float().mean().item()

    # Non-persistent training state a resumed training needs (not part of the saved SAE).
    training_state_names: ClassVar[tuple[str, ...]] = ("tokens_since_fired_F",)

    def training_state(self) -> dict[str, Tensor]:
        """Training statistics outside ``state_dict`` (dead-latent counter, λ controller)."""
        return {name: self.get_buffer(name).detach().clone() for name in self.training_state_names}

    @torch.no_grad()
    def load_training_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`training_state`; names this SAE does not have are an error."""
        unknown = sorted(set(state) - set(self.training_state_names))
        if unknown:
            raise ValueError(
                f"training state {unknown} is unknown to {type(self).__name__}; "
                f"expected {list(self.training_state_names)}"
            )
        for name, value in state.items():
            self.get_buffer(name).copy_(value)

    @torch.no_grad()
    def initialize_from_data(self, x_ND: Tensor) -> None:
        """``b_dec`` = geometric median of a sample, then any architecture-specific init."""
        x_ND = x_ND.to(self.W_dec.dtype)
        self.b_dec.copy_(geometric_median(x_ND).to(self.b_dec.dtype))
        self._initialize_from_data(x_ND)

    def _initialize_from_data(self, x_ND: Tensor) -> None:
        """Hook for architectures with more data-dependent init (called without grad)."""

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row."""
        grad_FD = self.W_dec.grad
        if not self.cfg.unit_norm_decoder or grad_FD is None:
            return
        W_FD = self.W_dec.data
        parallel_F1 = (grad_FD * W_FD).sum(dim=-1, keepdim=True)
        grad_FD.sub_(parallel_F1 * W_FD / W_FD.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put decoder rows back on the unit sphere (architectures with a unit-norm decoder)."""
        if self.cfg.unit_norm_decoder:
            self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale: float) -> None:
        """Make an SAE trained on ``scale · x`` act on raw ``x`` (SAELens' fold)."""
        self.W_enc.data *= scale
        self.W_dec.data /= scale
        self.b_dec.data /= scale
        self.cfg.normalize_activations = "none"

    def l1_warmup(self, step: TrainStep) -> float:
        """Linear ramp 0 → 1 over the first ``l1_warmup_fraction`` of the steps."""
        warmup_steps = self.cfg.l1_warmup_fraction * step.total_steps
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, step.step / warmup_steps)

    # ----------------------------------------------------------------- SAELens format
    def saelens_cfg(self) -> dict[str, Any]:
        """``cfg.json`` content: SAELens v6 keys plus ``"saeflow"`` (the whole SAEConfig)."""
        version = _sae_lens_version()
        meta = dict(self.cfg.metadata)
        meta.setdefault("sae_lens_version", version)
        meta.setdefault("sae_lens_training_version", version)
        meta["training_architecture"] = self.saelens_training_architecture
        return {
            "architecture": self.saelens_architecture,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": self.cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
            "normalize_activations": self.cfg.normalize_activations,
            "reshape_activations": "none",
            "metadata": meta,
            **self._saelens_cfg_extra(),
            "saeflow": self.cfg.to_dict(),
        }

    def _saelens_cfg_extra(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def saelens_tensors(self) -> dict[str, Tensor]:
        """Tensors of ``sae_weights.safetensors`` under SAELens' names and shapes."""
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.b_enc is not None:
            tensors["b_enc"] = self.b_enc
        return {name: t.detach().contiguous() for name, t in tensors.items()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`saelens_tensors` (exact: a save/load round trip is bit-identical)."""
        self.check_saelens_names(tensors)
        self.copy_tensors(tensors)

    def check_saelens_names(self, tensors: dict[str, Tensor]) -> None:
        expected = set(self.saelens_tensors())
        if set(tensors) != expected:
            raise ValueError(
                f"{self.architecture} SAE expects tensors {sorted(expected)}, got {sorted(tensors)}"
            )

    @torch.no_grad()
    def copy_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy into parameters/buffers of the same names, checking shapes."""
        for name, value in tensors.items():
            target = getattr(self, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.data.copy_(value)

    @classmethod
    def from_saelens(
        cls, cfg_dict: dict[str, Any], tensors: dict[str, Tensor]
    ) -> SparseAutoencoder:
        """Build from a SAELens ``cfg.json`` dict and its weights (saeflow- or SAELens-written).

        Called on the base class it picks the architecture from ``cfg_dict``; called on a
        subclass it also checks that the directory holds that architecture.
        """
        from project.saes import ARCHITECTURES
        from project.saes.io import saeflow_config_from_saelens

        cfg = saeflow_config_from_saelens(cfg_dict)
        sae_cls = ARCHITECTURES[cfg.architecture]
        if not issubclass(sae_cls, cls):
            raise ValueError(f"the SAELens config holds a {sae_cls.__name__}, not a {cls.__name__}")
        sae = sae_cls(cfg)
        dtype = cfg.torch_dtype
        sae.load_saelens_tensors(
            sae_cls.convert_saelens_tensors(
                cfg_dict, {name: t.to(dtype) for name, t in tensors.items()}
            )
        )
        return sae

    @classmethod
    def convert_saelens_tensors(
        cls, cfg_dict: dict[str, Any], tensors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Hook: turn a third-party SAELens weight dict into this class's saved layout."""
        return tensors

    def extra_repr(self) -> str:
        c = self.cfg
        return f"architecture={c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}"
