"""Latent selection: which latents of an SAE are candidates for steering (METHODS.md §4).

A criterion is a function ``(context) -> list[int]`` of candidate latent ids, best first,
registered by name in :data:`SELECTIONS`. Latent-first steering takes the first ``n_concepts``
candidates; concept-first steering picks, per concept, the candidate with the best max-pooled
AUROC. ``none`` is the no-selection baseline: every live latent in a seeded random order.
The selection issue adds its criteria (output score, DTC, ...) here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from project.lm import LoadedLM
from project.saes import SparseAutoencoder


@dataclass
class SelectionContext:
    """What a criterion may use: the SAE, its LM and hook layer, the per-latent table, a seed."""

    sae: SparseAutoencoder
    lm: LoadedLM
    layer: int
    max_activation_F: Tensor
    firing_frequency_F: Tensor
    seed: int


def live_latents(context: SelectionContext) -> Tensor:
    """Ids of the latents that fired at least once in the held-out scan."""
    return torch.nonzero((context.firing_frequency_F > 0) & (context.max_activation_F > 0))[:, 0]


def select_none(context: SelectionContext) -> list[int]:
    """Every live latent, in a random order seeded by ``context.seed``."""
    live = live_latents(context)
    order = torch.randperm(len(live), generator=torch.Generator().manual_seed(context.seed))
    return live[order].tolist()


SELECTIONS: dict[str, Callable[[SelectionContext], list[int]]] = {"none": select_none}


def check_selection(name: str) -> str:
    """``name`` if it is a registered criterion, else ValueError listing the valid ones."""
    if name not in SELECTIONS:
        raise ValueError(f"unknown selection {name!r}; valid selections: {', '.join(SELECTIONS)}")
    return name


def select(name: str, context: SelectionContext) -> list[int]:
    """The candidates of criterion ``name``; ValueError when there are none."""
    candidates = SELECTIONS[check_selection(name)](context)
    if not candidates:
        raise ValueError(
            f"selection {name!r} left no candidate latent (no latent fired in the held-out scan)"
        )
    return candidates


# The per-latent criteria of evaluation/selection (dtc, output_score, input_score, supervised,
# max_activation, random) register themselves here; imported last, it needs SELECTIONS above.
from evaluation.selection.criteria import register_selections  # noqa: E402

register_selections(SELECTIONS)
