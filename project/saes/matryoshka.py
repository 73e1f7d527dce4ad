"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

A BatchTopK SAE whose nested prefixes of the dictionary, latents ``[0, w_m)`` for each
``w_m`` in ``matryoshka_prefixes``, must each reconstruct the input on their own: the
reconstruction loss is the mean over prefixes of ``‖x - x̂_m‖²`` with
``x̂_m = b_dec + Σ_{i < w_m} f_i W_dec,i`` (the last prefix is the whole SAE). Early latents
learn general features and later ones specialise, which reduces feature absorption; the
best architecture on 5 of 8 SAEBench metrics. Default prefixes: SAEBench's group fractions
1/32, 1/16, 1/8, 1/4, 1/2 + 1/32 of d_sae, accumulated. AuxK and the inference threshold are
BatchTopK's; saved as SAELens ``jumprelu``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from project.saes.base import SAEConfig, sum_squared_error
from project.saes.batchtopk import BatchTopKSAE
from project.saes.sparse import SparseLatents
from project.saes.topk import require_k

logger = logging.getLogger(__name__)

GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)


def default_prefixes(d_sae: int) -> list[int]:
    """Cumulative SAEBench group fractions, rounded; the last prefix is always d_sae."""
    prefixes: list[int] = []
    total = 0.0
    for fraction in GROUP_FRACTIONS[:-1]:
        total += fraction
        width = round(total * d_sae)
        if 0 < width < d_sae and (not prefixes or width > prefixes[-1]):
            prefixes.append(width)
    return [*prefixes, d_sae]


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with nested-prefix reconstruction losses."""

    architecture = "matryoshka"
    saelens_training_architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        assert cfg.matryoshka_prefixes is not None
        self.register_buffer(
            "prefix_ends", torch.tensor(cfg.matryoshka_prefixes, dtype=torch.long), persistent=False
        )

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        require_k(cfg)
        if cfg.matryoshka_prefixes is None:
            cfg.matryoshka_prefixes = default_prefixes(cfg.d_sae)
        prefixes = [int(w) for w in cfg.matryoshka_prefixes]
        if prefixes and prefixes[-1] < cfg.d_sae:
            logger.info("matryoshka_prefixes %s: appending the full width %d", prefixes, cfg.d_sae)
            prefixes.append(cfg.d_sae)
        increasing = all(a < b for a, b in zip(prefixes, prefixes[1:], strict=False))
        if not prefixes or prefixes[0] <= 0 or prefixes[-1] != cfg.d_sae or not increasing:
            raise ValueError(
                f"matryoshka_prefixes={cfg.matryoshka_prefixes!r} must be strictly increasing "
                f"positive widths ending at d_sae={cfg.d_sae}"
            )
        cfg.matryoshka_prefixes = prefixes

    def reconstruct(
        self, x_BD: Tensor, latents: SparseLatents, val_N: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        # Each latent's group is the first prefix that contains it; decode group by group and
        # accumulate, so the full reconstruction costs one sparse decode in total.
        group_N = torch.bucketize(latents.col_N, self.prefix_ends, right=True)
        x_hat_BD = self.b_dec.expand_as(x_BD)
        prefix_losses: list[Tensor] = []
        aux: dict[str, Tensor] = {}
        for group, width in enumerate(self.cfg.matryoshka_prefixes or []):
            in_group_N = group_N == group
            part = latents.select(in_group_N)
            x_hat_BD = x_hat_BD + part.decode(val_N[in_group_N], self.W_dec)
            prefix_losses.append(sum_squared_error(x_hat_BD, x_BD))
            aux[f"mse_prefix_{width}"] = prefix_losses[-1].detach()
        recon_loss = torch.stack(prefix_losses).mean()
        return x_hat_BD, prefix_losses[-1], recon_loss, aux
