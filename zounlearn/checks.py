"""Argument checks shared by the whole package, each made before anything is built or written.

Every failure is a UsageError whose message names the argument, the value and the valid range.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import UsageError


def check_range(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """A finite number (not a bool) in [low, high], or (low, high] with open_low."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if open_low else value >= low) or value > high:
        bound = f"{'(' if open_low else '['}{low}, {high}{')' if high == math.inf else ']'}"
        raise UsageError(f"invalid {name}: {value!r}; it must be a finite number in {bound}")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be an integer {bound}, got {value!r}")


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """A pair of numbers in [0, 1), as a tuple."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise UsageError(f"{name} must be a pair of numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0)
        if beta == 1.0:
            raise UsageError(f"invalid {name}[{i}]: 1.0; it must be below 1 (a moment that never forgets)")
    return (float(betas[0]), float(betas[1]))


def check_bool(name: str, value: Any) -> None:
    """True or False, nothing that merely looks like one ("no", 0, "false")."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of the named choices."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


__all__ = ["check_betas", "check_bool", "check_choice", "check_int", "check_range"]
