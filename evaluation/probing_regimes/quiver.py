"""The "quiver of arrows": per cell (dataset, regime value), the method with the best
validation AUC is chosen and its test AUC reported; ΔAUC is the quiver with SAE probes
minus the quiver without them.

Ties on validation AUC are frequent at small n (leave-two-out AUCs are coarse) and decide the
result, so the rule is a parameter (``tie_rule``):

- ``baseline``: among the tied best, a baseline wins over an SAE probe (an SAE probe is
  chosen only when strictly better on validation); among methods of one kind, the first in
  the given order;
- ``sae``: an SAE probe wins a tie with a baseline;
- ``mean``: the cell's test AUC is the mean over all tied methods (the chosen method is named
  ``tie(a+b)``; it counts as "SAE chosen" by the share of SAE probes among the tied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluation.probing_regimes.config import TIE_RULES
from evaluation.probing_regimes.methods import MethodResult

TIE_TOLERANCE = 1e-9


@dataclass
class Pick:
    """A quiver's choice in one cell."""

    method: str
    val_auc: float
    test_auc: float
    sae_share: float  # 1.0 if an SAE probe was chosen (a fraction under the mean rule)


def pick(results: Sequence[MethodResult], tie_rule: str = "baseline") -> Pick:
    """The quiver's choice among ``results`` (in their given order) under ``tie_rule``."""
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule={tie_rule!r} is not one of {TIE_RULES}")
    if not results:
        raise ValueError("a quiver needs at least one method")
    best = max(r.val_auc for r in results)
    tied = [r for r in results if r.val_auc >= best - TIE_TOLERANCE]
    if tie_rule == "mean" and len(tied) > 1:
        return Pick(
            "tie(" + "+".join(r.method for r in tied) + ")",
            best,
            float(np.mean([r.test_auc for r in tied])),
            float(np.mean([r.is_sae for r in tied])),
        )
    if tie_rule == "sae":
        tied = sorted(tied, key=lambda r: not r.is_sae)  # stable: order kept within a kind
    elif tie_rule == "baseline":
        tied = sorted(tied, key=lambda r: r.is_sae)
    chosen = tied[0]
    return Pick(chosen.method, chosen.val_auc, chosen.test_auc, float(chosen.is_sae))


@dataclass
class Cell:
    """The two quivers of one cell and the best SAE probe on its own."""

    without: Pick  # baselines only
    with_sae: Pick  # baselines and SAE probes
    sae_only: Pick  # SAE probes only

    @property
    def delta(self) -> float:
        return self.with_sae.test_auc - self.without.test_auc


def cell(results: Sequence[MethodResult], tie_rule: str = "baseline") -> Cell:
    """Both quivers of one cell; ValueError unless there are baselines and SAE probes."""
    baselines = [r for r in results if not r.is_sae]
    saes = [r for r in results if r.is_sae]
    if not baselines or not saes:
        raise ValueError(
            f"a cell needs baselines and SAE probes; got {[r.method for r in results]}"
        )
    return Cell(
        pick(baselines, tie_rule), pick([*baselines, *saes], tie_rule), pick(saes, tie_rule)
    )
