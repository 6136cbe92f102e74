"""Fused in-place ops over seeded random directions (ZO-RNG v2, docs/rng.md).

Declared once as torch.ops.zounlearn.* (library.py), with kernels per device chosen in
backends.py; the functions here validate their arguments and call them.
"""

from . import backends
from .backends import use
from .perturb import flat_offsets, perturb_, perturb_into, sample
from .rules import Hyper, Rule
from .update import grad_update_, zo_update_

__all__ = ["Hyper", "Rule", "backends", "flat_offsets", "grad_update_", "perturb_", "perturb_into", "sample", "use",
           "zo_update_"]
