"""Training speed and final quality of saeflow's six SAE architectures against SAELens 6 (issue 19).

    .venv/bin/python bench/bench_training.py [--steps 200] [--ks 32,64,128] [--l1-targets 64]
        [--archs topk,batchtopk,matryoshka,relu,jumprelu,gated] [--json rows.json]
    .venv/bin/python bench/bench_training.py --gaussian --d-in 64 --expansion 4 --batch 256 \\
        --steps 3 --warmup 1   # smoke run: no LM, synthetic vectors

What is compared. In one process, for every architecture (topk, batchtopk and matryoshka at
each k of ``--ks``; relu, jumprelu and gated at each target L0 of ``--l1-targets``), a saeflow
SAE and the matching SAELens 6 training SAE train on identical activations: the same
batches (``--batch``, default 4096) in the same order, the same number of steps, Adam at the
same learning rate and schedule. The first ``--warmup`` steps train but are not timed. Each row
prints both trainers' throughput, their ratio (saeflow / SAELens), and what each learned: the
normalised MSE ``Σ‖x - x̂‖² / Σ‖x - mean(x)‖²`` on held-out tokens (lower is better; 1 is the
mean's error) and the held-out L0 (mean active latents per token). A faster trainer that
learns worse does not count: ``met`` is "yes" only where the ratio reaches issue 19's target
(TopK and BatchTopK: 5x at k 32, 4x at k 128; ReLU, JumpReLU, Gated: 1.2x), saeflow's NMSE
is equal or lower, and its L0 at most 10% above SAELens' (a lower NMSE bought with more
active latents does not count either). A row without a stated target (matryoshka, k 64)
shows "-".

Data. SmolLM2-135M-Instruct's residual stream after block ``--layer`` (10, the study's) on
the ``stdlib`` corpus, from saeflow's own harvest (``training.run.harvest_for``: a cached
harvest of the same request is reused, otherwise the embedded LM is loaded and the harvest is
cached and logged as an MLflow run, as training does). The last ``--eval-tokens`` tokens are
held out; the others are the training split, which batches go through in fresh seeded
permutations pass after pass (``training/data.py``'s scheme), so the default 100k tokens are
reused cyclically (200 steps of 4096 are ~8.9 passes over the 91,808 training tokens).
``--gaussian`` trains on standard normal vectors instead, for smoke runs only (their NMSE
means nothing).

Each side trains as its library does:

- saeflow: the SAE config ``training.run.sae_config_for`` builds for a training
  (``l1_control="target_l0"`` for relu/gated, the dead-latent window of
  ``TrainConfig.resolved_dead_tokens_window``), ``initialize_from_data`` on 8192 training
  tokens (untimed), then the loop of ``training.module.SAETrainingModule``: ``sae.loss``,
  backward, ``before_optimizer_step`` (gradient projection), Adam, ``after_optimizer_step``
  (decoder renormalisation), lr schedule. Lightning's own per-step overhead (metric logging)
  is not in the timing.
- SAELens: its ``SAETrainer.step`` (forward, dead-latent bookkeeping, backward, gradient-norm
  clipping at 1, Adam, lr and coefficient schedules), with its ``expected_average_only_in``
  activation scaler estimated on the training split (SAELens' coefficients are defined on
  inputs of mean norm √d_in; NMSE does not depend on the scale). Its lr warm-up/decay steps and
  dead-feature window are set to saeflow's (the bench checks that both lr schedules agree).

Where the two recipes differ (so read the rows with this in mind):

- relu, gated: SAELens has no L0 target; its λ (starting at saeflow's 5.0, ramped over
  saeflow's 5% warm-up) is adapted between steps by the bench with saeflow's own
  ``L1Controller`` on SAELens' batch L0, so both aim at the target L0. That outer loop is the
  bench's, not SAELens' (``--saelens-l1 X`` trains SAELens with a fixed λ = X instead, its
  plain recipe, where L0 follows λ). SAELens starts dense (b_enc = 0); saeflow starts its
  latents at 2x the target L0, so in a short run SAELens' L0 may still be off the target:
  compare the L0 columns before the NMSE ones.
- jumprelu: SAELens' "quadratic" L0 loss (Gemma Scope 2: per-token ``2/T·(L0 - T)²``,
  threshold trained directly, straight-through gradient to the threshold only) against
  saeflow's batch-L0 penalty on a log threshold with the estimator reaching the encoder.
  Both end at one L0: SAELens' thresholds are set (untimed) as saeflow's are, per latent at
  the quantile of its own initial pre-activations, and its decoder rows start at unit norm
  as saeflow's (at its 0.1 row norm, with these thresholds alone, it still ended dense: L0
  3,580 of 4,608). Its L0 then falls 6-9x over 30 steps whatever its quadratic loss's
  target (started at 2x the target it ended at 21; with the target moved between steps by
  saeflow's controller, at 21 too), so it starts at ``--saelens-jumprelu-l0-factor`` (8) x
  the target: on the default data at 30 steps, factors 6 / 8 / 9 / 16 ended at L0 44.8 /
  57.5 / 64.1 / 125.8 against saeflow's 57.1 (one-off trial runs, stop 32). At other
  settings compare the L0 columns first (``met`` needs saeflow's L0 at most 1.1x SAELens').
  With its scalar
  ``jumprelu_init_threshold`` (``--saelens-jumprelu-init saelens``) it stays dense over a
  short run (L0 4,404 of 4,608 after 30 steps).
- decoder norms: SAELens 6 neither projects the decoder gradient nor renormalises rows, for
  any architecture, and starts rows at norm 0.1; saeflow keeps unit-norm rows (all but relu,
  whose April-update penalty leaves them free, as SAELens' standard SAE does).
- topk family: SAELens ranks ``pre · ‖W_dec,i‖`` (``rescale_acts_by_decoder_norm``) and
  weights AuxK by 1 (saeflow 1/32); it computes dense B×F latents and decodes densely.
  ``--saelens-sparse-topk`` trains SAELens topk with its sparse-tensor option instead, which
  on CPU only runs without ``rescale_acts_by_decoder_norm`` (with it, backward fails on a
  sparse ``view``), so that option also turns the rescale off. Matryoshka: SAELens
  sums the prefix losses, saeflow averages them; both use saeflow's default prefixes.
- b_dec: SAELens 6 starts it at 0, saeflow at the geometric median of 8192 training tokens;
  over a short run at lr 3e-4 SAELens' b_dec moves little, so its NMSE carries much of the
  activations' mean. ``--saelens-init-b-dec`` gives SAELens saeflow's b_dec init (untimed)
  to separate the trainers from that init.
- BatchTopK/Matryoshka are evaluated with their batch selection (top k·B of each held-out
  batch) on both sides, not an inference threshold, so the L0 there is k by construction.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from bench.figures import Figure
from project.corpus import DEFAULT_CORPUS
from project.lm import DEFAULT_LM, hook_name
from project.saes import BatchTopKSAE, SAEConfig, TrainStep, build_sae
from project.saes.base import firing_quantile, geometric_median
from project.saes.relu import L1Controller
from project.tracking import configure_tracking
from training.config import K_ARCHITECTURES, L1_ARCHITECTURES, TrainConfig
from training.module import NonFiniteLossError, lr_factor
from training.run import harvest_for, sae_config_for

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
L0_FAMILY = ("relu", "jumprelu", "gated")
# Issue 19's throughput targets (saeflow / SAELens, at equal or lower final MSE); None: any.
TARGET_RATIOS: dict[tuple[str, int | None], float] = {
    ("topk", 32): 5.0,
    ("topk", 128): 4.0,
    ("batchtopk", 32): 5.0,
    ("batchtopk", 128): 4.0,
    ("relu", None): 1.2,
    ("jumprelu", None): 1.2,
    ("gated", None): 1.2,
}
# `met` also needs saeflow's held-out L0 at most this factor above SAELens'.
L0_SLACK = 1.1
INIT_SAMPLE = 8192  # tokens for saeflow's initialize_from_data, as training.run uses


@dataclass(frozen=True)
class Settings:
    """What both sides share."""

    steps: int
    warmup: int
    batch: int
    expansion: int
    lr: float
    schedule: str  # "saeflow" (training's warm-up and decay) or "constant"
    seed: int
    model: str
    layer: int
    corpus: str
    saelens_l1: float | None  # None: adapted toward the target L0
    saelens_sparse_topk: bool
    saelens_init_b_dec: bool
    saelens_jumprelu_init: str  # "data" (per-latent quantile, as saeflow) or "saelens" (scalar)
    saelens_jumprelu_l0_factor: float  # data init: SAELens starts at this x the target L0


@dataclass(frozen=True)
class Case:
    """One row: an architecture at a k (TopK family) or a target L0 (L1 families)."""

    architecture: str
    target_l0: int

    @property
    def k(self) -> int | None:
        return self.target_l0 if self.architecture in K_ARCHITECTURES else None

    @property
    def label(self) -> str:
        return f"k {self.target_l0}" if self.k is not None else f"L0 {self.target_l0}"


@dataclass
class Data:
    """Training split, held-out tail, and the batch order both sides follow."""

    train_ND: Tensor
    eval_ND: Tensor
    order: list[Tensor]  # per step, the training-split rows of its batch
    source: str


@dataclass
class SideResult:
    tokens_per_s: float
    nmse: float
    l0: float
    dead_fraction: float
    lrs: list[float]


# ------------------------------------------------------------------------------------ data
def harvested_activations(model: str, layer: int, corpus: str, n_tokens: int) -> tuple[Tensor, str]:
    """saeflow's harvest of ``n_tokens`` residual activations (a cached one is reused)."""
    configure_tracking()  # a fresh harvest logs an MLflow run, as in training
    config = TrainConfig(model=model, layer=layer, dataset=corpus, n_tokens=n_tokens)
    result = harvest_for(config)
    acts_ND = result.cache.load_all().float()
    how = "cached harvest" if result.reused else "new harvest"
    return acts_ND, f"{model} {hook_name(layer)} on {corpus!r}, {acts_ND.shape[0]:,} tokens ({how})"


