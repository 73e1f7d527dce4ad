"""Batched selection scores against the direct computation, on the same latents.

    .venv/bin/python bench/bench_selection.py [--model_uri models:/NAME/VERSION] [--latents 16]
        [--all]

Both sides compute the output score and DTC in both interventions for the same latents of an
SAE on the embedded SmolLM2 (a registered version, or a seeded random TopK SAE of d_sae 2304 at
layer 4). Direct: per latent and score, one clean and one intervened full forward, the SAE
encoding the live hidden state in a hook, no batching. Batched: the prefix's hook activation
once, latents along the batch dimension, only the blocks after the hook. Reports both wall
times, the ratio and the largest absolute difference; ``--all`` also times every score of every
latent of the SAE (the 2-minute target for d_sae 2304), phase by phase, in wall and CPU seconds
(``--latents 0`` skips the comparison).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from bench.figures import Figure, speedup_from_seconds
from evaluation.selection.config import SelectionConfig
from evaluation.selection.scores import (
    direct_scores,
    input_scores,
    intervened_scores,
    scan_latents,
)
from project.hook_cache import HookCache
from project.lm import DEFAULT_LM, LoadedLM, load_lm
from project.logit_lens import decoder_lens_tokens
from project.saes import SAEConfig, SparseAutoencoder, build_sae

T = TypeVar("T")


def default_sae(lm: LoadedLM) -> SparseAutoencoder:
    """A seeded random TopK SAE of d_sae 4 × d_model (k 32) on ``lm``."""
    torch.manual_seed(0)
    return build_sae(
        SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=4 * lm.d_model, k=32)
    ).eval()


def score_inputs(
    lm: LoadedLM, sae: SparseAutoencoder, config: SelectionConfig, n_latents: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(max activations, decoder-lens tokens, latents to score), seeded: both sides' inputs."""
    gen = torch.Generator().manual_seed(0)
    # A stand-in for the held-out max activations: only the scale of the DTC code matters here.
    max_F = torch.rand(sae.cfg.d_sae, generator=gen) * 5 + 1
    lens_FL = decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
    latents = torch.randperm(sae.cfg.d_sae, generator=gen)[:n_latents]
    return max_F, lens_FL, latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", default="")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--batch_latents", type=int, default=SelectionConfig.batch_latents)
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    lm = load_lm(DEFAULT_LM)
    if args.model_uri:
        from project.registry import load_sae

        sae = load_sae(args.model_uri)
    else:
        sae = default_sae(lm)
    config = SelectionConfig(batch_latents=args.batch_latents)
    max_F, lens_FL, latents = score_inputs(lm, sae, config, args.latents)
    load = os.getloadavg()[0]

    if args.latents > 0:
        t = compare(sae, lm, args.layer, config, latents, max_F, lens_FL)
        print(
            f"{t.n_latents} latents x 3 scores: direct {t.direct_s:.1f}s, batched "
            f"{t.batched_s:.1f}s, ratio {t.direct_s / t.batched_s:.1f}x, max |diff| "
            f"{max(t.diffs.values()):.2e} (load average {load:.1f}, "
            f"{torch.get_num_threads()} threads)"
        )
        for name, diff in t.diffs.items():
            print(f"  {name}: max |diff| {diff:.2e}")
    if args.all:
        time_all_latents(sae, lm, args.layer, config, max_F)


@dataclass
class SelectionTimes:
    n_latents: int
    direct_s: float
    batched_s: float
    diffs: dict[str, float]


def compare(
    sae: SparseAutoencoder,
    lm: LoadedLM,
    layer: int,
    config: SelectionConfig,
    latents: Tensor,
    max_F: Tensor,
    lens_FL: Tensor,
) -> SelectionTimes:
    """Batched against direct on ``latents``: both wall times and each score's largest
    difference."""
    cache = HookCache()
    started = time.perf_counter()
    batched = intervened_scores(
        sae,
        lm,
        layer,
        config,
        latents=latents,
        max_activation_F=max_F,
        lens_FL=lens_FL,
        hook_cache=cache,
        progress=False,
    )
    t_batched = time.perf_counter() - started
    started = time.perf_counter()
    direct = direct_scores(sae, lm, layer, config, latents, max_activation_F=max_F, lens_FL=lens_FL)
    t_direct = time.perf_counter() - started
    diffs = {k: float((batched[k] - direct[k]).abs().max()) for k in batched}
    return SelectionTimes(len(latents), t_direct, t_batched, diffs)


def measure(n_latents: int = 16, layer: int = 10, batch_latents: int = 64) -> list[Figure]:
    """Batched selection scores against the direct computation on a seeded random TopK SAE
    (d_sae 2304) of the embedded SmolLM2: one table row (no stated target)."""
    lm = load_lm(DEFAULT_LM)
    sae = default_sae(lm)
    config = SelectionConfig(batch_latents=batch_latents)
    max_F, lens_FL, latents = score_inputs(lm, sae, config, n_latents)
    t = compare(sae, lm, layer, config, latents, max_F, lens_FL)
    return [
        Figure(
            section="selection",
            what=f"output score + DTC (both interventions), {t.n_latents} latents, batched",
            saeflow=t.batched_s,
            reference=t.direct_s,
            reference_name="per latent, one full forward each",
            unit="s",
            ratio=speedup_from_seconds(t.batched_s, t.direct_s),
            note=f"max |diff| {max(t.diffs.values()):.1e}",
        )
    ]


def _timed(phases: dict[str, tuple[float, float]], name: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, recording (wall, process CPU) seconds: on a shared machine the CPU time is
    the load-independent figure (with one thread it is the unloaded wall time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    phases[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return out


def time_all_latents(
    sae: SparseAutoencoder, lm: LoadedLM, layer: int, config: SelectionConfig, max_F: Tensor
) -> None:
    """Every score of every latent, phase by phase, as the selection table computes them: the
    logit lens, the held-out scan (max activation, frequency, top examples), the input score
    and the batched intervened passes (output score, DTC both ways)."""
    phases: dict[str, tuple[float, float]] = {}
    load = os.getloadavg()[0]
    lens_FL = _timed(
        phases, "logit lens", lambda: decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
    )
    scan = _timed(phases, "scan", lambda: scan_latents(sae, lm, layer, config))
    _timed(
        phases,
        "input score",
        lambda: input_scores(
            scan["example_max_EF"],
            scan["example_token_EF"],
            lens_FL,
            config.input_examples,
            config.input_min_examples,
        ),
    )
    _timed(
        phases,
        "intervened passes",
        lambda: intervened_scores(
            sae, lm, layer, config, max_activation_F=max_F, lens_FL=lens_FL, progress=False
        ),
    )
    wall = sum(w for w, _ in phases.values())
    cpu = sum(c for _, c in phases.values())
    print(
        f"all {sae.cfg.d_sae} latents, every score: {wall:.1f}s wall, {cpu:.1f}s CPU "
        f"(load average {load:.1f} -> {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads)"
    )
    for name, (w, c) in phases.items():
        print(f"  {name}: {w:.1f}s wall, {c:.1f}s CPU")


if __name__ == "__main__":
    main()
