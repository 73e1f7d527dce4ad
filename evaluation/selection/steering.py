"""The selection criteria as steering selections (``steer -P selection=NAME``).

:func:`register_selections` adds to the steering registry (a name → ``(context) -> list[int]``
dict) one entry per criterion. Each returns every live latent with a finite score, best first
in its direction, so latent-first steering (which takes the first ``n_concepts``) compares
criteria at the same subset size. Scores are computed batched with the default
:class:`SelectionConfig`, using the steering table's max activations (``context``), once per SAE
and process.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from evaluation.selection.config import SelectionConfig
from evaluation.selection.rules import top_k
from evaluation.selection.scores import compute_scores, intervened_scores

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
_SCORES: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()


def _scores(context: Any, column: str) -> Tensor:
    """The column for ``context.sae`` (computed on first use; the scan only for input_score)."""
    if column == "max_activation":
        return context.max_activation_F
    cached = _SCORES.setdefault(context.sae, {})
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
            )
        cached.update({k: v for k, v in computed.items() if k != "lens_FL"})
    return cached[column]


def criterion(name: str) -> Callable[[Any], list[int]]:
    """The selection function of criterion ``name`` (a key of :data:`CRITERIA`)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; valid criteria: {', '.join(CRITERIA)}")
    column, direction = CRITERIA[name]

    def select(context: Any) -> list[int]:
        scores_F = _scores(context, column).double()
        live_F = (context.firing_frequency_F > 0) & (context.max_activation_F > 0)
        n = int((live_F & scores_F.isfinite()).sum())
        return top_k(scores_F, n, direction, live_F) if n else []

    select.__doc__ = f"Live latents by {column}, {direction} first."
    return select


def register_selections(selections: dict[str, Callable[[Any], list[int]]]) -> None:
    """Add every criterion of :data:`CRITERIA` to a steering selection registry."""
    for name in CRITERIA:
        selections.setdefault(name, criterion(name))
