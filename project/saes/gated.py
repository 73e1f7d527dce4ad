"""Gated SAE (Rajamanoharan et al. 2024a).

A gate path decides which latents fire, a magnitude path (the same ``W_enc`` rescaled per
latent by ``exp(r_mag)``) how strongly:
``f = [W_encᵀ x_c + b_gate > 0] · ReLU((W_enc · exp(r_mag))ᵀ x_c + b_mag)``, x_c = x - b_dec.

Loss: ``‖x - x̂‖² + λ Σ_i ReLU(π_gate)_i ‖W_dec,i‖ + ‖x - x̂_gate‖²`` where
``x̂_gate = ReLU(π_gate) W_dec + b_dec`` goes through a frozen (detached) copy of the decoder,
as in the paper, so the auxiliary term trains only the gate. λ as in :mod:`project.saes.relu`
(update units, warm-up over ``l1_warmup_fraction``; with ``l1_control="target_l0"`` adapted
toward ``target_l0`` by relu's :class:`~project.saes.relu.L1Controller`). Decoder rows are kept at unit norm.
Saved as SAELens ``gated`` (``b_gate``, ``b_mag``, ``r_mag``; no ``b_enc``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from project.saes.base import (
    SAEConfig,
    SAELoss,
    SparseAutoencoder,
    TrainStep,
    sum_squared_error,
)
from project.saes.relu import L1Controller, initial_gate_bias, l1_lambda, update_l1_control
from project.saes.sparse import SparseLatents, gather_preacts, is_sparse_enough


class GatedSAE(SparseAutoencoder):
    """Gated encoder with weight sharing between gate and magnitude paths."""

    architecture = "gated"
    saelens_architecture = "gated"
    saelens_training_architecture = "gated"
    has_b_enc = False
    training_state_names = (
        "tokens_since_fired_F",
        "l1_controller.log_gain",
        "l1_controller.last_log_l0",
        "l1_controller.slope",
    )

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        dtype = cfg.torch_dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.l1_controller = L1Controller()

    def _initialize_from_data(self, x_ND: Tensor) -> None:
        # Under L0 control the gate starts at L0 = 2 · target_l0 (see project.saes.relu).
        bias_F = initial_gate_bias(self, self.center(x_ND) @ self.W_enc)
        if bias_F is not None:
            self.b_gate.copy_(bias_F)

    def gate_preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ self.W_enc + self.b_gate

    def mag_preacts(self, xc_BD: Tensor) -> Tensor:
        return xc_BD @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode(self, x_BD: Tensor) -> Tensor:
        # SAELens GatedSAE.encode, operation for operation.
        xc_BD = self.center(x_BD)
        active_BF = (self.gate_preacts(xc_BD) > 0).to(xc_BD.dtype)
        return active_BF * self.mag_preacts(xc_BD).relu()

    def loss(self, x_BD: Tensor, step: TrainStep) -> SAELoss:
        x_BD = x_BD.to(self.W_enc.dtype)
        batch = x_BD.shape[0]
        xc_BD = self.center(x_BD)
        enc_BF = xc_BD @ self.W_enc
        pi_gate_BF = enc_BF + self.b_gate  # = gate_preacts(xc_BD), op for op
        open_BF = pi_gate_BF.detach() > 0
        norm_F = self.W_dec.norm(dim=-1)
        if is_sparse_enough(open_BF, self.sparse_max_density):
            # Every term's gradient lives on the open gates: the magnitude path is masked by
            # them, and ReLU(π_gate) is 0 elsewhere (project.saes.sparse).
            latents = SparseLatents.from_mask(open_BF)
            # The gathered values are the bias-free W_encᵀ x_c; b_gate only gives the dtype.
            enc_N = gather_preacts(
                xc_BD, self.W_enc, self.b_gate.detach(), enc_BF.detach(), latents
            )
            # (W_enc · exp(r_mag))ᵀ x_c = exp(r_mag) · W_encᵀ x_c: one B×D×F product less.
            f_N = (
                enc_N * latents.per_entry(self.r_mag.exp()) + latents.per_entry(self.b_mag)
            ).relu()
            gate_N = (enc_N + latents.per_entry(self.b_gate)).relu()
            x_hat_BD = latents.decode(f_N, self.W_dec) + self.b_dec
            l1 = (gate_N * latents.per_entry(norm_F)).sum() / batch
            x_hat_gate_BD = latents.decode(gate_N, self.W_dec.detach()) + self.b_dec.detach()
            fired = latents.select(f_N.detach() > 0)
            self.record_firing(fired.col_N, batch)
            l0 = x_BD.new_tensor(fired.col_N.numel() / batch)
            f_BF: Tensor | Callable[[], Tensor] = lambda: latents.dense(f_N)  # noqa: E731
        else:
            f_BF = open_BF.to(x_BD.dtype) * self.mag_preacts(xc_BD).relu()
            x_hat_BD = self.decode(f_BF)
            gate_BF = pi_gate_BF.relu()
            l1 = (gate_BF * norm_F).sum(dim=-1).mean()
            x_hat_gate_BD = gate_BF @ self.W_dec.detach() + self.b_dec.detach()
            active_BF = f_BF.detach() > 0
            self.record_firing(active_BF.any(dim=0), batch)
            l0 = active_BF.sum(dim=-1).to(x_BD.dtype).mean()
        mse = sum_squared_error(x_hat_BD, x_BD)
        aux_recon = sum_squared_error(x_hat_gate_BD, x_BD)
        lam = l1_lambda(self, x_BD, step)
        update_l1_control(self, l0, step)
        return SAELoss(
            loss=mse + lam * l1 + aux_recon,
            mse=mse,
            l0=l0,
            x_hat_BD=x_hat_BD,
            f_BF=f_BF,
            aux={
                "l1": l1.detach(),
                "l1_lambda": torch.as_tensor(lam).detach(),
                "aux_gate": aux_recon.detach(),
            },
        )

    def saelens_tensors(self) -> dict[str, Tensor]:
        tensors = super().saelens_tensors()
        for name in ("b_gate", "b_mag", "r_mag"):
            tensors[name] = getattr(self, name).detach().contiguous()
        return tensors
