"""Training data of the trained steering methods (METHODS §3): per concept, (instruction,
response that brings in the concept) pairs.

AxBench has gpt-4o-mini write 72 responses per concept. saeflow has the judge's LLM write them
where the judge is a chat model (:meth:`Judge.concept_response`); the offline judge writes
none, so the steered LM itself answers under the concept's prompting prompt (the prompting
reference's own prompt). Either way the judge rates each response's concept and only those
rated ≥ ``min_concept`` are kept: a response that does not carry the concept teaches nothing
about it. Training instructions are drawn from the pool minus the concept's own dev and test
instructions, so no evaluation instruction is ever trained on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from project.concepts import Instruction
from project.generation import GenerationConfig, generate
from project.judges import Judge
from project.lm import LoadedLM

WRITER_JUDGE = "judge"
WRITER_LM = "steered LM under the prompting prompt"


@dataclass(frozen=True)
class TrainingPairs:
    """One concept's training data: the kept pairs, every written response with its concept
    rating (for the run's table), and who wrote them."""

    concept: str
    pairs: tuple[tuple[str, str], ...]
    written: tuple[tuple[str, str, float], ...]  # (instruction, response, concept rating)
    writer: str

    @property
    def n_written(self) -> int:
        return len(self.written)

    @property
    def n_kept(self) -> int:
        return len(self.pairs)


def training_instructions(
    concept: str,
    pool: Sequence[Instruction],
    held_out: Sequence[Instruction],
    n: int,
    genre: str | None,
    seed: int,
) -> list[Instruction]:
    """``n`` instructions (all there are, if fewer) for training on ``concept``: none of
    ``held_out`` (its dev and test instructions), the concept's genre first where the pool has
    enough of it, in an order seeded by (seed, concept)."""
    excluded = {i.text for i in held_out}
    usable = [i for i in pool if i.text not in excluded]
    same_genre = [i for i in usable if genre is not None and i.genre == genre]
    ordered = same_genre + [i for i in usable if i not in same_genre]
    rng = random.Random(f"training:{seed}:{concept}")
    if len(same_genre) >= n:
        return rng.sample(same_genre, n)
    rest = ordered[len(same_genre) :]
    return same_genre + rng.sample(rest, min(n - len(same_genre), len(rest)))


def write_training_pairs(
    concepts: Sequence[str],
    instructions: Sequence[Sequence[Instruction]],
    prompts: Sequence[Sequence[str]],
    lm: LoadedLM,
    judge: Judge,
    *,
    response_tokens: int,
    min_concept: float = 1.0,
    seed: int = 0,
    batch_size: int = 48,
) -> list[TrainingPairs]:
    """Per concept, a response to each of its training ``instructions``: the judge's LLM's, or
    where it writes none, the LM's answer (sampled at temperature 1, ``response_tokens`` new
    tokens) to the matching prompting prompt of ``prompts``; then each response's concept
    rating, all concepts in one judge call, and the pairs rated ≥ ``min_concept``."""
    from evaluation.steering.protocol import ask_judge

    if not (len(concepts) == len(instructions) == len(prompts)):
        raise ValueError(
            f"{len(concepts)} concepts, {len(instructions)} instruction lists and "
            f"{len(prompts)} prompt lists: one each per concept"
        )
    responses: list[list[str | None]] = [
        [judge.concept_response(c, i.text) for i in insts]
        for c, insts in zip(concepts, instructions, strict=True)
    ]
    writers = [
        WRITER_JUDGE if rs and all(r is not None for r in rs) else WRITER_LM for rs in responses
    ]
    # The LM answers every prompt of the concepts the judge wrote nothing for, in one batch.
    todo = [
        (c_index, k)
        for c_index, writer in enumerate(writers)
        if writer == WRITER_LM
        for k in range(len(instructions[c_index]))
    ]
    if todo:
        config = GenerationConfig(
            max_new_tokens=response_tokens, temperature=1.0, seed=seed, batch_size=batch_size
        )
        texts = generate(
            lm, [prompts[c][k] for c, k in todo], config, progress="trained: write responses"
        )
        for (c, k), text in zip(todo, texts, strict=True):
            responses[c][k] = text
    questions = [
        ("concept", r or "", concept)
        for concept, rs in zip(concepts, responses, strict=True)
        for r in rs
    ]
    ratings = ask_judge(questions, judge)
    out = []
    for concept, insts, rs, writer in zip(concepts, instructions, responses, writers, strict=True):
        written = tuple(
            (i.text, r or "", float(ratings[("concept", r or "", concept)] or 0.0))
            for i, r in zip(insts, rs, strict=True)
        )
        pairs = tuple(
            (instruction, response)
            for instruction, response, rating in written
            if rating >= min_concept and response.strip()
        )
        out.append(TrainingPairs(concept, pairs, written, writer))
    return out
