"""The selection criteria as steering selections (``steer -P selection=NAME``).

:func:`register_selections` adds to the steering registry (a name → ``(context) -> list[int]``
dict) one entry per criterion. Each returns the same number of latents, best first: the
top ``1 − q`` share of the live latents by its score (q = 0.90, the middle of the DTC paper's
tail quantiles), so criteria are compared at one subset size, as the paper does. Latent-first
steering takes the first ``n_concepts`` of them; concept-first steering picks each concept's
latent inside the set. ``random`` is a seeded random subset of the same size (the fair
baseline in concept mode, where ``none`` offers every live latent); ``supervised`` ranks by
the best calibrated F1 over the shipped concepts' labelled tokens. Scores are computed
batched with the default :class:`SelectionConfig` and the steering table's max activations
(``context``), once per SAE and process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from evaluation.selection.config import SelectionConfig
from evaluation.selection.rules import random_order, top_k
from evaluation.selection.scores import compute_scores, intervened_scores
from evaluation.selection.supervised import supervised_scores

# name → (score column, direction)
CRITERIA: dict[str, tuple[str, str]] = {
    "dtc": ("dtc_in_place", "abs"),
    "dtc_up": ("dtc_in_place", "up"),
    "dtc_down": ("dtc_in_place", "down"),
    "dtc_alone": ("dtc_decoded_alone", "abs"),
    "output_score": ("output_score", "up"),
    "input_score": ("input_score", "up"),
    "max_activation": ("max_activation", "up"),
}
# Criteria beyond the score columns: an equal-size random subset; supervised calibrated F1.
EXTRA = ("random", "supervised")
SUBSET_QUANTILE = 0.90
# The labelled concepts ``supervised`` scores against (steering's ``concepts`` forms).
SUPERVISED_CONCEPTS = "stdlib"
_SCORES: dict[str, dict[str, Tensor]] = {}


def _key(context: Any) -> str:
    """Identity of (SAE weights, LM, layer, m_i): steering loads the SAE afresh per run, and
    several selections on one version in one process should compute the scores once."""
    h = hashlib.sha256(f"{id(context.lm.model)}:{context.layer}".encode())
    for t in (context.sae.W_dec, context.sae.b_dec, context.max_activation_F):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _scores(context: Any, column: str) -> Tensor:
    """The column for ``context.sae`` (computed on first use; the scan only for input_score)."""
    if column == "max_activation":
        return context.max_activation_F
    cached = _SCORES.setdefault(_key(context), {})
    if column not in cached:
        stats = {
            "max_activation": context.max_activation_F,
            "firing_frequency": context.firing_frequency_F,
        }
        if column == "input_score":
            computed = compute_scores(
                context.sae, context.lm, context.layer, SelectionConfig(), latent_stats=stats
            )
        else:
            computed = intervened_scores(
                context.sae,
                context.lm,
                context.layer,
                SelectionConfig(),
                max_activation_F=context.max_activation_F,
                scores=(column,),  # one intervened pass per latent, not three
            )
        cached.update({k: v for k, v in computed.items() if k != "lens_FL"})
    return cached[column]


def subset_size(context: Any, q: float = SUBSET_QUANTILE) -> int:
    """``round((1 − q) · live latents)``, at least 1: every criterion's subset size."""
    live = int(((context.firing_frequency_F > 0) & (context.max_activation_F > 0)).sum())
    return max(1, round((1 - q) * live)) if live else 0


def criterion(name: str) -> Callable[[Any], list[int]]:
    """The selection function of criterion ``name`` (a key of :data:`CRITERIA` or
    ``random``)."""
    live = lambda c: (c.firing_frequency_F > 0) & (c.max_activation_F > 0)  # noqa: E731
    if name == "random":

        def select_random(context: Any) -> list[int]:
            order = random_order(context.max_activation_F, context.seed, live(context))
            return order[: subset_size(context)]

        return select_random
    if name == "supervised":

        def select_supervised(context: Any) -> list[int]:
            scores_F = supervised_over_concepts(context, SUPERVISED_CONCEPTS)
            live_F = live(context)
            n = min(subset_size(context), int((live_F & scores_F.isfinite()).sum()))
            return top_k(scores_F, n, "up", live_F) if n else []

        return select_supervised
    if name not in CRITERIA:
        valid = ", ".join([*CRITERIA, *EXTRA])
        raise ValueError(f"unknown criterion {name!r}; valid criteria: {valid}")
    column, direction = CRITERIA[name]

    def select(context: Any) -> list[int]:
        scores_F = _scores(context, column).double()
        live_F = live(context)
        n = min(subset_size(context), int((live_F & scores_F.isfinite()).sum()))
        return top_k(scores_F, n, direction, live_F) if n else []

    select.__doc__ = f"The top {1 - SUBSET_QUANTILE:.0%} of live latents by {column}, {direction}."
    return select


def supervised_over_concepts(
    context: Any, concepts: str = "stdlib", n_concepts: int | None = None, n_examples: int = 16
) -> Tensor:
    """Per latent, its best calibrated F1 over the steering concepts' labelled tokens (the
        shipped set by default; steering's selection context does not say which concepts a run
        uses, so this is the set its defaults draw: 6 shipped concepts, or every concept of a
    file). NaN below the support of 50."""
    from project.concepts import load_concepts, read_concepts_file

    if n_concepts is None:  # steering's default count, or every concept of a file
        n_concepts = 6 if concepts == "stdlib" else len(read_concepts_file(concepts))

    cached = _SCORES.setdefault(_key(context), {})
    name = f"supervised:{concepts}:{n_concepts}:{n_examples}:{context.seed}"
    if name not in cached:
        best_F = torch.full((context.sae.cfg.d_sae,), float("nan"), dtype=torch.float64)
        for concept in load_concepts(concepts, n_concepts, n_examples, context.seed):
            f1_F = supervised_scores(
                context.sae,
                context.lm,
                context.layer,
                list(concept.positives),
                list(concept.negatives),
            ).f1_F
            best_F = torch.fmax(best_F, f1_F)  # fmax: NaN only where both are NaN
        cached[name] = best_F
    return cached[name]


def register_selections(selections: dict[str, Callable[[Any], list[int]]]) -> None:
    """Add every criterion of :data:`CRITERIA`, ``random`` and ``supervised`` to a steering
    selection registry."""
    for name in [*CRITERIA, *EXTRA]:
        selections.setdefault(name, criterion(name))
