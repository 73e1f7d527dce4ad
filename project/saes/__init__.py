"""Sparse autoencoder architectures behind a registry, and their SAELens-format IO.

Adding an architecture: one file with a :class:`SparseAutoencoder` subclass, one line in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from project.saes.base import SAEConfig, SAELoss, SparseAutoencoder, TrainStep
from project.saes.batchtopk import BatchTopKSAE
from project.saes.gated import GatedSAE
from project.saes.io import load_sae_dir, save_sae
from project.saes.jumprelu import JumpReLUSAE
from project.saes.matryoshka import MatryoshkaSAE
from project.saes.relu import ReLUSAE
from project.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka": MatryoshkaSAE,
}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of ``cfg.architecture``."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown SAE architecture {cfg.architecture!r}; valid: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[cfg.architecture](cfg)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAELoss",
    "SparseAutoencoder",
    "TopKSAE",
    "TrainStep",
    "build_sae",
    "load_sae_dir",
    "save_sae",
]
