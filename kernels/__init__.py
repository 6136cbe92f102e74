"""Triton kernels of zounlearn, installed as `zounlearn.kernels`.

Self-contained: they import only torch and triton. `perturb_` is the fused in-place
update of ZO-RNG v1 (docs/rng.md); `zo_update_` and `grad_update_` are the fused
optimizer updates (csrc/update_rules.h).
"""

from .perturb import perturb_
from .update import grad_update_, zo_update_

__all__ = ["grad_update_", "perturb_", "zo_update_"]
