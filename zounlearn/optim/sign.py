"""First-order sign and compressed-gradient optimizers, each update one fused pass."""

from __future__ import annotations

from typing import Any

import torch

from .base import Hyper, ParamsT, Rule, check_betas, check_range
from .first_order import FirstOrderOptimizer


class SignSGD(FirstOrderOptimizer):
    """theta -= lr (sign(g) + wd theta)."""

    rule = Rule.SIGN

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, weight_decay: float = 0.0, backend: str | None = None):
        check_range("lr", lr, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, backend=backend)

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"])


class SignAdam(FirstOrderOptimizer):
    """Signum: m = b1 m + (1 - b1) g; theta -= lr sign(m), decoupled weight decay."""

    rule = Rule.SIGN_ADAM

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, beta: float = 0.9, weight_decay: float = 0.0,
                 backend: str | None = None):
        check_range("lr", lr, 0.0)
        check_range("beta", beta, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, backend=backend)

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
                 eps: float = 1e-8, weight_decay: float = 0.0, backend: str | None = None):
        check_range("lr", lr, 0.0)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an int from 1 to 16, got {bits!r}")
        check_betas(betas)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        defaults = {"lr": lr, "bits": bits, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, backend=backend)

    def _hyper(self, group, step):
        b1, b2 = group["betas"]
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=b1, beta2=b2, eps=group["eps"],
                          step=step, bits=group["bits"])

    def _scales(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.zeros(len(params), device=params[0].device) if params else None

    def _apply(self, group: dict[str, Any], params, grads, hyper) -> None:
        kernels = self._kernels(params[0].device)
        m, v = self._rule_states(self.rule, params, 0), self._rule_states(self.rule, params, 1)
        scales = self._scales(params)
        kernels.grad_update_(params, grads, m, v, scales, int(Rule.ADAM_MOMENTS), list(hyper))
        kernels.grad_update_(params, grads, m, v, scales, int(Rule.QUANTIZED), list(hyper))
