"""ReLU SAE, Anthropic's April-2024 update recipe.

Encoder ``ReLU(W_encᵀ (x - b_dec) + b_enc)``; loss ``‖x - x̂‖² + λ Σ_i f_i ‖W_dec,i‖`` with λ
ramped linearly from 0 over the first ``l1_warmup_fraction`` (5%) of the steps. Decoder norms
are left free (the penalty weights each latent by its norm), as in the update; set
``unit_norm_decoder=True`` for the older constrained recipe.

λ is in the update's units (inputs scaled to E‖x‖ = √d_in, where λ = 5 is its value): on raw
activations saeflow applies ``λ · mean‖x‖ / √d_in`` with the batch's mean norm, which is the
update's loss on normalised inputs up to a constant factor. Saved as SAELens ``standard``.

A fixed λ sets L0 only indirectly (λ = 5 leaves SmolLM2 SAEs at L0 ≈ 850 after 400k tokens).
With ``l1_control="target_l0"`` an :class:`L1Controller` multiplies λ by ``exp(g)`` and adapts
``g`` every training step from the batch L0 (see there); the warm-up ramp still applies on top.
The controller cannot bring a dense start (L0 ≈ d_sae/2 at b_enc = 0) down to a small target
within a short run (after 30 of 200 SmolLM2 steps λ had grown 35-fold and L0 had not moved),
so under it ``initialize_from_data`` also starts each latent firing on a share
``INIT_L0_FACTOR · target_l0 / d_sae`` of a data sample (b_enc = minus that quantile of its
pre-activations, as JumpReLU's initial thresholds); a fixed λ keeps the update's b_enc = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

# Under L0 control, initialize_from_data starts L0 at this multiple of target_l0 (JumpReLU's).
INIT_L0_FACTOR = 2.0


class L1Controller(nn.Module):
    """Adapts λ so that a relu/gated SAE's L0 reaches ``target_l0`` (``l1_control="target_l0"``).

    λ = ``l1_coefficient`` · exp(g). After the λ warm-up, every training step adds
    ``rate · (e + HORIZON · ė)`` to g, with ``e = log L0_batch - log target_l0`` and ``ė`` the
    smoothed per-step change of log L0 (EMA, momentum ``SLOPE_MOMENTUM``): an integral
    controller in log space (λ grows while L0 is above target, shrinks below; its fixed point
    is L0 = target whatever λ that takes) acting on the L0 predicted ``HORIZON`` steps ahead.
    L0 lags λ by tens of steps through Adam: on SmolLM2 (196 steps) a controller on the
    present error alone kept raising λ while L0 fell from 70 to 34, and L0 went on down to
    20 for a target of 32; the prediction brakes while L0 is already falling fast. During the
    warm-up g stays put (the ramp alone moves L0; integrating then would wind g up). g is
    clamped to ±``MAX_LOG_GAIN``.

    State (``log_gain``, ``last_log_l0``, ``slope``) is training state: kept in checkpoints,
    not saved with the SAE (inference needs no λ).
    """

    MAX_LOG_GAIN = 12.0
    HORIZON = 20.0
    SLOPE_MOMENTUM = 0.8

    log_gain: Tensor
    last_log_l0: Tensor
    slope: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("log_gain", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer(
            "last_log_l0", torch.full((), math.nan, dtype=torch.float64), persistent=False
        )
        self.register_buffer("slope", torch.zeros((), dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def update(self, l0: float, target: float, rate: float, warming_up: bool) -> None:
        log_l0 = math.log(max(l0, 0.5))
        last = float(self.last_log_l0)
        self.last_log_l0.fill_(log_l0)
        if not math.isnan(last):
            m = self.SLOPE_MOMENTUM
            self.slope.mul_(m).add_((1 - m) * (log_l0 - last))
        if warming_up:
            return
        predicted_error = log_l0 - math.log(target) + self.HORIZON * float(self.slope)
        self.log_gain.add_(rate * predicted_error).clamp_(-self.MAX_LOG_GAIN, self.MAX_LOG_GAIN)


def l1_lambda(sae: SparseAutoencoder, x_BD: Tensor, step: TrainStep) -> Tensor:
    """λ on raw activations: config λ × controller gain × warm-up × the batch's mean ‖x‖ / √d_in
    (detached)."""
    scale = x_BD.detach().norm(dim=-1).mean() / math.sqrt(sae.cfg.d_in)
    gain = math.exp(float(sae.l1_controller.log_gain)) if sae.cfg.l1_control != "fixed" else 1.0
    return sae.cfg.l1_coefficient * gain * sae.l1_warmup(step) * scale


@torch.no_grad()
def initial_gate_bias(sae: SparseAutoencoder, pre_NF: Tensor) -> Tensor | None:
    """Under L0 control: the bias that starts L0 at ``INIT_L0_FACTOR · target_l0``."""
    if sae.cfg.l1_control == "fixed" or sae.cfg.target_l0 is None:
        return None
    init_l0 = min(INIT_L0_FACTOR * sae.cfg.target_l0, sae.cfg.d_sae / 2)
    return -firing_quantile(pre_NF, init_l0)


def update_l1_control(sae: SparseAutoencoder, l0: Tensor, step: TrainStep) -> None:
    """After a training step's forward: let the controller see the batch L0 (train mode only)."""
    if sae.cfg.l1_control == "fixed" or not sae.training:
        return
    assert sae.cfg.target_l0 is not None
    sae.l1_controller.update(
        float(l0), sae.cfg.target_l0, sae.cfg.l1_control_rate, sae.l1_warmup(step) < 1.0
    )


