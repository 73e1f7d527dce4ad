"""Range checks for config dataclasses: each error names the field, its value and what is valid.

Configs call these from ``__post_init__`` so that bad input fails before any expensive work.
"""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, low: int) -> None:
    """``value`` must be an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be a bool (a flag parsed from the command line or set in code)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


def check_ints(config: Any, lows: dict[str, int]) -> None:
    """:func:`check_int` for each field of ``config`` named in ``lows`` (field -> minimum)."""
    for name, low in lows.items():
        check_int(name, getattr(config, name), low)


def check_in_range(config: Any, names: tuple[str, ...], low: float, high: float) -> None:
    """Each named field of ``config`` must be a number in [low, high]."""
    for name in names:
        value = getattr(config, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ValueError(f"{name}={value!r} must lie in [{low:g}, {high:g}]")


# Where a job runs (issue 19's GPU path): a device string, or auto for a GPU when torch sees one.
DEVICE_CHOICES = ("cpu", "cuda", "auto")


def check_device(device: str) -> None:
    """``device`` must be one of :data:`DEVICE_CHOICES`, and ``cuda`` needs a GPU torch sees."""
    import torch

    if device not in DEVICE_CHOICES:
        raise ValueError(f"device={device!r} is not supported; valid: {list(DEVICE_CHOICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use device=cpu or device=auto"
        )


def resolved_device(device: str) -> str:
    """``cpu`` or ``cuda``: what ``auto`` means on this machine."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
