"""JumpReLU SAE (Rajamanoharan et al. 2024b).

Encoder ``f = z · H(z - θ)`` with ``z = W_encᵀ (x - b_dec) + b_enc`` and a learned per-latent
threshold θ, trained as ``log_threshold`` (θ = exp(log θ) stays positive) and stored as
``threshold``. The step has no gradient, so θ learns through straight-through estimators with
a rectangle kernel K of bandwidth ε:

- ``∂f/∂θ ≈ -(θ/ε) K((z - θ)/ε)`` for the reconstruction term (paper);
- ``∂H(z - θ)/∂θ ≈ -(1/ε) K((z - θ)/ε)`` for the L0 term, and with ``jumprelu_ste_to_input``
  (default) the opposite gradient to z, so to the encoder, as in Anthropic's variant.

Units. The paper's ε = 1e-3 and initial θ = 1e-3 refer to activations scaled to unit mean
squared norm; saeflow trains on raw activations and multiplies both by the batch's
``sqrt(E‖x‖²)`` (the same scale-out as relu's λ).

Sparsity penalty (saeflow's choice; the paper's plain ``λ·L0`` cannot aim at an L0):
``c · E‖x‖² · (L0/target_l0 - 1)²`` with L0 the batch mean, c = ``l0_coefficient`` (0.1).
Why it lands near the target: with a log-parameterised θ, Adam moves θ by a factor of at
most ``e^lr`` per step (≤ 16% over 500 steps at lr 3e-4), far slower than the encoder drifts,
so a penalty reaching θ alone left L0 35% under target on SmolLM2-135M layer-3 activations
after 500 steps (L0 21 for target 32, explained variance 0.899); through the encoder it
holds L0 within ~5% (L0 30, explained variance 0.889, no dead latents). The factor E‖x‖² is the paper's normalisation
(mse/E‖x‖² + ...), which keeps c unit-free.

``initialize_from_data`` sets each θ to the per-latent quantile of its pre-activations that
starts training at L0 = ``INIT_L0_FACTOR`` · target_l0 (the paper starts near θ = 0, i.e.
L0 ≈ d_sae/2, which a short run could never bring down); the penalty brings L0 to the target
within a few hundred steps. Without that call θ starts at ``jumprelu_init_threshold`` in raw
units. Inference equals SAELens' ``JumpReLUSAE.encode``: ``ReLU(z) · [z > θ]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from project.saes.base import (
    SAEConfig,
    SAELoss,
    SparseAutoencoder,
    TrainStep,
    firing_quantile,
    sum_squared_error,
)
from project.saes.sparse import SparseLatents, gather_preacts, is_sparse_enough

# initialize_from_data starts the L0 at this multiple of target_l0: latents learn while they
# fire and the penalty brings L0 down within a few hundred steps; starting at the target
# itself let ~15% of the latents die early on SmolLM2 activations (none died from 2x).
INIT_L0_FACTOR = 2.0


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z · H(z - θ)``; θ's gradient through the rectangle-kernel estimator.

    θ is either per latent (``theta_F`` broadcast over a dense ``z_BF``) or per entry (the
    sparse path's gathered ``theta_N``): its gradient is summed to θ's shape.
    """

    @staticmethod
    def forward(ctx: Any, z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        return z_BF * (z_BF > theta_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        z_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z_BF > theta_F).to(grad_BF.dtype) * grad_BF
        kernel_BF = _rectangle((z_BF - theta_F) / eps)
        grad_theta = -(theta_F / eps) * (kernel_BF * grad_BF).sum_to_size(theta_F.shape)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(z - θ)``; gradient to θ, and to z when ``ste_to_input`` (Anthropic's variant)."""

    @staticmethod
    def forward(
        ctx: Any, z_BF: Tensor, theta_F: Tensor, bandwidth: float, ste_to_input: bool
    ) -> Tensor:
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        return (z_BF > theta_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        z_BF, theta_F = ctx.saved_tensors
        # H depends on z - θ only, so the estimator's z-gradient is minus its θ-gradient.
        ste_BF = _rectangle((z_BF - theta_F) / ctx.bandwidth) * grad_BF / ctx.bandwidth
        grad_z = ste_BF if ctx.ste_to_input else None
        return grad_z, -ste_BF.sum_to_size(theta_F.shape), None, None


class JumpReLUSAE(SparseAutoencoder):
    """Learned per-latent thresholds with an L0 penalty aimed at ``target_l0``."""

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    saelens_training_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), dtype=cfg.torch_dtype)
        )

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        if cfg.target_l0 is None and cfg.k is not None:
            cfg.target_l0 = float(cfg.k)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.preacts(self.center(x_BD))
        # SAELens JumpReLUSAE.encode, operation for operation.
        return pre_BF.relu() * (pre_BF > self.threshold).to(pre_BF.dtype)

    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        target = self.cfg.target_l0
        if target is None:
            raise ValueError("training a jumprelu SAE needs target_l0 (0 < target_l0 < d_sae)")
        x_BD = x_BD.to(self.W_enc.dtype)
        batch = x_BD.shape[0]
        # The paper's units: activations scaled to unit mean squared norm.
        sq_norm = x_BD.detach().pow(2).sum(dim=-1).mean()
        bandwidth = self.cfg.jumprelu_bandwidth * float(sq_norm.sqrt())
        xc_BD = self.center(x_BD)
        pre_BF = self.preacts(xc_BD)
        theta_F = self.threshold
        with torch.no_grad():
            # Entries with a gradient: the active ones and those inside the kernel's window.
            above_BF = pre_BF > theta_F
            near_BF = _rectangle((pre_BF - theta_F) / bandwidth).bool()
            graded_BF = above_BF | near_BF
        ste = self.cfg.jumprelu_ste_to_input
        if is_sparse_enough(graded_BF, self.sparse_max_density):
            latents = SparseLatents.from_mask(graded_BF)
            z_N = gather_preacts(xc_BD, self.W_enc, self.b_enc, pre_BF.detach(), latents)
            theta_N = latents.per_entry(theta_F)
            f_N = _JumpReLU.apply(z_N, theta_N, bandwidth)
            x_hat_BD = latents.decode(f_N, self.W_dec) + self.b_dec
            l0 = _Step.apply(z_N, theta_N, bandwidth, ste).sum() / batch
            fired = latents.select(f_N.detach() > 0)
            self.record_firing(fired.col_N, batch)
            f_BF: Tensor | Callable[[], Tensor] = lambda: latents.dense(f_N)  # noqa: E731
        else:
            f_BF = _JumpReLU.apply(pre_BF, theta_F, bandwidth)
            x_hat_BD = self.decode(f_BF)
            l0 = _Step.apply(pre_BF, theta_F, bandwidth, ste).sum(dim=-1).mean()
            self.record_firing((f_BF.detach() > 0).any(dim=0), batch)
        mse = sum_squared_error(x_hat_BD, x_BD)
        penalty = self.cfg.l0_coefficient * sq_norm * (l0 / target - 1) ** 2
        return SAELoss(
            loss=mse + penalty,
            mse=mse,
            l0=l0.detach(),
            x_hat_BD=x_hat_BD,
            f_BF=f_BF,
            aux={"l0_penalty": penalty.detach(), "threshold_mean": theta_F.detach().mean()},
        )

    @torch.no_grad()
    def _initialize_from_data(self, x_ND: Tensor) -> None:
        target = self.cfg.target_l0
        if target is None:
            return
        pre_NF = self.preacts(self.center(x_ND))
        init_l0 = min(INIT_L0_FACTOR * target, self.cfg.d_sae / 2)
        theta_F = firing_quantile(pre_NF, init_l0)
        # θ must be positive (it is exp(log θ)): latents whose quantile is not start at the
        # paper's initial threshold, converted to raw units.
        floor = self.cfg.jumprelu_init_threshold * float(x_ND.pow(2).sum(dim=-1).mean().sqrt())
        self.log_threshold.copy_(torch.where(theta_F > 0, theta_F, floor).log())

    # ----------------------------------------------------------------- SAELens format
    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.detach().contiguous()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.check_saelens_names(tensors)
        tensors = dict(tensors)
        # θ ≤ 0 behaves like θ = 0 in ReLU(z)·[z > θ]; log(0) = -inf gives exactly θ = 0.
        theta_F = tensors.pop("threshold").clamp_min(0)
        self.copy_tensors({**tensors, "log_threshold": theta_F.log()})

    @classmethod
    def convert_saelens_tensors(
        cls, cfg_dict: dict[str, Any], tensors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Older SAELens JumpReLU checkpoints store ``log_threshold`` instead of ``threshold``."""
        if "log_threshold" in tensors and "threshold" not in tensors:
            tensors = dict(tensors)
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors
