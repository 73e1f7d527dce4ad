"""One row of the benchmark table (`python -m bench`): a figure of saeflow's beside its reference
measured in the same run, their ratio and issue 19's target for it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """``ratio`` is oriented so that higher is better for saeflow (a speed-up: saeflow's rate
    over the reference's, or the reference's seconds over saeflow's); ``target`` is the ratio
    issue 19 asks for (None: no stated target), ``met`` whether it is reached *and* any quality
    condition in ``note`` holds (None: no target). ``unit`` names what ``saeflow`` and
    ``reference`` are measured in."""

    section: str
    what: str
    saeflow: float
    reference: float
    reference_name: str
    unit: str
    ratio: float
    target: float | None = None
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def speedup_from_seconds(saeflow_s: float, reference_s: float) -> float:
    """Reference seconds over saeflow's: > 1 when saeflow is faster."""
    if saeflow_s <= 0:
        raise ValueError(f"saeflow_s={saeflow_s!r} must be > 0 (a measured wall time)")
    return reference_s / saeflow_s


def met_target(ratio: float, target: float | None, quality_ok: bool = True) -> bool | None:
    """Whether ``ratio`` reaches ``target`` with the quality condition held (None: no target)."""
    if target is None:
        return None
    return bool(ratio >= target and quality_ok)
