"""ReLU SAE, Anthropic's April-2024 update recipe.

Encoder ``ReLU(W_encᵀ (x - b_dec) + b_enc)``; loss ``‖x - x̂‖² + λ Σ_i f_i ‖W_dec,i‖`` with λ
ramped linearly from 0 over the first ``l1_warmup_fraction`` (5%) of the steps. Decoder norms
are left free (the penalty weights each latent by its norm), as in the update; set
``unit_norm_decoder=True`` for the older constrained recipe.

λ is in the update's units (inputs scaled to E‖x‖ = √d_in, where λ = 5 is its value): on raw
activations saeflow applies ``λ · mean‖x‖ / √d_in`` with the batch's mean norm, which is the
update's loss on normalised inputs up to a constant factor. Saved as SAELens ``standard``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from project.saes.base import (
    SAELoss,
    SparseAutoencoder,
    TrainStep,
    sum_squared_error,
)


def l1_lambda(sae: SparseAutoencoder, x_BD: Tensor, step: TrainStep) -> Tensor:
    """λ on raw activations: config λ × warm-up × the batch's mean ‖x‖ / √d_in (detached)."""
    scale = x_BD.detach().norm(dim=-1).mean() / math.sqrt(sae.cfg.d_in)
    return sae.cfg.l1_coefficient * sae.l1_warmup(step) * scale


class ReLUSAE(SparseAutoencoder):
    """The "standard" SAE with the decoder-norm-weighted L1 penalty."""

    architecture = "relu"
    saelens_architecture = "standard"
    saelens_training_architecture = "standard"
    default_unit_norm_decoder = False

    def preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.preacts(self.center(x_BD)).relu()

    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        x_BD = x_BD.to(self.W_enc.dtype)
        f_BF = self.encode(x_BD)
        x_hat_BD = self.decode(f_BF)
        mse = sum_squared_error(x_hat_BD, x_BD)
        l1 = (f_BF * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        lam = l1_lambda(self, x_BD, step)
        active_BF = f_BF.detach() > 0
        self.record_firing(active_BF.any(dim=0), x_BD.shape[0])
        return SAELoss(
            loss=mse + lam * l1,
            mse=mse,
            l0=active_BF.sum(dim=-1).to(x_BD.dtype).mean(),
            x_hat_BD=x_hat_BD,
            f_BF=f_BF,
            aux={"l1": l1.detach(), "l1_lambda": torch.as_tensor(lam).detach()},
        )
