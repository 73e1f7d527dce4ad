"""Batched selection scores against the direct computation, on the same latents.

    .venv/bin/python bench/bench_selection.py [--model_uri models:/NAME/VERSION] [--latents 16]
        [--all]

Both sides compute the output score and DTC in both interventions for the same latents of an
SAE on the embedded SmolLM2 (a registered version, or a seeded random TopK SAE of d_sae 2304 at
layer 4). Direct: per latent and score, one clean and one intervened full forward, the SAE
encoding the live hidden state in a hook, no batching. Batched: the prefix's hook activation
once, latents along the batch dimension, only the blocks after the hook. Reports both wall
times, the ratio and the largest absolute difference; ``--all`` also times every latent of the
SAE on the batched path (the 2-minute target for d_sae 2304).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from evaluation.hook_cache import HookCache
from evaluation.selection.config import SelectionConfig
from evaluation.selection.scores import direct_scores, intervened_scores
from project.lm import DEFAULT_LM, load_lm
from project.logit_lens import decoder_lens_tokens
from project.saes import SAEConfig, build_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", default="")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--batch_latents", type=int, default=64)
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    lm = load_lm(DEFAULT_LM)
    if args.model_uri:
        from project.registry import load_sae

        sae = load_sae(args.model_uri)
    else:
        torch.manual_seed(0)
        sae = build_sae(
            SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=4 * lm.d_model, k=32)
        ).eval()
    config = SelectionConfig(batch_latents=args.batch_latents)
    gen = torch.Generator().manual_seed(0)
    # A stand-in for the held-out max activations: only the scale of the DTC code matters here.
    max_F = torch.rand(sae.cfg.d_sae, generator=gen) * 5 + 1
    lens_FL = decoder_lens_tokens(lm, sae.W_dec, config.lens_tokens)
    latents = torch.randperm(sae.cfg.d_sae, generator=gen)[: args.latents]
    load = os.getloadavg()[0]

    cache = HookCache()
    started = time.perf_counter()
    batched = intervened_scores(
        sae,
        lm,
        args.layer,
        config,
        latents=latents,
        max_activation_F=max_F,
        lens_FL=lens_FL,
        hook_cache=cache,
        progress=False,
    )
    t_batched = time.perf_counter() - started
    started = time.perf_counter()
    direct = direct_scores(
        sae, lm, args.layer, config, latents, max_activation_F=max_F, lens_FL=lens_FL
    )
    t_direct = time.perf_counter() - started
    diff = max(float((batched[k] - direct[k]).abs().max()) for k in batched)
    print(
        f"{len(latents)} latents x 3 scores: direct {t_direct:.1f}s, batched {t_batched:.1f}s, "
        f"ratio {t_direct / t_batched:.1f}x, max |diff| {diff:.2e} (load average {load:.1f}, "
        f"{torch.get_num_threads()} threads)"
    )
    for name in batched:
        print(f"  {name}: max |diff| {float((batched[name] - direct[name]).abs().max()):.2e}")
    if args.all:
        started = time.perf_counter()
        intervened_scores(
            sae,
            lm,
            args.layer,
            config,
            max_activation_F=max_F,
            lens_FL=lens_FL,
            hook_cache=cache,
        )
        t_all = time.perf_counter() - started
        print(
            f"all {sae.cfg.d_sae} latents, batched: {t_all:.1f}s "
            f"(load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
