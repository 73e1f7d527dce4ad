"""Sparse training path: only the kept (TopK family) or active (L1 families) latents are touched.

A TopK-family batch has N = k·B non-zero latents out of B·F. A dense step spends six B×D×F
matrix products (encoder forward, its weight and input gradients, decoder forward, its two
gradients). Here only the encoder forward stays dense:

- the kept pre-activations are gathered from the dense ``pre_BF`` by :class:`GatherPreacts`,
  whose backward builds the encoder gradients from the N kept entries only;
- the decoder is ``F.embedding_bag(col_N, W_dec_FD, per_sample_weights=val_N)``, a weighted
  sum of N decoder rows whose backward is equally sparse.

Measured on this 2-core CPU (d_in 576, d_sae 4608, batch 4096): decoder forward+backward
15 / 32 / 56 ms for k = 16 / 32 / 64 against ~300 ms dense; encoder weight gradient 7-26 ms
against ~90 ms dense. A whole TopK step (Adam included) runs 1.5-2.3x faster than the same
step with a dense decoder and encoder backward, and 1.9-3.3x faster than SAELens 6.54's
TopKTrainingSAE (~14.5k against ~4.5-5k tokens/s at k = 16-32 on an idle machine).

ReLU, JumpReLU and Gated SAEs have no fixed k, but their gradients live on few entries too:
ReLU's and the gate's on the active latents, JumpReLU's on the active latents and those
within half a bandwidth of their threshold. Their training steps take the same path through
:meth:`SparseLatents.from_mask` whenever the batch's share of such entries is at most
``SPARSE_MAX_DENSITY`` (a dense start, e.g. a fixed λ from b_enc = 0, trains densely until
sparsity emerges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this share of the B×F entries the dense step is the faster one: an embedding bag
# costs ~0.2 µs per entry against ~0.016 µs per entry of a dense B×D×F product on this CPU,
# a break-even near 7%.
SPARSE_MAX_DENSITY = 0.05


@dataclass
class SparseLatents:
    """Kept latents of a batch in row-major COO order.

    ``row_N`` is non-decreasing (token index), ``col_N`` the latent, ``offsets_B`` the start
    of each token's entries (the ``offsets`` of ``F.embedding_bag``).
    """

    row_N: Tensor
    col_N: Tensor
    offsets_B: Tensor
    batch: int
    d_sae: int

    @classmethod
    def from_rows(cls, col_BK: Tensor, d_sae: int) -> SparseLatents:
        """Exactly K latents per token (TopK)."""
        batch, k = col_BK.shape
        device = col_BK.device
        return cls(
            row_N=torch.arange(batch, device=device).repeat_interleave(k),
            col_N=col_BK.reshape(-1),
            offsets_B=torch.arange(0, batch * k, k, device=device),
            batch=batch,
            d_sae=d_sae,
        )

    @classmethod
    def from_sorted(cls, row_N: Tensor, col_N: Tensor, batch: int, d_sae: int) -> SparseLatents:
        """Any number of latents per token; ``row_N`` must be non-decreasing."""
        counts_B = torch.bincount(row_N, minlength=batch)
        return cls(row_N, col_N, torch.cumsum(counts_B, 0) - counts_B, batch, d_sae)

    @classmethod
    def from_mask(cls, mask_BF: Tensor) -> SparseLatents:
        """The entries where ``mask_BF`` holds (``nonzero`` is row-major)."""
        batch, d_sae = mask_BF.shape
        row_N, col_N = mask_BF.nonzero(as_tuple=True)
        return cls.from_sorted(row_N, col_N, batch, d_sae)

    def select(self, mask_N: Tensor) -> SparseLatents:
        """The entries where ``mask_N`` holds (order kept, so still row-major)."""
        return SparseLatents.from_sorted(
            self.row_N[mask_N], self.col_N[mask_N], self.batch, self.d_sae
        )

    def per_entry(self, t_F: Tensor) -> Tensor:
        """``t_F`` at each entry's latent, differentiably. ``index_select``, not ``t_F[col_N]``:
        its backward (an ``index_add_``) gives the same sums at any number of threads, where
        advanced indexing's did not (1 against 2 threads trained relu SAEs apart)."""
        return t_F.index_select(0, self.col_N)

    def dense(self, val_N: Tensor) -> Tensor:
        """``f_BF`` with ``val_N`` at the kept positions (detached)."""
        f_BF = torch.zeros(self.batch, self.d_sae, dtype=val_N.dtype, device=val_N.device)
        return f_BF.index_put_((self.row_N, self.col_N), val_N.detach())

    def decode(self, val_N: Tensor, W_dec_FD: Tensor) -> Tensor:
        """``Σ_n val_n W_dec[col_n]`` per token, without the decoder bias."""
        # In the decoder's dtype: under bf16 autocast the values come from a bf16 matmul while
        # the weights stay fp32, and embedding_bag (not autocast) wants one dtype.
        return F.embedding_bag(
            self.col_N,
            W_dec_FD,
            self.offsets_B,
            mode="sum",
            per_sample_weights=val_N.to(W_dec_FD.dtype),
        )


