"""LightningModule that trains one SAE (any architecture of project.saes)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch

from project.saes import SparseAutoencoder, TrainStep
from project.saes.base import explained_variance

# Checkpoint key of the SAE's training state outside its state_dict (dead-latent counter, λ
# controller), so a resumed run continues counting where it stopped.
TRAINING_STATE_KEY = "saeflow_sae_training_state"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run must fail and register nothing."""


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last ``decay_fraction``."""
    warmup = min(warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


class SAETrainingModule(pl.LightningModule):
    """Adam on an SAE's own loss, decoder rows kept at unit norm, metrics per step."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        *,
        lr: float,
        total_steps: int,
        warmup_steps: int = 1000,
        decay_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        self.sae = sae
        self.lr = lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay_fraction = decay_fraction
        self._last_step_time: float | None = None

    def training_step(self, batch_BD: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.sae.loss(
            batch_BD, TrainStep(step=self.global_step, total_steps=self.total_steps)
        )
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"loss is {out.loss.item()} at step {self.global_step}: training stopped"
            )
        metrics: dict[str, Any] = {
            "loss": out.loss.detach(),
            "mse": out.mse.detach(),
            "l0": out.l0.detach(),
            "explained_variance": explained_variance(batch_BD, out.x_hat_BD.detach()),
            "dead_fraction": self.sae.dead_fraction(),
            # The longest silence of any latent, to compare with the dead-latent window.
            "tokens_since_fired_max": float(self.sae.tokens_since_fired_F.max()),
            "lr": self.optimizers().param_groups[0]["lr"],
        }
        metrics.update({name: value.detach() for name, value in out.aux.items()})
        now = time.perf_counter()
        if self._last_step_time is not None:
            metrics["tokens_per_second"] = batch_BD.shape[0] / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        # Under ddp each rank saw a slice of the batch: log the mean over ranks, the batch's.
        distributed = self.trainer.world_size > 1
        self.log_dict(metrics, on_step=True, prog_bar=False, logger=True, sync_dist=distributed)
        self.log("ev", metrics["explained_variance"], prog_bar=True, logger=False)
        self.log("L0", metrics["l0"], prog_bar=True, logger=False)
        return out.loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINING_STATE_KEY] = self.sae.training_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(TRAINING_STATE_KEY)
        if state is not None:  # checkpoints written before the state was saved lack it
            self.sae.load_training_state(state)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        before = getattr(self.sae, "before_optimizer_step", None)
        if before is not None:
            before()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.sae.after_optimizer_step()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, self.total_steps, self.warmup_steps, self.decay_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder, acts_ND: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Inference-mode metrics on held-out activations: l0, explained_variance, mse, cossim,
    dead_fraction.

    Explained variance is :func:`project.saes.base.explained_variance` over all tokens (the
    SAELens/SAEBench definition); ``dead_fraction`` is the share of latents that fire on none
    of these tokens (SAEBench core's definition).
    """
    was_training = sae.training
    sae.eval()
    n, d = acts_ND.shape
    active = cos_sum = 0.0
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    x_hat_parts = []
    for start in range(0, n, batch_size):
        x_BD = acts_ND[start : start + batch_size]
        f_BF = sae.encode(x_BD)
        x_hat_BD = sae.decode(f_BF)
        x_hat_parts.append(x_hat_BD)
        active_BF = f_BF != 0
        active += active_BF.sum().item()
        fired_F |= active_BF.any(dim=0)
        cos_sum += torch.nn.functional.cosine_similarity(x_BD, x_hat_BD, dim=-1).sum().item()
    sae.train(was_training)
    x_hat_ND = torch.cat(x_hat_parts).to(acts_ND.dtype)
    total_var = acts_ND.double().var(dim=0).sum().item()
    ev = explained_variance(acts_ND.double(), x_hat_ND.double()).item()
    return {
        "l0": active / n,
        "explained_variance": ev if total_var > 0 else math.nan,
        "mse": (acts_ND - x_hat_ND).double().pow(2).mean().item(),
        "cossim": cos_sum / n,
        "dead_fraction": 1 - fired_F.float().mean().item(),
    }
