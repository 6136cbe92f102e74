"""Gaussian weight noise: a control for quantization (does any perturbation of that size
bring the forgotten knowledge back, or only rounding?).

Each target weight W (the block Linear/Conv1D weights that quantization acts on, see
`targets.py`) gets W + relative_std * RMS(W) * N(0, 1), with RMS(W) = sqrt(mean(W^2)) of
that tensor before the noise: the perturbation is the same fraction of every tensor's own
scale, as quantization error is. The noise is drawn in float32 from the given generator on
its device (the same draws on any model device) and added in float32.
"""

from __future__ import annotations

import copy

import torch

from ..checks import check_range
from .targets import target_weights


def add_weight_noise_(model: torch.nn.Module, relative_std: float, generator: torch.Generator) -> torch.nn.Module:
    """Adds the noise to the model in place and returns it."""
    check_range("relative_std", relative_std, 0.0)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)), "
                         f"got {type(generator).__name__}")
    targets = target_weights(model)
    with torch.no_grad():
        for target in targets:
            w = target.weight
            rms = w.float().square().mean().sqrt()
            noise = torch.randn(w.shape, generator=generator, device=generator.device, dtype=torch.float32)
            w.copy_(w.float() + relative_std * rms * noise.to(w.device))
    return model


def add_weight_noise(model: torch.nn.Module, relative_std: float, generator: torch.Generator) -> torch.nn.Module:
    """A noisy copy of the model; the model passed in is not modified."""
    check_range("relative_std", relative_std, 0.0)
    target_weights(model)  # a model without target layers fails before the copy
    return add_weight_noise_(copy.deepcopy(model), relative_std, generator)
