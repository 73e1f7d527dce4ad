"""TopK SAE (Gao et al. 2024): keep each token's k largest pre-activations, ReLU them.

Encoder ``TopK(W_encᵀ (x - b_dec) + b_enc)``; sparsity is set by ``k`` alone. Dead latents
(no firing in ``dead_tokens_threshold`` tokens) are revived by AuxK: the ``aux_k`` (d_in/2)
largest dead pre-activations reconstruct the main residual ``x - x̂`` through the decoder
(no bias), weighted by ``aux_k_coefficient`` = 1/32.

Inference equals SAELens' ``TopKSAE.encode``: top-k of the pre-activations, then ReLU, so a
token whose k-th largest pre-activation is negative has fewer than k active latents (L0 is k
whenever at least k pre-activations are positive, which training makes the norm).

Training runs the sparse path of :mod:`project.saes.sparse` (dense encoder forward only);
:class:`BatchTopKSAE` and :class:`MatryoshkaSAE` reuse it through the hooks
``select_latents`` and ``reconstruct``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from project.saes.base import (
    SAEConfig,
    SAELoss,
    SparseAutoencoder,
    TrainStep,
    sum_squared_error,
)
from project.saes.sparse import SparseLatents, gather_preacts


def require_k(cfg: SAEConfig) -> None:
    """TopK-family check: ``k`` given, and ``target_l0`` (if given) equal to it."""
    if cfg.k is None:
        raise ValueError(
            f"architecture {cfg.architecture!r} needs k (the target L0), 0 < k < d_sae={cfg.d_sae}"
        )
    if cfg.target_l0 is None:
        cfg.target_l0 = float(cfg.k)
    elif cfg.target_l0 != cfg.k:
        raise ValueError(
            f"target_l0={cfg.target_l0!r} must equal k={cfg.k!r} for {cfg.architecture!r}"
        )


class TopKSAE(SparseAutoencoder):
    """Per-token TopK with AuxK; saved as SAELens ``topk``."""

    architecture = "topk"
    saelens_architecture = "topk"
    saelens_training_architecture = "topk"

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        require_k(cfg)

    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return self.cfg.k

    def preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.preacts(self.center(x_BD))
        val_BK, idx_BK = pre_BF.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, val_BK.relu())

    # ----------------------------------------------------------------- training hooks
    def select_latents(self, pre_BF: Tensor, step: TrainStep) -> SparseLatents:
        """Which latents a training batch keeps (no grad)."""
        idx_BK = pre_BF.topk(self.k, dim=-1, sorted=False).indices
        return SparseLatents.from_rows(idx_BK, self.cfg.d_sae)

    def reconstruct(
        self, x_BD: Tensor, latents: SparseLatents, val_N: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(x̂, mse, reconstruction loss, extra logs); Matryoshka's loss adds its prefixes."""
        x_hat_BD = latents.decode(val_N, self.W_dec) + self.b_dec
        mse = sum_squared_error(x_hat_BD, x_BD)
        return x_hat_BD, mse, mse, {}

    def after_selection(self, val_N: Tensor, step: TrainStep) -> dict[str, Tensor]:
        """Running statistics of the kept values (BatchTopK's threshold)."""
        return {}

    # ----------------------------------------------------------------- loss
    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        x_BD = x_BD.to(self.W_enc.dtype)
        batch = x_BD.shape[0]
        xc_BD = self.center(x_BD)
        with torch.no_grad():
            # addmm fuses the bias (one B×F pass less); encode() keeps SAELens' `@ +`.
            pre_BF = torch.addmm(self.b_enc, xc_BD, self.W_enc)
            latents = self.select_latents(pre_BF, step)
        val_N = gather_preacts(xc_BD, self.W_enc, self.b_enc, pre_BF, latents).relu()
        x_hat_BD, mse, recon_loss, aux = self.reconstruct(x_BD, latents, val_N)
        auxk = self.auxk_loss(x_BD, x_hat_BD, xc_BD, pre_BF)
        loss = recon_loss + self.cfg.aux_k_coefficient * auxk
        fired_N = val_N.detach() > 0
        self.record_firing(latents.col_N[fired_N], batch)
        aux.update(self.after_selection(val_N.detach(), step))
        aux["auxk_loss"] = auxk.detach()
        return SAELoss(
            loss=loss,
            mse=mse,
            l0=fired_N.sum().to(x_BD.dtype) / batch,
            x_hat_BD=x_hat_BD,
            f_BF=lambda: latents.dense(val_N),
            aux=aux,
        )

    def auxk_loss(self, x_BD: Tensor, x_hat_BD: Tensor, xc_BD: Tensor, pre_BF: Tensor) -> Tensor:
        """Gao et al.'s AuxK: the top ``aux_k`` dead latents reconstruct the residual."""
        dead_F = self.dead_mask()
        n_dead = int(dead_F.sum())
        if n_dead == 0 or self.cfg.aux_k_coefficient == 0 or not self.training:
            return x_BD.new_zeros(())
        assert self.cfg.aux_k is not None
        k_aux = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            idx_BK = pre_BF.masked_fill(~dead_F, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            aux_latents = SparseLatents.from_rows(idx_BK.indices, self.cfg.d_sae)
        val_N = gather_preacts(xc_BD, self.W_enc, self.b_enc, pre_BF, aux_latents).relu()
        residual_hat_BD = aux_latents.decode(val_N, self.W_dec)
        return sum_squared_error(residual_hat_BD, (x_BD - x_hat_BD).detach())

    # ----------------------------------------------------------------- SAELens format
    def _saelens_cfg_extra(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def convert_saelens_tensors(
        cls, cfg_dict: dict[str, Any], tensors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """SAELens TopK may rank ``pre · ‖W_dec,i‖`` and decode with ``f / ‖W_dec,i‖``
        (``rescale_acts_by_decoder_norm``); folding the norms gives the same encode/decode."""
        if not cfg_dict.get("rescale_acts_by_decoder_norm", False):
            return tensors
        norm_F = tensors["W_dec"].norm(dim=-1)
        out = dict(tensors)
        out["W_enc"] = tensors["W_enc"] * norm_F
        out["b_enc"] = tensors["b_enc"] * norm_F
        out["W_dec"] = tensors["W_dec"] / norm_F[:, None]
        return out
