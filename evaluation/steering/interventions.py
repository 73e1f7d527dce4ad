"""Steering interventions on the residual stream (METHODS.md §3), per generation row.

- addition (AxBench's default): ``x ← x + α·m_i·v_i`` — :class:`project.generation.AddVectors`
  with one vector per row (DiffMean and the random direction use it too);
- clamping: encode x, set latent i to ``α·m_i``, decode, add the SAE error back. Because the
  decoder is linear this is ``x + (α·m_i − f_i(x))·W_dec[i]``: only f_i(x) needs the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from project.generation import AddVectors
from project.saes import SparseAutoencoder

__all__ = ["AddVectors", "ClampLatent", "unit_decoder_rows"]


def unit_decoder_rows(sae: SparseAutoencoder, latents: list[int]) -> Tensor:
    """``v_i``: the decoder rows of ``latents`` scaled to unit length, [len(latents), d_in]."""
    rows_LD = sae.W_dec.detach()[latents].float()
    return rows_LD / rows_LD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class ClampLatent:
    """Per row r: latent ``latents_N[r]`` clamped to ``values_N[r]`` at every position, the SAE
    error kept. A row with latent -1 is left unchanged (an unsteered row in a mixed batch)."""

    sae: SparseAutoencoder
    latents_N: Tensor
    values_N: Tensor

    @torch.no_grad()
    def __call__(self, hidden_BTD: Tensor, rows_B: Tensor) -> Tensor:
        # The SAE encodes in its own dtype on its own device (float32 on the CPU, while the LM
        # may run bfloat16 on a GPU); the edit goes back in the hidden state's.
        W_FD = self.sae.W_dec.detach()
        rows_B = rows_B.to(self.latents_N.device)
        latents_B = self.latents_N[rows_B].to(W_FD.device)
        active_B = latents_B >= 0
        if not bool(active_B.any()):
            return hidden_BTD
        B, T, D = hidden_BTD.shape
        x_ND = hidden_BTD.reshape(B * T, D).to(W_FD.device, W_FD.dtype)
        f_BTF = self.sae.encode(x_ND).reshape(B, T, -1)
        safe_B = latents_B.clamp_min(0)
        current_BT = f_BTF.gather(2, safe_B[:, None, None].expand(B, T, 1))[..., 0]
        values_B = self.values_N[rows_B].to(current_BT.device, current_BT.dtype)
        delta_BT = (values_B[:, None] - current_BT) * active_B[:, None]
        edit_BTD = delta_BT[..., None] * W_FD[safe_B][:, None, :]
        return hidden_BTD + edit_BTD.to(hidden_BTD.device, hidden_BTD.dtype)
