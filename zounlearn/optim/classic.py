"""torch.optim's AdamW and momentum SGD on the fused rules: one pass over parameter, gradient and
float32 state per step, with torch.optim's semantics (per-parameter step counts, parameters
without a gradient skipped, every hyperparameter a param-group key). They are what the lean and
in-backward variants of the first-order phase build on, and the rules' external oracle is
torch.optim itself (tests/test_optim.py). Every fused optimizer also takes seed= and rounding=
(zounlearn.optim.base.FusedOptimizer)."""

from __future__ import annotations

from typing import Any

from ..checks import check_betas, check_range
from ..ops.rules import Hyper, Rule
from .base import ParamsT, hyper_adam
from .first_order import FirstOrderOptimizer


class AdamW(FirstOrderOptimizer):
    """torch.optim.AdamW (amsgrad off): decoupled weight decay, then the bias-corrected Adam step."""

    rule = Rule.ADAM

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        betas = check_betas(betas)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, **fused)

    def _hyper(self, group, step):
        return hyper_adam(group, step)


class SGD(FirstOrderOptimizer):
    """torch.optim.SGD with dampening 0 and no Nesterov: d = g + wd theta; b = momentum b + d;
    theta -= lr b. The buffer is kept (zeros first) even at momentum 0, where b = d."""

    rule = Rule.SGD
    state_keys = ("momentum_buffer", "")

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, momentum: float = 0.0,
                 weight_decay: float = 0.0, **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, **fused)

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], decoupled=False, beta1=group["momentum"])


__all__ = ["SGD", "AdamW"]
