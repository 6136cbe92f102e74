"""MeZO's own loop (Malladi et al., 2023, Algorithm 1 and its code), kept as it is written there:
the baseline the benchmarks and `zounlearn bench` measure the fused ZO step against."""

from __future__ import annotations

import torch

from .base import Closure, loss_value


def mezo_perturb(params: list[torch.nn.Parameter], seed: int, scale: float) -> None:
    """MeZO's zo_perturb_parameters: reseed torch's generator, draw each z whole, add out of place."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z


@torch.no_grad()
def mezo_step(params: list[torch.nn.Parameter], closure: Closure, *, lr: float, mu: float, seed: int,
              weight_decay: float = 0.0) -> float:
    """One step of MeZO's loop: four passes, each regenerating z from torch.manual_seed."""
    mezo_perturb(params, seed, mu)
    plus = loss_value(closure())
    mezo_perturb(params, seed, -2 * mu)
    minus = loss_value(closure())
    mezo_perturb(params, seed, mu)
    g = (plus - minus) / (2 * mu)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (g * z + weight_decay * p.data)
    return (plus + minus) / 2
