"""Training LoRA and LoReFT (evaluation/steering/trained/) on the embedded SmolLM2: seconds per
concept, tokens/s, and whether the loss falls.

    .venv/bin/python bench/bench_trained.py [--concepts 2] [--pairs 36] [--held-out 8]
        [--methods lora,loreft] [--lrs 2e-3,5e-3] [--epochs 3] [--batch-size 6]
        [--max-response-tokens 64] [--json rows.json]

Data: for each of ``--concepts`` shipped (stdlib) concepts, ``--pairs`` training pairs and
``--held-out`` pairs more, each an instruction of saeflow's builtin pool (a sample seeded by
the concept) with one of the concept's example texts as the response, cut to
``--max-response-tokens``: real text of one topic whatever the instruction, which is what an
AxBench concept's responses are. Unset options take :class:`TrainedConfig`'s CPU defaults
(``--lrs`` empty: the method's default lr).

Each row (method, lr, concept) prints the training seconds and real tokens/s (padding not
counted; tokenisation and the held-out losses not timed), the trainable parameters, the
training loss at the first step and its mean over the last epoch, and the held-out response
loss of the plain LM and of the adapter (eval mode, through the per-row steering hooks): the
falls that say whether the budget learnt the concept rather than the training pairs. The load
average is printed: timings on a busy 2-core machine are not the machine's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import fields, replace

import torch

from evaluation.steering.trained import (
    TrainedConfig,
    response_loss,
    train_adapter,
    trainable_parameters,
)
from project.concepts import load_concepts, load_instructions
from project.lm import DEFAULT_LM, load_lm


def concept_pairs(
    n_concepts: int, n_pairs: int, n_held_out: int, seed: int
) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, str]]]]:
    """(concept, training pairs, held-out pairs) for ``n_concepts`` stdlib concepts."""
    pool = [i.text for i in load_instructions("builtin")]
    n = n_pairs + n_held_out
    out = []
    # At least two: a lone concept has no other to borrow negatives from (unused here).
    for concept in load_concepts("stdlib", max(2, n_concepts), n, seed)[:n_concepts]:
        rng = random.Random(f"bench-trained:{seed}:{concept.concept}")
        # More pairs than instructions: the pool again, in another order.
        instructions = [
            t for _ in range(math.ceil(n / len(pool))) for t in rng.sample(pool, len(pool))
        ]
        texts = list(concept.positives[:n])
        if len(texts) < n:
            raise ValueError(f"concept {concept.concept!r} has {len(texts)} texts, not {n}")
        pairs = list(zip(instructions[:n], texts, strict=True))
        out.append((concept.concept, pairs[:n_pairs], pairs[n_pairs:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LM)
    parser.add_argument("--concepts", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=36)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--methods", default="lora,loreft")
    parser.add_argument("--lrs", default="", help="comma-separated; empty: the method's default")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-response-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("max_response_tokens", args.max_response_tokens),
        )
        if v is not None
    }
    lrs: list[float | None] = [float(x) for x in args.lrs.split(",") if x] or [None]
    lm = load_lm(args.model)
    data = concept_pairs(args.concepts, args.pairs, args.held_out, args.seed)
    base = TrainedConfig(**overrides)
    print(
        f"{lm.name}: {len(data)} concepts x {args.pairs} pairs (+{args.held_out} held out); "
        f"epochs {base.epochs}, batch {base.batch_size}, responses <= "
        f"{base.max_response_tokens} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    plain = {
        name: response_loss(lm, held, None, max_response_tokens=base.max_response_tokens)
        for name, _, held in data
    }
    rows = []
    header = (
        f"{'method':7s} {'lr':>7s} {'concept':32s} {'s':>6s} {'tok/s':>6s} {'params':>7s} "
        f"{'loss 1st':>8s} {'last ep':>8s} {'held plain':>10s} {'held adapt':>10s}"
    )
    print(header)
    for method in args.methods.split(","):
        for lr in lrs:
            config = replace(base, method=method, lr=lr)
            for name, pairs, held in data:
                started = time.perf_counter()
                adapter = train_adapter(lm, pairs, config)
                seconds = time.perf_counter() - started
                per_epoch = math.ceil(len(pairs) / config.batch_size)
                last_epoch = sum(adapter.losses[-per_epoch:]) / per_epoch
                held_loss = response_loss(
                    lm, held, adapter, max_response_tokens=config.max_response_tokens
                )
                row = {
                    "method": method,
                    "lr": config.learning_rate,
                    "concept": name,
                    "seconds": seconds,
                    "train_seconds": adapter.seconds,
                    "tokens": adapter.n_tokens,
                    "tokens_per_s": adapter.n_tokens / adapter.seconds,
                    "parameters": trainable_parameters(config, lm),
                    "loss_first": adapter.losses[0],
                    "loss_last_epoch": last_epoch,
                    "held_plain": plain[name],
                    "held_adapter": held_loss,
                    "config": {f.name: getattr(config, f.name) for f in fields(config)},
                }
                rows.append(row)
                print(
                    f"{method:7s} {row['lr']:7.0e} {name[:32]:32s} {seconds:6.1f} "
                    f"{row['tokens_per_s']:6.0f} {row['parameters']:7d} {row['loss_first']:8.3f} "
                    f"{last_epoch:8.3f} {plain[name]:10.3f} {held_loss:10.3f}",
                    flush=True,
                )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
