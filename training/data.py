"""Lightning DataModule over cached activations.

The cache is read once into memory (a 1M-token cache of a 576-wide LM is 2.3 GB) and batches
are drawn from fresh permutations, pass after pass, until the Trainer's max_steps. The tail of
the cache is held out: it is text the SAE never trained on, for the final metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset


class ShuffledBatches(IterableDataset):
    """Endless stream of [batch, d_in] batches, a new permutation each pass.

    Under data parallelism every rank draws the same permutation and yields its own slice of
    each global batch (rows ``rank * batch/world`` onwards): together the ranks see exactly the
    one-device batches. An iterable dataset is not sharded by Lightning; this is where it is.
    """

    def __init__(
        self, acts_ND: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        super().__init__()
        self.acts_ND = acts_ND
        self.batch_size = min(batch_size, acts_ND.shape[0])
        self.seed = seed
        self.rank, self.world = rank, world
        if self.batch_size % world:
            raise ValueError(f"a batch of {self.batch_size} does not split over {world} ranks")

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        n_full = self.acts_ND.shape[0] // self.batch_size
        share = self.batch_size // self.world
        while True:
            order = torch.randperm(self.acts_ND.shape[0], generator=generator)
            for i in range(n_full):
                start = i * self.batch_size + self.rank * share
                yield self.acts_ND[order[start : start + share]]


class ActivationDataModule(pl.LightningDataModule):
    """Train/validation split of an [N, d_in] activation tensor."""

    def __init__(
        self, acts_ND: torch.Tensor, *, batch_size: int, val_fraction: float = 0.05, seed: int = 0
    ) -> None:
        super().__init__()
        if acts_ND.ndim != 2 or acts_ND.shape[0] < 2:
            raise ValueError(
                f"need an [N, d_in] activation tensor with N >= 2, got {tuple(acts_ND.shape)}"
            )
        n_val = max(1, int(acts_ND.shape[0] * val_fraction))
        self.train_ND = acts_ND[:-n_val]
        self.val_ND = acts_ND[-n_val:]
        self.batch_size = batch_size
        self.seed = seed

    @property
    def d_in(self) -> int:
        return self.train_ND.shape[1]

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the dataset already yields whole batches (this rank's share).
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return DataLoader(
            ShuffledBatches(self.train_ND, self.batch_size, self.seed, rank, world),
            batch_size=None,
        )

    def sample(self, n: int) -> torch.Tensor:
        """A random sample of training activations for data-dependent initialisation."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(self.train_ND.shape[0], generator=generator)[:n]
        return self.train_ND[idx]