class ReLUSAE(SparseAutoencoder):
    """The "standard" SAE with the decoder-norm-weighted L1 penalty."""

    architecture = "relu"
    saelens_architecture = "standard"
    saelens_training_architecture = "standard"
    default_unit_norm_decoder = False
    training_state_names = (
        "tokens_since_fired_F",
        "l1_controller.log_gain",
        "l1_controller.last_log_l0",
        "l1_controller.slope",
    )

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.l1_controller = L1Controller()

    def preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.preacts(self.center(x_BD)).relu()

    def _initialize_from_data(self, x_ND: Tensor) -> None:
        bias_F = initial_gate_bias(self, self.center(x_ND) @ self.W_enc)
        if bias_F is not None:
            self.b_enc.copy_(bias_F)

    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        x_BD = x_BD.to(self.W_enc.dtype)
        batch = x_BD.shape[0]
        xc_BD = self.center(x_BD)
        pre_BF = self.preacts(xc_BD)
        active_BF = pre_BF.detach() > 0
        if is_sparse_enough(active_BF, self.sparse_max_density):
            # Only active latents carry a gradient (ReLU's is 0 elsewhere): decode and
            # backpropagate through those alone (project.saes.sparse).
            latents = SparseLatents.from_mask(active_BF)
            val_N = gather_preacts(xc_BD, self.W_enc, self.b_enc, pre_BF.detach(), latents)
            x_hat_BD = latents.decode(val_N, self.W_dec) + self.b_dec
            l1 = (val_N * latents.per_entry(self.W_dec.norm(dim=-1))).sum() / batch
            self.record_firing(latents.col_N, batch)
            l0 = x_BD.new_tensor(latents.col_N.numel() / batch)
            f_BF: Tensor | Callable[[], Tensor] = lambda: latents.dense(val_N)  # noqa: E731
        else:
            f_BF = pre_BF.relu()
            x_hat_BD = self.decode(f_BF)
            l1 = (f_BF * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
            self.record_firing(active_BF.any(dim=0), batch)
            l0 = active_BF.sum(dim=-1).to(x_BD.dtype).mean()
        mse = sum_squared_error(x_hat_BD, x_BD)
        lam = l1_lambda(self, x_BD, step)
        update_l1_control(self, l0, step)
        return SAELoss(
            loss=mse + lam * l1,
            mse=mse,
            l0=l0,
            x_hat_BD=x_hat_BD,
            f_BF=f_BF,
            aux={"l1": l1.detach(), "l1_lambda": torch.as_tensor(lam).detach()},
        )