class GatherPreacts(torch.autograd.Function):
    """``pre_BF[row, col]`` for ``pre_BF = xc_BD @ W_enc_DF + b_enc_F`` computed outside.

    The forward reuses the dense pre-activations (so values equal the dense encode bit for
    bit); the backward gives the gradients of ``xc``, ``W_enc`` and ``b_enc`` from the N kept
    entries only instead of a dense B×F gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        xc_BD: Tensor,
        W_enc_DF: Tensor,
        b_enc_F: Tensor,
        pre_BF: Tensor,
        latents: SparseLatents,
    ) -> Tensor:
        ctx.save_for_backward(xc_BD, W_enc_DF)
        ctx.latents = latents
        ctx.b_dtype = b_enc_F.dtype
        return pre_BF[latents.row_N, latents.col_N]

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        xc_BD, W_enc_DF = ctx.saved_tensors
        lat: SparseLatents = ctx.latents
        grad_xc = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # Σ_n g_n W_enc[:, col_n] per token: an embedding bag over encoder columns.
            grad_xc = F.embedding_bag(
                lat.col_N,
                W_enc_DF.t().contiguous(),
                lat.offsets_B,
                mode="sum",
                per_sample_weights=grad_N.to(W_enc_DF.dtype),
            ).to(xc_BD.dtype)
        if ctx.needs_input_grad[1]:
            # Column f of the gradient is Σ_{n: col_n = f} g_n xc[row_n]: bags per latent.
            order_N = torch.argsort(lat.col_N, stable=True)
            counts_F = torch.bincount(lat.col_N, minlength=lat.d_sae)
            grad_FD = F.embedding_bag(
                lat.row_N[order_N],
                xc_BD,
                torch.cumsum(counts_F, 0) - counts_F,
                mode="sum",
                per_sample_weights=grad_N[order_N].to(xc_BD.dtype),
            )
            grad_W = grad_FD.t().contiguous().to(W_enc_DF.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(lat.d_sae, dtype=ctx.b_dtype, device=grad_N.device)
            grad_b.index_add_(0, lat.col_N, grad_N.to(ctx.b_dtype))
        return grad_xc, grad_W, grad_b, None, None


def is_sparse_enough(mask_BF: Tensor, max_density: float = SPARSE_MAX_DENSITY) -> bool:
    """Whether a step restricted to the entries of ``mask_BF`` beats the dense step."""
    return int(mask_BF.sum()) <= max_density * mask_BF.numel()


def gather_preacts(
    xc_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, pre_BF: Tensor, latents: SparseLatents
) -> Tensor:
    """Differentiable ``pre_BF[latents]``; see :class:`GatherPreacts`."""
    return GatherPreacts.apply(xc_BD, W_enc_DF, b_enc_F, pre_BF, latents)


@torch.no_grad()
def batch_topk(acts_BF: Tensor, n_keep: int, row_cap: int) -> tuple[Tensor, Tensor]:
    """Flat indices (sorted, so row-major) and values of the ``n_keep`` largest of ``acts_BF``.

    A global top-k over B·F values costs ~3x a per-row top-k on this CPU, so the candidates
    are each row's ``row_cap`` largest; a row whose candidates were all kept may hold more,
    so such rows join with all their values and the selection is redone. The result is the
    exact global top-``n_keep`` (up to ties).
    """
    batch, d_sae = acts_BF.shape
    n_keep = min(n_keep, batch * d_sae)
    row_cap = min(row_cap, d_sae)
    if row_cap >= d_sae or n_keep >= batch * row_cap:
        values_N, flat_N = acts_BF.reshape(-1).topk(n_keep, sorted=False)
    else:
        cand_val_BC, cand_col_BC = acts_BF.topk(row_cap, dim=-1, sorted=False)
        values_N, pick_N = cand_val_BC.reshape(-1).topk(n_keep, sorted=False)
        kept_per_row_B = torch.bincount(pick_N // row_cap, minlength=batch)
        full_rows = torch.nonzero(kept_per_row_B == row_cap).squeeze(-1)
        if full_rows.numel() == 0:
            rows_N = pick_N // row_cap
            flat_N = rows_N * d_sae + cand_col_BC.reshape(-1)[pick_N]
        else:
            # Candidates of the other rows plus every value of the saturated rows.
            partial = kept_per_row_B != row_cap
            part_rows = torch.nonzero(partial).squeeze(-1)
            part_flat = (part_rows[:, None] * d_sae + cand_col_BC[part_rows]).reshape(-1)
            full_flat = (
                full_rows[:, None] * d_sae + torch.arange(d_sae, device=acts_BF.device)
            ).reshape(-1)
            pool_flat = torch.cat([part_flat, full_flat])
            pool_val = torch.cat(
                [cand_val_BC[part_rows].reshape(-1), acts_BF[full_rows].reshape(-1)]
            )
            values_N, pick = pool_val.topk(n_keep, sorted=False)
            flat_N = pool_flat[pick]
    flat_N, order = torch.sort(flat_N)
    return flat_N, values_N[order]
