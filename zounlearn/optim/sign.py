"""First-order sign and compressed-gradient optimizers, each update one fused pass."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_betas, check_int, check_range
from ..ops.library import ops
from ..ops.rules import Hyper, Rule
from .base import ParamsT, hyper_adam
from .first_order import FirstOrderOptimizer


class SignSGD(FirstOrderOptimizer):
    """theta -= lr (sign(g) + wd theta)."""

    rule = Rule.SIGN

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, weight_decay: float = 0.0, **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, **fused)

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"])


class SignAdam(FirstOrderOptimizer):
    """Signum: m = b1 m + (1 - b1) g; theta -= lr sign(m), decoupled weight decay."""

    rule = Rule.SIGN_ADAM

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, beta: float = 0.9, weight_decay: float = 0.0,
                 **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("beta", beta, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, **fused)

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=group["beta"])


class CompressedAdam(FirstOrderOptimizer):
    """theta -= lr Q(u; bits), u Adam's bias-corrected direction m_hat / (sqrt(v_hat) + eps).

    Q is a per-tensor symmetric uniform quantizer with 2^(bits-1) - 1 levels scaled by
    max |u|: Q(u) = s round(u L / s) / L (ties to even); bits = 1 gives sign(u). Two fused
    passes per group: moments and max |u|, then the quantized step. Decoupled weight decay.
    """

    rule = Rule.ADAM_MOMENTS

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, bits: int = 4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        check_int("bits", bits, 1, 16)
        betas = check_betas(betas)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "bits": bits, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                         **fused)

    def _hyper(self, group, step):
        return hyper_adam(group, step, bits=group["bits"])

    def _scales(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.zeros(len(params), device=params[0].device)

    def _apply_rule(self, group: dict[str, Any], params, grads, offsets, hyper, m, v) -> None:
        scales = self._scales(params)
        rounding = self._rounding(group)
        ops.grad_update_(params, grads, m, v, scales, offsets, self.seed, Rule.ADAM_MOMENTS.value, *rounding, *hyper)
        ops.grad_update_(params, grads, m, v, scales, offsets, self.seed, Rule.QUANTIZED.value, *rounding, *hyper)
