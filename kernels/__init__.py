"""Triton kernels of zounlearn, installed as `zounlearn.kernels`.

Self-contained: they import only torch and triton. `perturb_` is the fused in-place
update of ZO-RNG v1 (docs/rng.md).
"""

from .perturb import perturb_

__all__ = ["perturb_"]