def gaussian_activations(n_tokens: int, d_in: int, seed: int) -> tuple[Tensor, str]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, d_in, generator=generator), f"Gaussian, {n_tokens:,} x {d_in}"


def split_and_order(acts_ND: Tensor, n_eval: int, batch: int, steps: int, seed: int) -> Data:
    """Hold out the tail; draw the steps' batches from seeded permutations, pass after pass."""
    n_train = acts_ND.shape[0] - n_eval
    if n_eval <= 0 or n_train < batch:
        raise ValueError(
            f"{acts_ND.shape[0]} tokens leave {n_train} for training after {n_eval} held out: "
            f"need at least one batch of {batch}; raise --n-tokens or lower --batch/--eval-tokens"
        )
    generator = torch.Generator().manual_seed(seed)
    order: list[Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n_train, generator=generator)
        order.extend(perm[i * batch : (i + 1) * batch] for i in range(n_train // batch))
    return Data(acts_ND[:n_train], acts_ND[n_train:], order[:steps], source="")


# ------------------------------------------------------------------------------------ loops
def train_loop(
    step_fn: Callable[[int, Tensor], Any],
    data: Data,
    warmup: int,
    current_lr: Callable[[], float],
    after: Callable[[int, Any], None] | None = None,
) -> tuple[float, list[float]]:
    """Run every step; returns seconds spent in the timed steps and each step's lr.

    Gathering the batch, reading the lr and ``after`` (the bench's own bookkeeping) are
    outside the timed region.
    """
    seconds = 0.0
    lrs: list[float] = []
    for i, rows_B in enumerate(data.order):
        x_BD = data.train_ND[rows_B]
        lrs.append(current_lr())
        started = time.perf_counter()
        result = step_fn(i, x_BD)
        if i >= warmup:
            seconds += time.perf_counter() - started
        if after is not None:
            after(i, result)
    return seconds, lrs


@torch.no_grad()
def heldout_metrics(
    reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]], x_ND: Tensor, batch: int
) -> tuple[float, float, float]:
    """(normalised MSE, L0, share of latents that never fire) over ``x_ND``, batch by batch."""
    squared_error = 0.0
    active = 0
    fired_F: Tensor | None = None
    for x_BD in x_ND.split(batch):
        f_BF, x_hat_BD = reconstruct(x_BD)
        if f_BF.is_sparse:
            f_BF = f_BF.to_dense()
        squared_error += float((x_BD.double() - x_hat_BD.double()).pow(2).sum())
        nonzero_BF = f_BF != 0
        active += int(nonzero_BF.sum())
        fired_F = nonzero_BF.any(dim=0) if fired_F is None else fired_F | nonzero_BF.any(dim=0)
    x64_ND = x_ND.double()
    total = float((x64_ND - x64_ND.mean(dim=0)).pow(2).sum())
    assert fired_F is not None
    return squared_error / total, active / x_ND.shape[0], 1 - float(fired_F.float().mean())


