"""Training throughput of saeflow's SAEs against SAELens's, side by side in one run.

    .venv/bin/python bench/bench_training.py [--steps 8] [--d-in 576] [--expansion 8] [--k 64]

Both sides run the same loop on the same activations: forward + loss, backward, Adam step,
decoder renormalisation. Absolute tokens/s depend on the machine; the ratio is the figure.
The activations are Gaussian vectors: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from project.saes import SAEConfig, TrainStep, build_sae


def time_steps(step_fn: Callable[[int], None], steps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        step_fn(i)
    started = time.perf_counter()
    for i in range(steps):
        step_fn(warmup + i)
    return time.perf_counter() - started


def saeflow_step_fn(architecture: str, d_in: int, d_sae: int, k: int, acts: torch.Tensor):
    cfg = SAEConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k if architecture == "topk" else None,
        target_l0=float(k),
    )
    sae = build_sae(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)

    def step(i: int) -> None:
        out = sae.loss(acts, TrainStep(step=i, total_steps=10_000))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    return step


def saelens_step_fn(architecture: str, d_in: int, d_sae: int, k: int, acts: torch.Tensor):
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0)
        )
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 10] = True  # exercise the AuxK path as a real run would
    coefficients = {
        name: (c.value if hasattr(c, "value") else c) for name, c in sae.get_coefficients().items()
    }

    def step(i: int) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=acts,
                coefficients=coefficients,
                dead_neuron_mask=dead,
                n_training_steps=i,
                is_logging_step=False,
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if hasattr(sae, "remove_gradient_parallel_to_decoder_directions"):
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    d_sae = args.d_in * args.expansion
    acts = torch.randn(args.batch, args.d_in)
    tokens = args.batch * args.steps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_in {args.d_in}, "
        f"d_sae {d_sae}, batch {args.batch}, k {args.k}, {args.steps} timed steps"
    )
    print(f"{'architecture':12s} {'saeflow tok/s':>14s} {'SAELens tok/s':>14s} {'ratio':>7s}")
    for architecture in ("topk", "relu"):
        ours = time_steps(saeflow_step_fn(architecture, args.d_in, d_sae, args.k, acts), args.steps)
        theirs = time_steps(
            saelens_step_fn(architecture, args.d_in, d_sae, args.k, acts), args.steps
        )
        print(
            f"{architecture:12s} {tokens / ours:14.0f} {tokens / theirs:14.0f} {theirs / ours:7.2f}x"
        )


if __name__ == "__main__":
    main()
