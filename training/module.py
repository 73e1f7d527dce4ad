"""LightningModule that trains one SAE (any architecture of project.saes)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch

from project.saes import SparseAutoencoder, TrainStep


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run must fail and register nothing."""


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """``1 - Var(x - x̂) / Var(x)`` over a batch, variances summed over dimensions."""
    residual_var = (x_BD - x_hat_BD).var(dim=0).sum()
    total_var = x_BD.var(dim=0).sum()
    return 1 - residual_var / total_var


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
            "lr": self.optimizers().param_groups[0]["lr"],
        }
        metrics.update({name: value.detach() for name, value in out.aux.items()})
        now = time.perf_counter()
        if self._last_step_time is not None:
            metrics["tokens_per_second"] = batch_BD.shape[0] / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        self.log_dict(metrics, on_step=True, prog_bar=False, logger=True)
        self.log("ev", metrics["explained_variance"], prog_bar=True, logger=False)
        self.log("L0", metrics["l0"], prog_bar=True, logger=False)
        return out.loss

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
    """Inference-mode metrics on held-out activations: l0, explained_variance, mse, cossim.

    Explained variance is ``1 - Var(x - x̂)/Var(x)`` over all tokens, variances summed over
    dimensions (the SAELens/SAEBench definition).
    """
    was_training = sae.training
    sae.eval()
    n, d = acts_ND.shape
    sq_err = active = cos_sum = 0.0
    err_sum_D = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, batch_size):
        x_BD = acts_ND[start : start + batch_size]
        f_BF = sae.encode(x_BD)
        err_BD = x_BD - sae.decode(f_BF)
        sq_err += err_BD.double().pow(2).sum().item()
        err_sum_D += err_BD.double().sum(dim=0)
        active += (f_BF != 0).sum().item()
        cos_sum += torch.nn.functional.cosine_similarity(x_BD, x_BD - err_BD, dim=-1).sum().item()
    sae.train(was_training)
    residual_var = (sq_err - err_sum_D.pow(2).sum().item() / n) / (n - 1)
    total_var = acts_ND.double().var(dim=0).sum().item()
    return {
        "l0": active / n,
        "explained_variance": 1 - residual_var / total_var if total_var > 0 else math.nan,
        "mse": sq_err / (n * d),
        "cossim": cos_sum / n,
    }