def train_config(case: Case, s: Settings) -> TrainConfig:
    """The TrainConfig of a training of ``s.steps`` batches: the source of saeflow's settings."""
    config = TrainConfig(
        model=s.model,
        layer=s.layer,
        dataset=s.corpus,
        architecture=case.architecture,
        target_l0=case.target_l0,
        expansion=s.expansion,
        lr=s.lr,
        batch_size=s.batch,
        training_tokens=s.steps * s.batch,
        seed=s.seed,
    )
    config.validate()
    return config


def init_sample(data: Data, seed: int) -> Tensor:
    """The training tokens saeflow initialises from (``ActivationDataModule.sample``'s draw)."""
    rows = torch.randperm(data.train_ND.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    return data.train_ND[rows[:INIT_SAMPLE]]


def dead_window_steps(config: TrainConfig, batch: int) -> int:
    """saeflow's dead-latent window in steps: dead after this many batches without firing."""
    return max(1, math.ceil(config.resolved_dead_tokens_window() / batch))


# ------------------------------------------------------------------------------------ saeflow
def run_saeflow(case: Case, data: Data, s: Settings) -> SideResult:
    config = train_config(case, s)
    d_in = data.train_ND.shape[1]
    config.validate_for_width(d_in)
    torch.manual_seed(s.seed)
    sae = build_sae(sae_config_for(config, d_in, s.model))
    sae.initialize_from_data(init_sample(data, s.seed))
    optimizer = torch.optim.Adam(sae.parameters(), lr=s.lr)

    def factor(i: int) -> float:
        if s.schedule == "constant":
            return 1.0
        return lr_factor(i, s.steps, config.warmup_steps, config.decay_fraction)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step(i: int, x_BD: Tensor) -> None:
        # SAETrainingModule's step under Lightning's automatic optimisation.
        out = sae.loss(x_BD, TrainStep(step=i, total_steps=s.steps))
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(f"saeflow {case}: loss {out.loss.item()} at step {i}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        schedule.step()

    sae.train()
    seconds, lrs = train_loop(step, data, s.warmup, lambda: optimizer.param_groups[0]["lr"])

    def reconstruct(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        f_BF = sae.encode(x_BD)
        return f_BF, sae.decode(f_BF)

    # BatchTopK/Matryoshka encode with the batch selection in train mode (as SAELens does).
    sae.train(isinstance(sae, BatchTopKSAE))
    nmse, l0, dead = heldout_metrics(reconstruct, data.eval_ND, s.batch)
    timed = (s.steps - s.warmup) * s.batch
    return SideResult(timed / seconds, nmse, l0, dead, lrs)


# ------------------------------------------------------------------------------------ SAELens
def saelens_sae(case: Case, d_in: int, flow_cfg: SAEConfig, s: Settings, l1: float) -> TrainingSAE:
    """SAELens' training SAE for ``case``: its defaults except the sparsity target, input
    scaling, and (relu/gated) the λ warm-up, set to saeflow's."""
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_in * s.expansion,
        "normalize_activations": "expected_average_only_in",
    }
    # A float warm-up is fine for SAELens' CoefficientScheduler and keeps the ramp saeflow's.
    l1_warmup = flow_cfg.l1_warmup_fraction * s.steps
    arch = case.architecture
    if arch == "relu":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=l1, l1_warm_up_steps=l1_warmup, **common)
        )
    if arch == "gated":
        return GatedTrainingSAE(
            GatedTrainingSAEConfig(l1_coefficient=l1, l1_warm_up_steps=l1_warmup, **common)
        )
    if arch == "jumprelu":
        # With the data init (run_saelens), unit-norm decoder rows as saeflow's: at SAELens'
        # 0.1 row norm, quantile thresholds alone still ended dense (L0 3,580 after 30 steps).
        norm = {"decoder_init_norm": 1.0} if s.saelens_jumprelu_init == "data" else {}
        return JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                jumprelu_sparsity_loss_mode="quadratic",
                target_l0=float(case.target_l0),
                **norm,
                **common,
            )
        )
    if arch == "topk":
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(
                k=case.target_l0,
                use_sparse_activations=s.saelens_sparse_topk,
                # On CPU SAELens' sparse path fails in backward with the decoder-norm
                # rescale ('aten::view' on SparseCPU), so the sparse option drops it.
                rescale_acts_by_decoder_norm=not s.saelens_sparse_topk,
                **common,
            )
        )
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(case.target_l0), **common))
    if arch == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                k=float(case.target_l0),
                matryoshka_widths=list(flow_cfg.matryoshka_prefixes or []),
                **common,
            )
        )
    raise ValueError(f"no SAELens counterpart for {arch!r}")


