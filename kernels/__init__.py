"""Triton kernels of zounlearn, installed as `zounlearn.kernels`: the triton backend of
torch.ops.zounlearn.* (zounlearn/ops/backends.py registers them).

Each launcher takes its op's schema arguments. `perturb_` is the fused in-place update of
ZO-RNG v1 (docs/rng.md); `zo_update_` and `grad_update_` are the fused optimizer updates
(csrc/update_rules.h), whose rule table they read from zounlearn.ops.rules.
"""

from .perturb import perturb_, perturb_into
from .update import grad_update_, zo_update_

__all__ = ["grad_update_", "perturb_", "perturb_into", "zo_update_"]
