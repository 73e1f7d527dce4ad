"""Rules that turn one per-latent score into a selected set (METHODS.md §4).

Every rule returns latent ids best first and considers only candidate latents (the live ones,
with a finite score). Directions: ``up`` (largest positive first), ``down`` (most negative
first), ``abs`` (largest |score| first). Rules:

- ``top_k``: the K best in a direction (the DTC paper's K ∈ 1..5);
- ``quantile``: the tail beyond quantile q of the candidates' scores (q ∈ {0.99, 0.95, 0.90,
  0.80} in the paper): ``up`` keeps scores ≥ the q-quantile, ``down`` scores ≤ the
  (1 − q)-quantile, ``abs`` |scores| ≥ the q-quantile of |scores|;
- ``threshold``: ``up`` scores ≥ t, ``down`` scores ≤ −t, ``abs`` |scores| ≥ t (the output
  score's filters S_out ≥ 0.1 ... 0.0001 are ``up`` thresholds);
- ``random``: a seeded random order of the candidates (the no-selection baseline).

:func:`equal_size` cuts the sets of several criteria to one common size, so that criteria
compared on one SAE steer with the same number of latents, as the paper does.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIRECTIONS = ("up", "down", "abs")
RULES = ("top_k", "quantile", "threshold", "random")


def check_direction(direction: str) -> str:
    """``direction`` if valid, else ValueError naming it and the valid ones."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"unknown direction {direction!r}; valid directions: {', '.join(DIRECTIONS)}"
        )
    return direction


def check_rule(rule: str) -> str:
    """``rule`` if valid, else ValueError naming it and the valid ones."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
    return rule


def candidates(scores_F: Tensor, live_F: Tensor | None = None) -> Tensor:
    """Ids of latents that are live (default: all) and have a finite score."""
    ok_F = torch.isfinite(scores_F)
    if live_F is not None:
        if live_F.shape != scores_F.shape:
            raise ValueError(
                f"live mask shape {tuple(live_F.shape)} != scores shape {tuple(scores_F.shape)}"
            )
        ok_F &= live_F.bool()
    return torch.nonzero(ok_F)[:, 0]


def _ordered(scores_F: Tensor, ids_N: Tensor, direction: str) -> Tensor:
    """``ids_N`` sorted best first in ``direction`` (ties by latent id, so results are stable)."""
    # A stable sort of id-ordered candidates keeps equal scores in id order.
    by_id = ids_N.sort().values
    values = scores_F[by_id].double()
    key = {"up": -values, "down": values, "abs": -values.abs()}[check_direction(direction)]
    return by_id[torch.sort(key, stable=True).indices]


def top_k(
    scores_F: Tensor, k: int, direction: str = "up", live_F: Tensor | None = None
) -> list[int]:
    """The ``k`` best latents in ``direction``.

    Raises:
        ValueError: ``k`` < 1, or more than the live latents with a finite score.
    """
    check_direction(direction)
    ids = candidates(scores_F, live_F)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"K={k!r} must be a positive integer")
    if k > len(ids):
        raise ValueError(
            f"K={k} is larger than the {len(ids)} live latents with a score; choose K <= {len(ids)}"
        )
    return _ordered(scores_F, ids, direction)[:k].tolist()


def quantile(
    scores_F: Tensor, q: float, direction: str = "up", live_F: Tensor | None = None
) -> list[int]:
    """The tail of the candidates beyond quantile ``q`` in ``direction``, best first.

    Raises:
        ValueError: ``q`` not strictly inside (0, 1), or no candidate latent.
    """
    check_direction(direction)
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
        raise ValueError(f"quantile q={q!r} must lie strictly inside (0, 1), e.g. 0.95")
    ids = candidates(scores_F, live_F)
    if len(ids) == 0:
        raise ValueError("no live latent has a finite score")
    values = scores_F[ids].double()
    if direction == "up":
        keep = values >= torch.quantile(values, q)
    elif direction == "down":
        keep = values <= torch.quantile(values, 1 - q)
    else:
        keep = values.abs() >= torch.quantile(values.abs(), q)
    return _ordered(scores_F, ids[keep], direction).tolist()


def threshold(
    scores_F: Tensor, t: float, direction: str = "up", live_F: Tensor | None = None
) -> list[int]:
    """Candidates at or beyond ``t`` in ``direction`` (``down``: ≤ −t), best first."""
    check_direction(direction)
    if isinstance(t, bool) or not isinstance(t, int | float) or t != t:
        raise ValueError(f"threshold t={t!r} must be a number")
    ids = candidates(scores_F, live_F)
    values = scores_F[ids].double()
    keep = {"up": values >= t, "down": values <= -t, "abs": values.abs() >= t}[direction]
    return _ordered(scores_F, ids[keep], direction).tolist()


def random_order(scores_F: Tensor, seed: int = 0, live_F: Tensor | None = None) -> list[int]:
    """Every candidate (live, finite score) in a seeded random order."""
    ids = candidates(scores_F, live_F)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return ids[order].tolist()


def apply_rule(
    scores_F: Tensor,
    rule: str,
    *,
    direction: str = "up",
    k: int = 5,
    q: float = 0.95,
    t: float = 0.0,
    seed: int = 0,
    live_F: Tensor | None = None,
) -> list[int]:
    """The rule named ``rule`` with its parameter (``k``, ``q``, ``t`` or ``seed``)."""
    check_rule(rule)
    check_direction(direction)
    if rule == "top_k":
        return top_k(scores_F, k, direction, live_F)
    if rule == "quantile":
        return quantile(scores_F, q, direction, live_F)
    if rule == "threshold":
        return threshold(scores_F, t, direction, live_F)
    return random_order(scores_F, seed, live_F)


def equal_size(selections: dict[str, list[int]], size: int | None = None) -> dict[str, list[int]]:
    """Each criterion's set cut to one common size: ``size``, default the smallest set's.

    Raises:
        ValueError: a set is empty, or shorter than ``size`` (naming the criterion).
    """
    if not selections:
        raise ValueError("no selections to compare")
    shortest = min(len(v) for v in selections.values())
    size = shortest if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"subset size {size!r} must be a positive integer")
    short = {name: len(v) for name, v in selections.items() if len(v) < size}
    if short:
        raise ValueError(f"subset size {size} exceeds what these criteria selected: {short}")
    return {name: list(v[:size]) for name, v in selections.items()}
