"""The trained methods inside a steering run: write each concept's training pairs, train one
adapter per (concept, method), and hand the adapters to the protocol's targets.

Adapters depend on the LM, the concept, the training pairs and the method's settings, not on
the SAE: a process that steers several SAEs with the same concepts trains each adapter once
(remembered by those inputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from evaluation.steering.config import SteerConfig
from evaluation.steering.protocol import prompting_prompt
from evaluation.steering.trained.config import TrainedAdapter, TrainedConfig
from evaluation.steering.trained.pairs import (
    TrainingPairs,
    training_instructions,
    write_training_pairs,
)
from evaluation.steering.trained.train import train_adapter
from project.concepts import Instruction
from project.judges import Judge
from project.lm import LoadedLM, lm_fingerprint

log = logging.getLogger(__name__)

# The writer of pairs made from the concept's own positive example texts (the top-up).
WRITER_EXAMPLES = "concept examples"
# A written response is kept where the judge rates its concept at least this (0-2 scale).
MIN_CONCEPT = 1.0
# (LM, method settings, concept, pairs) -> adapter, for the life of the process.
_ADAPTERS: dict[str, TrainedAdapter] = {}


def trained_config(config: SteerConfig, method: str) -> TrainedConfig:
    """The :class:`TrainedConfig` of ``method`` in a steering run (0 = the method's default)."""
    base = TrainedConfig(
        method=method,
        max_response_tokens=config.trained_response_tokens,
        seed=config.seed,
        layers=tuple(config.trained_layers),
    )
    if config.trained_epochs:
        base = replace(base, epochs=config.trained_epochs)
    if config.trained_lr:
        base = replace(base, lr=float(config.trained_lr))
    return base


@dataclass
class TrainedSetup:
    """What training the run's methods took: the pairs per target, the per-method metrics."""

    pairs: list[TrainingPairs]
    metrics: dict[str, float] = field(default_factory=dict)

    # Per target: the pairs made from the concept's example texts (the top-up).
    from_examples: list[tuple[tuple[str, str], ...]] = field(default_factory=list)

    def pairs_table(self) -> dict[str, list[Any]]:
        """Every written response with its concept rating, whether the rating kept it
        (≥ :data:`MIN_CONCEPT`) and whether it was trained on; then the top-up pairs made
        from the concept's example texts (rating NaN, writer ``concept examples``)."""
        columns = ("concept", "instruction", "response", "concept_rating", "kept", "trained_on")
        table: dict[str, list[Any]] = {k: [] for k in (*columns, "writer")}

        def add(concept: str, instruction: str, response: str, rating: float, kept: bool,
                trained_on: bool, writer: str) -> None:  # fmt: skip
            for key, value in zip(
                (*columns, "writer"),
                (concept, instruction, response, rating, kept, trained_on, writer),
                strict=True,
            ):
                table[key].append(value)

        for p, extra in zip(self.pairs, self.from_examples or [()] * len(self.pairs), strict=True):
            trained_on = set(p.pairs)
            for instruction, response, rating in p.written:
                kept = rating >= MIN_CONCEPT and bool(response.strip())
                add(p.concept, instruction, response, rating, kept,
                    (instruction, response) in trained_on, p.writer)  # fmt: skip
            for instruction, response in extra:
                add(p.concept, instruction, response, math.nan, False, True, WRITER_EXAMPLES)
        return table


def topped_up(
    pairs: TrainingPairs, examples: Sequence[str], min_pairs: int
) -> tuple[TrainingPairs, tuple[tuple[str, str], ...]]:
    """``pairs`` with, where fewer than ``min_pairs`` were kept, pairs made from the concept's
    own positive example texts (the labelled data DiffMean and supervised selection learn
    from) answering the training instructions whose written response was not kept, in order;
    and those added pairs. A small LM under a prompting prompt rarely writes the concept into
    its answer, and a method trained on a handful of pairs is no baseline."""
    missing = min_pairs - pairs.n_kept
    if missing <= 0 or not examples:
        return pairs, ()
    kept = {i for i, _r in pairs.pairs}
    free = [i for i, _r, _x in pairs.written if i not in kept]
    extra = tuple(
        (instruction, examples[k % len(examples)]) for k, instruction in enumerate(free[:missing])
    )
    return replace(pairs, pairs=pairs.pairs + extra), extra


def _adapter_key(lm: LoadedLM, config: TrainedConfig, concept: str, pairs: TrainingPairs) -> str:
    payload = json.dumps(
        [lm_fingerprint(lm), asdict(config), concept, pairs.pairs], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def train_for_targets(
    targets: list[Any],
    lm: LoadedLM,
    judge: Judge,
    config: SteerConfig,
    pool: list[Instruction],
    steering_prompts: dict[str, str],
    examples: dict[str, Sequence[str]] | None = None,
) -> TrainedSetup:
    """For every target (its instruction split already set) and each method of
    ``config.trained``: training pairs on instructions outside its split (written ones kept
    by the judge, topped up to ``trained_min_pairs`` from the concept's ``examples``), an
    adapter trained on them (``target.adapters[method]``). Returns the pairs and the metrics
    to log."""
    examples = examples or {}
    started = time.perf_counter()
    instruction_lists = [
        training_instructions(
            t.concept,
            pool,
            (*t.split.dev, *t.split.test),
            config.trained_pairs,
            t.genre,
            config.seed,
        )
        for t in targets
    ]
    prompt_lists = [
        [
            prompting_prompt(t.concept, i.text, steering_prompts, config.prompt_template)
            for i in insts
        ]
        for t, insts in zip(targets, instruction_lists, strict=True)
    ]
    written = write_training_pairs(
        [t.concept for t in targets],
        instruction_lists,
        prompt_lists,
        lm,
        judge,
        response_tokens=config.trained_response_tokens,
        min_concept=MIN_CONCEPT,
        seed=config.seed,
        batch_size=config.batch_size,
    )
    setup = TrainedSetup([])
    for target, pairs in zip(targets, written, strict=True):
        pairs, extra = topped_up(pairs, examples.get(target.concept, ()), config.trained_min_pairs)
        setup.pairs.append(pairs)
        setup.from_examples.append(extra)
    metrics = setup.metrics
    metrics["trained_pairs_written"] = float(sum(p.n_written for p in written))
    metrics["trained_pairs_kept"] = float(sum(p.n_kept for p in written))
    metrics["trained_pairs_from_examples"] = float(sum(map(len, setup.from_examples)))
    metrics["trained_concepts_topped_up"] = float(sum(bool(e) for e in setup.from_examples))
    metrics["trained_data_seconds"] = time.perf_counter() - started
    for method in config.trained:
        method_config = trained_config(config, method)
        seconds = tokens = 0.0
        first, last = [], []
        for target, pairs in zip(targets, setup.pairs, strict=True):
            key = _adapter_key(lm, method_config, target.concept, pairs)
            adapter = _ADAPTERS.get(key)
            if adapter is None:
                adapter = train_adapter(lm, list(pairs.pairs), method_config)
                _ADAPTERS[key] = adapter
                seconds += adapter.seconds
                tokens += adapter.n_tokens
            target.adapters[method] = adapter
            if adapter.losses:
                first.append(adapter.losses[0])
                last.append(adapter.losses[-1])
        n_parameters = next(iter(t.adapters[method].n_parameters for t in targets), 0)
        metrics[f"{method}_train_seconds"] = seconds
        metrics[f"{method}_train_tokens"] = tokens
        metrics[f"{method}_parameters"] = float(n_parameters)
        if first:
            metrics[f"{method}_first_loss"] = sum(first) / len(first)
            metrics[f"{method}_final_loss"] = sum(last) / len(last)
        log.info(
            "trained %s on %d concepts in %.0fs (%d tokens; loss %.3f -> %.3f)",
            method,
            len(targets),
            seconds,
            tokens,
            metrics.get(f"{method}_first_loss", float("nan")),
            metrics.get(f"{method}_final_loss", float("nan")),
        )
    return setup
