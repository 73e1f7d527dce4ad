"""Batched generation (project/generation.py) against one prompt at a time, same greedy outputs.

    .venv/bin/python bench/bench_generation.py [--prompts 32] [--new-tokens 32] [--batch-size 32]

Both sides run `generate_token_ids` on the embedded SmolLM2 with a steering vector added at
block 4 (every prompt position and every decode step), greedy, on the first prompts of
saeflow's instruction pool; the batched side left-pads batches of `--batch-size`. The ratio of
wall times is the figure; the script also reports how many continuations are token-identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources

import torch

from project.generation import AddVectors, GenerationConfig, generate_token_ids
from project.lm import DEFAULT_LM, load_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--model", default=DEFAULT_LM)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    pool = json.loads(
        resources.files("project.concepts").joinpath("instructions.json").read_text()
    )["instructions"]
    # Spread over the three genres so prompt lengths vary as in a steering run.
    prompts = [item["instruction"] for item in pool[:: max(1, len(pool) // args.prompts)]][
        : args.prompts
    ]
    lm = load_lm(args.model)
    torch.manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(lm.d_model), dim=0)
    # Different strengths per prompt: the batched side must route each row its own vector.
    vectors_ND = direction_D * torch.linspace(0.0, 8.0, len(prompts))[:, None]
    intervention = AddVectors(vectors_ND)

    def run(batch_size: int) -> tuple[list[list[int]], float]:
        config = GenerationConfig(
            max_new_tokens=args.new_tokens, temperature=0.0, batch_size=batch_size
        )
        started = time.perf_counter()
        out = generate_token_ids(lm, prompts, config, layer=args.layer, intervention=intervention)
        return out, time.perf_counter() - started

    run(args.batch_size)  # warm-up (allocator, first-call overheads)
    batched, t_batched = run(args.batch_size)
    single, t_single = run(1)
    identical = sum(a == b for a, b in zip(batched, single, strict=True))
    n_tokens = sum(map(len, batched))
    print(
        f"{len(prompts)} prompts x {args.new_tokens} new tokens, greedy, steering at block "
        f"{args.layer}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"batched (batch {args.batch_size}): {t_batched:.1f}s, {n_tokens / t_batched:.0f} tok/s")
    print(
        f"one at a time:            {t_single:.1f}s, {sum(map(len, single)) / t_single:.0f} tok/s"
    )
    print(
        f"speed-up {t_single / t_batched:.1f}x; identical continuations {identical}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
