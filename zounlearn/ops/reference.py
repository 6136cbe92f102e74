"""The fused op in pure PyTorch: the portable fallback and the oracle for every backend.

Works in chunks so that its temporaries stay small whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng

CHUNK = 1 << 20


def float32(x: float) -> float:
    """x rounded to float32, as the kernels see their scalar arguments."""
    return torch.tensor(x, dtype=torch.float32).item()


def perturb_(
    params: Sequence[torch.Tensor],
    offsets: Sequence[int],
    alpha: float,
    coefs: Sequence[float],
    streams: Sequence[int],
    seed: int,
    dist: str,
) -> None:
    alpha = float32(alpha)
    coefs = [float32(c) for c in coefs]
    for t, base in zip(params, offsets):
        flat = t.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            acc = part.float() * alpha  # always a new float32 tensor
            for c, stream in zip(coefs, streams):
                # acc + (c * z): two roundings, never a fused multiply-add
                acc += rng.sample(seed, stream, base + start, part.numel(), dist, part.device).mul_(c)
            part.copy_(acc)
