"""What an unlearning run holds in memory, predicted from the model's config (docs/memory.md).

    from zounlearn.memory import estimate, load_config, profile
    e = estimate(profile(load_config("7b"), torch.bfloat16), "hybrid_signadam", batch=8, length=512)
    e.peak, e.components      # bytes: weights, gradients, state, activations, scratch

`zounlearn memory` prints the same, for every optimizer and preset, with what fits which GPU.
"""

from .estimate import COMPONENTS, Estimate, Plan, estimate, plan, plan_of
from .profile import SIZES, Profile, describe, load_config, profile

__all__ = ["COMPONENTS", "Estimate", "Plan", "Profile", "SIZES", "describe", "estimate", "load_config", "plan",
           "plan_of", "profile"]
