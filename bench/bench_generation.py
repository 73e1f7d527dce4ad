"""Steered generation (project/generation.py) against the LM's own ceiling and one prompt at a time.

    .venv/bin/python bench/bench_generation.py [--prompts 32] [--new-tokens 32] [--batch-size 32]

Three sides on the embedded SmolLM2, the same prompts (spread over saeflow's instruction pool),
the same batch size and number of new tokens:

- *ceiling*: the LM's own batched forward — a left-padded prefill, then one-token decode steps
  under the KV cache taking the argmax, no hook, no logits processor, no stopping: what the
  weights cost at these shapes, the most any generation loop can reach;
- *steered*: `generate_token_ids` with a different vector per prompt added at block 4 (every
  prompt position, every decode step), greedy and sampled at temperature 1 with one seeded
  generator per row (the steering protocol's setting);
- *one at a time*: the steered greedy side with batch size 1.

The figures are ratios within one run: steered tokens/s as a share of the ceiling's, batched over
one at a time, and how many greedy continuations are token-identical batched and alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

import torch

from bench.figures import Figure, met_target
from project.generation import AddVectors, GenerationConfig, generate_token_ids, prompt_token_ids
from project.lm import DEFAULT_LM, LoadedLM, load_lm


@torch.inference_mode()
def ceiling_seconds(lm: LoadedLM, prompts: list[str], new_tokens: int, batch_size: int) -> float:
    """Wall time of the LM's plain batched decode (module docstring) over ``prompts``."""
    ids = [prompt_token_ids(lm, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = lm.tokenizer.pad_token_id or 0
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [ids[i] for i in order[start : start + batch_size]]
        width = max(map(len, batch))
        input_BT = torch.full((len(batch), width), pad, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            input_BT[b, width - len(row) :] = torch.tensor(row)
            mask_BT[b, width - len(row) :] = 1
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits, as generate computes them (all of a 48-row prefill's
        # would be a [B, T, 49k] head product that no decoder needs).
        out = lm.model(
            input_ids=input_BT,
            attention_mask=mask_BT,
            position_ids=positions_BT,
            logits_to_keep=1,
        )
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            next_B1 = out.logits[:, -1].argmax(-1, keepdim=True)
            mask_BT = torch.cat([mask_BT, torch.ones_like(next_B1)], dim=1)
            positions_BT = positions_BT[:, -1:] + 1
            out = lm.model(
                input_ids=next_B1,
                attention_mask=mask_BT,
                position_ids=positions_BT,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
    return time.perf_counter() - started


def instruction_prompts(n: int) -> list[str]:
    """``n`` of saeflow's instructions, spread over the three genres so that prompt lengths vary
    as in a steering run."""
    pool = json.loads(
        resources.files("project.concepts").joinpath("instructions.json").read_text()
    )["instructions"]
    return [item["instruction"] for item in pool[:: max(1, len(pool) // n)]][:n]


@dataclass
class GenerationTimes:
    """One run of the three sides on the same prompts (seconds) and the generated tokens."""

    n_prompts: int
    new_tokens: int
    batch_size: int
    layer: int
    ceiling_s: float
    greedy_s: float
    sampled_s: float
    single_s: float
    greedy_tokens: int
    sampled_tokens: int
    single_tokens: int
    identical: int

    @property
    def ceiling_rate(self) -> float:
        return self.n_prompts * self.new_tokens / self.ceiling_s

    def rate(self, side: str) -> float:
        return getattr(self, f"{side}_tokens") / getattr(self, f"{side}_s")


def time_generation(
    lm: LoadedLM, n_prompts: int, new_tokens: int, batch_size: int, layer: int
) -> GenerationTimes:
    """The ceiling, steered greedy, steered sampled and one-at-a-time sides (module docstring)."""
    prompts = instruction_prompts(n_prompts)
    torch.manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(lm.d_model), dim=0)
    # Different strengths per prompt: the batched side must route each row its own vector.
    vectors_ND = direction_D * torch.linspace(0.0, 8.0, len(prompts))[:, None]
    intervention = AddVectors(vectors_ND)

    def run(batch: int, temperature: float = 0.0) -> tuple[list[list[int]], float]:
        config = GenerationConfig(
            max_new_tokens=new_tokens, temperature=temperature, batch_size=batch
        )
        started = time.perf_counter()
        out = generate_token_ids(lm, prompts, config, layer=layer, intervention=intervention)
        return out, time.perf_counter() - started

    run(batch_size)  # warm-up (allocator, first-call overheads)
    t_ceiling = ceiling_seconds(lm, prompts, new_tokens, batch_size)
    batched, t_batched = run(batch_size)
    sampled, t_sampled = run(batch_size, temperature=1.0)
    single, t_single = run(1)
    return GenerationTimes(
        n_prompts=len(prompts),
        new_tokens=new_tokens,
        batch_size=batch_size,
        layer=layer,
        ceiling_s=t_ceiling,
        greedy_s=t_batched,
        sampled_s=t_sampled,
        single_s=t_single,
        greedy_tokens=sum(map(len, batched)),
        sampled_tokens=sum(map(len, sampled)),
        single_tokens=sum(map(len, single)),
        identical=sum(a == b for a, b in zip(batched, single, strict=True)),
    )


def figures(t: GenerationTimes) -> list[Figure]:
    """The benchmark table's rows: sampled steered generation (the protocol's setting) as a
    share of the LM's plain batched decode (issue 19: ≥ 0.60), and batched over one prompt at a
    time."""
    shapes = f"{t.n_prompts} prompts × {t.new_tokens} tokens, batch {t.batch_size}"
    ratio = t.rate("sampled") / t.ceiling_rate
    return [
        Figure(
            section="generation",
            what=f"steered generation, sampled T=1, per-row vectors ({shapes})",
            saeflow=t.rate("sampled"),
            reference=t.ceiling_rate,
            reference_name="the LM's plain batched decode",
            unit="tok/s",
            ratio=ratio,
            target=0.6,
            met=met_target(ratio, 0.6),
            note=f"greedy {t.rate('greedy') / t.ceiling_rate:.2f} of it",
        ),
        Figure(
            section="generation",
            what=f"steered generation batched vs one prompt at a time ({shapes})",
            saeflow=t.rate("greedy"),
            reference=t.rate("single"),
            reference_name="one prompt at a time",
            unit="tok/s",
            ratio=t.rate("greedy") / t.rate("single"),
            note=f"{t.identical}/{t.n_prompts} greedy continuations identical",
        ),
    ]


def measure(
    n_prompts: int = 48,
    new_tokens: int = 24,
    batch_size: int = 48,
    layer: int = 10,
    model: str = DEFAULT_LM,
) -> list[Figure]:
    """:func:`figures` of one :func:`time_generation` run (defaults: the study's steering
    shapes)."""
    return figures(time_generation(load_lm(model), n_prompts, new_tokens, batch_size, layer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--model", default=DEFAULT_LM)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = time_generation(
        load_lm(args.model), args.prompts, args.new_tokens, args.batch_size, args.layer
    )
    print(
        f"{t.n_prompts} prompts x {t.new_tokens} new tokens, batch {t.batch_size}, "
        f"steering at block {t.layer}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"LM ceiling (plain batched decode): {t.ceiling_s:.1f}s, {t.ceiling_rate:.0f} tok/s")
    for name, side in (
        ("steered, greedy", "greedy"),
        ("steered, sampled (T=1)", "sampled"),
        ("steered, one at a time", "single"),
    ):
        seconds, rate = getattr(t, f"{side}_s"), t.rate(side)
        print(
            f"{name:24s} {seconds:.1f}s, {rate:.0f} tok/s = {rate / t.ceiling_rate:.2f} of the "
            "ceiling"
        )
    print(
        f"batched speed-up {t.single_s / t.greedy_s:.1f}x; identical greedy continuations "
        f"batched and alone {t.identical}/{t.n_prompts}"
    )


if __name__ == "__main__":
    main()
