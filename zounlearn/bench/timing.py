"""Wall-clock timing of one call, the same way on the CPU and the GPU.

On CUDA every round starts on an idle device and ends when the device is done (CUDA events
around the call): host work such as per-tensor launches counts, as a user would see it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per round, after the warm-up rounds (compilation, caches) that are not counted."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the rounds were."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str, *, rounds: int = 5, warmup: int = 1,
              max_seconds: float | None = None) -> Timing:
    """Time `rounds` calls of fn (at least one; fewer once max_seconds of timed rounds have passed)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds: list[float] = []
    while len(seconds) < max(1, rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
        if max_seconds is not None and sum(seconds) >= max_seconds:
            break
    return Timing(tuple(seconds))