@torch.no_grad()
def start_jumprelu_at(sae: JumpReLUTrainingSAE, x_ND: Tensor, init_l0: float) -> None:
    """Set each of SAELens' JumpReLU thresholds to the quantile of its pre-activations on
    ``x_ND`` (already in SAELens' input scale) that starts the SAE at L0 ``init_l0`` (at
    most half the latents), as saeflow's ``initialize_from_data`` does."""
    _, pre_NF = sae.encode_with_hidden_pre(x_ND.to(sae.W_enc.dtype))
    init_l0 = min(init_l0, sae.cfg.d_sae / 2)
    sae.threshold.copy_(firing_quantile(pre_NF, init_l0).clamp_min(0).float())


def saelens_lr_steps(config: TrainConfig, s: Settings) -> tuple[int, int]:
    """SAELens (warm-up, decay) steps that reproduce ``training.module.lr_factor``."""
    if s.schedule == "constant":
        return 0, 0
    warmup = min(config.warmup_steps, max(1, s.steps // 10))
    decay = s.steps - int(s.steps * (1 - config.decay_fraction)) if config.decay_fraction else 0
    return warmup, decay


def run_saelens(case: Case, data: Data, s: Settings) -> SideResult:
    config = train_config(case, s)
    d_in = data.train_ND.shape[1]
    flow_cfg = sae_config_for(config, d_in, s.model)
    adapt_l1 = case.architecture in L1_ARCHITECTURES and s.saelens_l1 is None
    l1_start = flow_cfg.l1_coefficient if s.saelens_l1 is None else s.saelens_l1
    torch.manual_seed(s.seed)
    sae = saelens_sae(case, d_in, flow_cfg, s, l1_start)
    warmup_steps, decay_steps = saelens_lr_steps(config, s)
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=s.steps * s.batch,
            train_batch_size_samples=s.batch,
            lr=s.lr,
            lr_end=s.lr,
            lr_warm_up_steps=warmup_steps,
            lr_decay_steps=decay_steps,
            # SAELens: dead after more than this many steps without firing; saeflow: after
            # at least its window.
            dead_feature_window=dead_window_steps(config, s.batch) - 1,
            device="cpu",
        ),
        sae,
        data_provider=iter(()),
    )
    # ActivationScaler.estimate_scaling_factor's √d_in / mean ‖x‖, over the whole training
    # split (computed here: SAELens' own pass draws a progress bar into the table).
    mean_norm = float(data.train_ND.norm(dim=-1).double().mean())
    trainer.activation_scaler.scaling_factor = d_in**0.5 / mean_norm
    if s.saelens_init_b_dec:
        # Not SAELens' recipe (its b_dec starts at 0): saeflow's b_dec init, in SAELens' units.
        with torch.no_grad():
            median_D = geometric_median(init_sample(data, s.seed)) * (d_in**0.5 / mean_norm)
            sae.b_dec.copy_(median_D.to(sae.b_dec.dtype))
    if case.architecture == "jumprelu" and s.saelens_jumprelu_init == "data":
        # SAELens' scalar init threshold leaves it dense for hundreds of steps (L0 4,404 of
        # 4,608 after 30); per-latent quantiles as saeflow's, started high enough that its
        # fall over the run ends where saeflow's L0 does, put both at one L0.
        x_ND = init_sample(data, s.seed) * (d_in**0.5 / mean_norm)
        start_jumprelu_at(sae, x_ND, s.saelens_jumprelu_l0_factor * case.target_l0)
    controller = L1Controller()
    l1_warmup = flow_cfg.l1_warmup_fraction * s.steps

    def step(i: int, x_BD: Tensor) -> TrainStepOutput:
        out = trainer.step(x_BD)
        trainer.n_training_steps += 1  # SAETrainer.fit's job around its step()
        return out

    def adapt(i: int, out: TrainStepOutput) -> None:
        # relu/gated: the next step's λ. Adapted: saeflow's controller on SAELens' batch L0
        # (the bench's L0 control); fixed: SAELens' ramp, capped at 1 as saeflow's is (with a
        # fractional warm-up SAELens' scheduler overshoots by up to one step's increment).
        if case.architecture not in L1_ARCHITECTURES:
            return
        scheduler = trainer.coefficient_schedulers["l1"]
        if adapt_l1:
            l0 = float((out.feature_acts > 0).sum(dim=-1).float().mean())
            warming_up = l1_warmup > 0 and i < l1_warmup
            controller.update(l0, float(case.target_l0), flow_cfg.l1_control_rate, warming_up)
            scheduler.final_value = l1_start * math.exp(float(controller.log_gain))
        ramp = min(1.0, scheduler.current_step / l1_warmup) if l1_warmup > 0 else 1.0
        scheduler.current_value = scheduler.final_value * ramp

    seconds, lrs = train_loop(
        step, data, s.warmup, lambda: trainer.optimizer.param_groups[0]["lr"], adapt
    )

    def reconstruct(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        f_BF = sae.encode(x_BD)
        return f_BF, sae.decode(f_BF)

    sae.eval()
    nmse, l0, dead = heldout_metrics(reconstruct, trainer.activation_scaler(data.eval_ND), s.batch)
    timed = (s.steps - s.warmup) * s.batch
    return SideResult(timed / seconds, nmse, l0, dead, lrs)


# ------------------------------------------------------------------------------------ report
HEADER = (
    f"{'architecture':12s} {'k/L0':>7s} {'saeflow tok/s':>13s} {'SAELens tok/s':>13s} "
    f"{'ratio':>7s} {'target':>6s} {'NMSE saeflow':>12s} {'NMSE SAELens':>12s} "
    f"{'L0 saeflow':>10s} {'L0 SAELens':>10s} {'met':>4s}"
)


def make_row(
    case: Case, ours: SideResult, theirs: SideResult, data: Data, s: Settings
) -> dict[str, Any]:
    ratio = ours.tokens_per_s / theirs.tokens_per_s
    target = TARGET_RATIOS.get((case.architecture, case.k))
    # Not faster-but-worse, and not a lower NMSE bought with more active latents.
    learns_as_well = ours.nmse <= theirs.nmse and ours.l0 <= L0_SLACK * theirs.l0
    met = None if target is None else bool(ratio >= target and learns_as_well)
    lr_gap = max(abs(a - b) for a, b in zip(ours.lrs, theirs.lrs, strict=True))
    if case.architecture in L1_ARCHITECTURES:
        saelens_l1 = "adapted" if s.saelens_l1 is None else s.saelens_l1
    else:
        saelens_l1 = None
    return {
        "architecture": case.architecture,
        "k": case.k,
        "target_l0": case.target_l0,
        "data": data.source,
        "d_in": int(data.train_ND.shape[1]),
        "d_sae": int(data.train_ND.shape[1]) * s.expansion,
        "batch": s.batch,
        "steps": s.steps,
        "timed_steps": s.steps - s.warmup,
        "lr": s.lr,
        "schedule": s.schedule,
        "torch_threads": torch.get_num_threads(),
        "saeflow_tokens_per_s": ours.tokens_per_s,
        "saelens_tokens_per_s": theirs.tokens_per_s,
        "ratio": ratio,
        "saeflow_nmse": ours.nmse,
        "saelens_nmse": theirs.nmse,
        "saeflow_l0": ours.l0,
        "saelens_l0": theirs.l0,
        "saeflow_dead_fraction": ours.dead_fraction,
        "saelens_dead_fraction": theirs.dead_fraction,
        "saelens_l1": saelens_l1,
        "lr_schedules_match": lr_gap <= 1e-9 * s.lr,
        "target_ratio": target,
        "met": met,
    }


def format_row(row: dict[str, Any]) -> str:
    label = f"k {row['k']}" if row["k"] is not None else f"L0 {row['target_l0']}"
    target = "-" if row["target_ratio"] is None else f"{row['target_ratio']:.1f}x"
    met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
    return (
        f"{row['architecture']:12s} {label:>7s} {row['saeflow_tokens_per_s']:13.0f} "
        f"{row['saelens_tokens_per_s']:13.0f} {row['ratio']:6.2f}x {target:>6s} "
        f"{row['saeflow_nmse']:12.4f} {row['saelens_nmse']:12.4f} "
        f"{row['saeflow_l0']:10.1f} {row['saelens_l0']:10.1f} {met:>4s}"
    )


def write_json(path: Path, rows: list[dict[str, Any]], s: Settings) -> None:
    payload = {"bench": "bench_training", "settings": asdict(s), "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """The benchmark table's rows: per architecture, saeflow's training throughput over SAELens'
    at the NMSE and L0 each reached (``met`` needs both, see :func:`make_row`)."""
    out = []
    for row in rows:
        label = f"k {row['k']}" if row["k"] is not None else f"L0 {row['target_l0']}"
        out.append(
            Figure(
                section="training",
                what=f"{row['architecture']} {label} (d_in {row['d_in']}, d_sae {row['d_sae']}, "
                f"batch {row['batch']}, {row['steps']} steps)",
                saeflow=row["saeflow_tokens_per_s"],
                reference=row["saelens_tokens_per_s"],
                reference_name="SAELens 6",
                unit="tok/s",
                ratio=row["ratio"],
                target=row["target_ratio"],
                met=row["met"],
                note=f"NMSE {row['saeflow_nmse']:.4f} vs {row['saelens_nmse']:.4f}; "
                f"L0 {row['saeflow_l0']:.1f} vs {row['saelens_l0']:.1f}",
            )
        )
    return out


def measure(steps: int = 30, warmup: int = 3, ks: str = "32,64,128") -> list[Figure]:
    """:func:`figures` of one run of :func:`main` at the issue's sizes (d_in 576, d_sae 4608,
    batch 4096) on SmolLM2 layer-10 activations, ``steps`` steps per SAE and side."""
    return figures(main(["--steps", str(steps), "--warmup", str(warmup), "--ks", ks]))


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per SAE, both sides")
    parser.add_argument("--warmup", type=int, default=5, help="first steps trained but not timed")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=8, help="d_sae = expansion x d_in")
    parser.add_argument("--ks", default="32,64,128", help="k of topk, batchtopk, matryoshka")
    parser.add_argument("--l1-targets", default="64", help="target L0s of relu, jumprelu, gated")
    parser.add_argument("--archs", default=",".join(TOPK_FAMILY + L0_FAMILY))
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam lr (training's)")
    parser.add_argument(
        "--schedule",
        choices=("saeflow", "constant"),
        default="saeflow",
        help="saeflow: training's warm-up (10%% of the steps at most) and 20%% linear decay",
    )
    parser.add_argument(
        "--n-tokens",
        type=int,
        default=100_000,
        help="tokens harvested (the study's 100k); batches cycle through them",
    )
    parser.add_argument("--eval-tokens", type=int, help="held-out tail (default: 2 batches)")
    parser.add_argument("--model", default=DEFAULT_LM)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--gaussian", action="store_true", help="synthetic vectors (smoke runs)")
    parser.add_argument("--d-in", type=int, default=576, help="with --gaussian only")
    parser.add_argument(
        "--saelens-l1",
        type=float,
        help="fixed SAELens λ for relu/gated (default: adapted toward the target L0)",
    )
    parser.add_argument(
        "--saelens-sparse-topk",
        action="store_true",
        help="SAELens topk with use_sparse_activations=True (and no decoder-norm rescale)",
    )
    parser.add_argument(
        "--saelens-init-b-dec",
        action="store_true",
        help="start SAELens' b_dec at saeflow's init (the sample's geometric median), not 0",
    )
    parser.add_argument(
        "--saelens-jumprelu-init",
        choices=("data", "saelens"),
        default="data",
        help="SAELens jumprelu threshold init: data = per latent, the pre-activation quantile "
        "that starts at --saelens-jumprelu-l0-factor x the target L0, decoder rows at unit "
        "norm (default; ends near saeflow's L0); saelens = its scalar jumprelu_init_threshold "
        "(stays dense over a short run)",
    )
    parser.add_argument(
        "--saelens-jumprelu-l0-factor",
        type=float,
        default=8.0,
        help="with the data init, SAELens' thresholds start at this x the target L0 (default 8: "
        "its L0 falls 6-9x in 30 steps on the default data and lands near saeflow's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must lie in [0, --steps {args.steps})")
    return args


def cases_of(args: argparse.Namespace) -> list[Case]:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(TOPK_FAMILY + L0_FAMILY))
    if unknown:
        raise SystemExit(f"--archs: unknown {unknown}; valid: {list(TOPK_FAMILY + L0_FAMILY)}")
    ks = [int(v) for v in args.ks.split(",") if v.strip()]
    targets = [int(v) for v in args.l1_targets.split(",") if v.strip()]
    cases = [Case(a, k) for a in TOPK_FAMILY if a in archs for k in ks]
    return cases + [Case(a, t) for a in L0_FAMILY if a in archs for t in targets]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        expansion=args.expansion,
        lr=args.lr,
        schedule=args.schedule,
        seed=args.seed,
        model="gaussian" if args.gaussian else args.model,
        layer=args.layer,
        corpus=args.corpus,
        saelens_l1=args.saelens_l1,
        saelens_sparse_topk=args.saelens_sparse_topk,
        saelens_init_b_dec=args.saelens_init_b_dec,
        saelens_jumprelu_init=args.saelens_jumprelu_init,
        saelens_jumprelu_l0_factor=args.saelens_jumprelu_l0_factor,
    )
    cases = cases_of(args)
    if args.gaussian:
        acts_ND, source = gaussian_activations(args.n_tokens, args.d_in, args.seed)
    else:
        acts_ND, source = harvested_activations(args.model, args.layer, args.corpus, args.n_tokens)
    n_eval = args.eval_tokens or 2 * args.batch
    data = split_and_order(acts_ND, n_eval, args.batch, args.steps, args.seed)
    data.source = source
    d_in = data.train_ND.shape[1]
    passes = args.steps * args.batch / data.train_ND.shape[0]
    l1_mode = "adapted to the target L0" if args.saelens_l1 is None else f"fixed {args.saelens_l1}"
    b_dec = "saeflow's init" if args.saelens_init_b_dec else "0"
    print(
        f"{source}\ntorch {torch.__version__}, {torch.get_num_threads()} threads; d_in {d_in}, "
        f"d_sae {d_in * args.expansion}, batch {args.batch}, {args.steps} steps "
        f"({args.warmup} untimed, {passes:.1f} passes over {data.train_ND.shape[0]:,} training "
        f"tokens), Adam lr {args.lr:g} ({args.schedule}); NMSE and L0 on "
        f"{data.eval_ND.shape[0]:,} held-out tokens; SAELens relu/gated λ {l1_mode}, "
        f"SAELens b_dec starts at {b_dec}, SAELens jumprelu threshold init "
        f"{args.saelens_jumprelu_init}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases:
        ours = run_saeflow(case, data, settings)
        theirs = run_saelens(case, data, settings)
        row = make_row(case, ours, theirs, data, settings)
        rows.append(row)
        print(format_row(row), flush=True)
        if not row["lr_schedules_match"]:
            print(f"  warning: the two lr schedules differ for {case.label}", flush=True)
        if args.json:
            write_json(args.json, rows, settings)  # after every row: a cut-short run keeps its rows
    print(
        "ratio = saeflow / SAELens tokens per second; NMSE = Σ‖x - x̂‖² / Σ‖x - mean‖² held out "
        "(lower is better); met = ratio >= target, saeflow NMSE <= SAELens NMSE and saeflow "
        "L0 <= 1.1 x SAELens L0 (relu/jumprelu/gated: compare the L0 columns first)"
    )
    return rows


if __name__ == "__main__":
    main()
