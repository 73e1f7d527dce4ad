"""BatchTopK SAE (Bussmann et al. 2024): keep the k·B largest activations of the whole batch.

Training keeps the ``k·B`` largest ReLU'd pre-activations over the batch, so L0 is k on
average while single tokens use more or fewer latents; AuxK as in :class:`TopKSAE`.

At inference a single threshold θ replaces the batch: ``f = ReLU(z) · [z > θ]``, i.e. a
JumpReLU with the same θ for every latent, saved as SAELens ``jumprelu`` with a ``threshold``
tensor. θ is METHODS §1's running mean of the batch's k·B-th largest value (the smallest kept
positive value), momentum ``threshold_momentum`` (0.999), updated from step
``threshold_start_step`` (1000) on, as in the paper; before that θ stays 0 (unused: training
selects by batch). The mean is bias-corrected (momentum ``min(m, 1 - 1/n)`` after n updates),
so over its first 1000 updates θ is the plain mean of the values seen, not pulled towards 0.

Short runs: a run of fewer steps than that would never set θ, so updates start at
``min(threshold_start_step, threshold_start_fraction · total_steps)`` (saeflow's choice,
0.1: the same cap as the lr warm-up's, so θ averages the values after the warm-up, as the
paper's 1000 steps do). The k·B-th value drifts most during the warm-up (7.8 → 6.4 over the
first 10% of a 196-step SmolLM2 run, then 6.4 → 6.1): a mean from step 19 gave held-out L0
31.2 for k = 32, from step 98 32.9, and the post-hoc calibration 32.0 (the sweep's defaults);
see :meth:`BatchTopKSAE.threshold_start`.

:meth:`BatchTopKSAE.calibrated_threshold` computes the alternative post-hoc θ, the k·N-th
largest activation of a data sample (exact L0 = k on it); :meth:`calibrate_threshold` sets it.

``eval()`` switches ``encode`` to the threshold; ``train()`` back to the batch selection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from project.saes.base import SAEConfig, TrainStep
from project.saes.sparse import SparseLatents, batch_topk
from project.saes.topk import TopKSAE

# Each token's candidates for the batch selection: tokens rarely need more than 4k latents,
# and batch_topk stays exact when one does.
ROW_CAP_FACTOR = 4


class BatchTopKSAE(TopKSAE):
    """Batch-level TopK; a per-latent ``threshold`` buffer makes it a JumpReLU at inference."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    saelens_training_architecture = "batchtopk"

    threshold: Tensor
    threshold_value: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))
        # The running value in float64 (tiny EMA steps vanish in float32); its update count.
        self.register_buffer("threshold_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.preacts(self.center(x_BD))
        if self.training:
            return self.batch_encode(pre_BF)
        # SAELens JumpReLUSAE.encode, operation for operation.
        return pre_BF.relu() * (pre_BF > self.threshold).to(pre_BF.dtype)

    def batch_encode(self, pre_BF: Tensor) -> Tensor:
        """Dense batch-TopK latents (the training-mode encoder)."""
        flat_N, val_N = batch_topk(pre_BF.relu(), self.k * pre_BF.shape[0], self.row_cap)
        out = torch.zeros_like(pre_BF).reshape(-1)
        return out.scatter_(0, flat_N, val_N).reshape(pre_BF.shape)

    @property
    def row_cap(self) -> int:
        return ROW_CAP_FACTOR * self.k

    def select_latents(self, pre_BF: Tensor, step: TrainStep) -> SparseLatents:
        batch, d_sae = pre_BF.shape
        flat_N, _ = batch_topk(pre_BF.relu(), self.k * batch, self.row_cap)
        return SparseLatents.from_sorted(flat_N // d_sae, flat_N % d_sae, batch, d_sae)

    def threshold_start(self, total_steps: int) -> int:
        """First step whose k·B-th value enters θ's running mean.

        ``threshold_start_step`` (METHODS: 1000), brought forward to
        ``threshold_start_fraction`` (0.1) of a shorter run: a 200-step run starts at step 20,
        and θ is the plain mean of the values of its last 180 steps.
        """
        short_run_start = int(self.cfg.threshold_start_fraction * total_steps)
        return min(self.cfg.threshold_start_step, short_run_start)

    # Run eagerly under torch.compile: compiled, the float64 running mean's in-place update
    # was lost (θ stayed 0 while the update count rose; torch 2.13, measured).
    @torch.compiler.disable
    @torch.no_grad()
    def after_selection(self, val_N: Tensor, step: TrainStep) -> dict[str, Tensor]:
        positive_N = val_N[val_N > 0]
        kth_value = positive_N.min().double() if positive_N.numel() else None
        started = step.step >= self.threshold_start(step.total_steps)
        if self.training and started and kth_value is not None:
            self.threshold_updates += 1
            momentum = min(self.cfg.threshold_momentum, 1 - 1 / int(self.threshold_updates))
            self.threshold_value.mul_(momentum).add_((1 - momentum) * kth_value)
            self.threshold.fill_(float(self.threshold_value))
        aux = {"threshold": self.threshold_value.detach().float()}
        if kth_value is not None:
            aux["threshold_batch"] = kth_value.float()
        return aux

    @torch.no_grad()
    def calibrated_threshold(self, x_ND: Tensor) -> float:
        """The post-hoc θ of a sample: just below its k·N-th largest activation, so that
        inference L0 is exactly k there. Leaves the SAE unchanged."""
        pre_NF = self.preacts(self.center(x_ND.to(self.W_enc.dtype)))
        n_keep = self.k * pre_NF.shape[0]
        _, val_N = batch_topk(pre_NF.relu(), n_keep, self.row_cap)
        positive_N = val_N[val_N > 0]
        if positive_N.numel() == 0:
            raise ValueError("no positive pre-activation on the sample: cannot calibrate θ")
        # Just below the smallest kept value, so that exactly the kept ones pass z > θ.
        return float(torch.nextafter(positive_N.min(), positive_N.new_zeros(())))

    @torch.no_grad()
    def set_threshold(self, theta: float) -> None:
        """Use ``theta`` at inference (and as the running value)."""
        self.threshold_value.fill_(theta)
        self.threshold.fill_(theta)

    @torch.no_grad()
    def calibrate_threshold(self, x_ND: Tensor) -> float:
        """Set θ to :meth:`calibrated_threshold` of a sample (inference L0 = k there)."""
        theta = self.calibrated_threshold(x_ND)
        self.set_threshold(theta)
        return theta

    # ----------------------------------------------------------------- SAELens format
    def _saelens_cfg_extra(self) -> dict[str, Any]:
        return {}

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.detach().contiguous()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saelens_tensors(tensors)
        # A SAELens-written BatchTopK has one θ for all latents; keep it as the running value.
        self.threshold_value.fill_(float(self.threshold.double().mean()))

    @classmethod
    def convert_saelens_tensors(
        cls, cfg_dict: dict[str, Any], tensors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return tensors
