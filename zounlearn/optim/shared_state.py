"""One optimizer state for both phases of the hybrid, where the rules allow it.

The hybrid keeps its first-order and zeroth-order optimizers' states across blocks; when both
phases keep the same statistic of the same gradient (their estimate of it, for the ZO phase),
one copy can serve both, and the steady state holds it once. The pairs (SHAREABLE):

- AdamW or CompressedAdam with ZOAdam: Adam's m and v (EMAs of g and g^2), bias-corrected by
  the parameter's step count, which the two phases then share: one Adam over the interleaved
  first-order gradients and zeroth-order estimates.
- SGD with ZOSGD (momentum > 0): torch.optim.SGD's momentum buffer.
- SignAdam with ZOSignAdam: Signum's m (an EMA of g; zounlearn.ops.rules lets zo_update_ take
  the SIGN_ADAM rule for exactly this pair).

Not shareable: Adam's v with AdaZO's (AdaZO's v tracks m^2, not g^2, and it has no bias
correction: the default hybrid keeps both states), SophiaG's h (a Hessian estimate that only
first-order refreshes can make), and any torch.optim optimizer (its own state layout: a tensor
step). The sign rules keep nothing to share.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..ops.rules import Rule
from .first_order import FirstOrderOptimizer
from .zo import ZeroOrderOptimizer

# The rules by the state they keep: two rules with the same entry keep the same statistic.
SHAREABLE: dict[Rule, str] = {Rule.ADAM: "Adam's m and v", Rule.ADAM_MOMENTS: "Adam's m and v",
                              Rule.SGD: "the momentum buffer", Rule.SIGN_ADAM: "Signum's m"}


def check_shareable(fo: Any, zo: ZeroOrderOptimizer) -> str:
    """What fo and zo would share (SHAREABLE's words); UsageError saying why not otherwise."""
    names = f"{type(fo).__name__} and {type(zo).__name__}"
    if not isinstance(fo, FirstOrderOptimizer):
        raise UsageError(f"{names} cannot share their state: the first-order phase must be one of zounlearn's fused "
                         f"optimizers (torch.optim's keep their own state layout)")
    kept = SHAREABLE.get(fo.rule)
    for group in zo.param_groups:
        rule = zo._rule(group)
        if kept is None or rule is None or SHAREABLE.get(rule) != kept:
            raise UsageError(f"{names} cannot share their state: they keep different statistics ({fo.rule.value} and "
                             f"{rule.value if rule else 'none'}); the pairs that can are AdamW or CompressedAdam with "
                             f"ZOAdam, SGD with ZOSGD (momentum > 0), SignAdam with ZOSignAdam")
    dtypes = {fo._state_dtype(g) for g in fo.param_groups} | {zo._state_dtype(g) for g in zo.param_groups}
    if len(dtypes) > 1:
        raise UsageError(f"{names} cannot share their state: their state_dtype differs (give both the same)")
    keys = [k for k, used in zip(fo.state_keys, (fo.rule.uses_m, fo.rule.uses_v)) if used]
    if keys != [k for k, used in zip(zo.state_keys, (fo.rule.uses_m, fo.rule.uses_v)) if used]:
        raise UsageError(f"{names} name their state differently ({fo.state_keys} and {zo.state_keys})")
    return kept


def share_state(fo: Any, zo: ZeroOrderOptimizer) -> None:
    """Make zo keep its state in fo's (checked first: nothing changes when they cannot share)."""
    check_shareable(fo, zo)
    zo.state = fo.state


__all__ = ["SHAREABLE", "check_shareable", "share_state"]
