"""SophiaG (Liu et al., 2023) as SOUL (Jia et al., 2024) uses it for LLM unlearning.

    every k steps:  h = b2 h + (1 - b2) B g_s * g_s   (Gauss-Newton-Bartlett estimate: g_s is the
                                                       gradient of the loss on labels sampled from
                                                       the model's own predictions, B their number)
    every step:     m = b1 m + (1 - b1) g
                    theta = (1 - lr wd) theta - lr sign(m) min(|m| / (rho h + eps), 1)

The update is one fused pass (Rule.SOPHIA); the Hessian refresh is plain torch. Deviation from
the reference implementation: B multiplies the estimate when it is made, not h when it is
used (the same ratio), so h is in the loss's own units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Closure, Hyper, ParamsT, Rule, check_betas, check_range, loss_value
from .first_order import FirstOrderOptimizer


def gnb_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., vocab] against labels sampled from their own softmax:
    the loss whose gradient gives the Gauss-Newton-Bartlett Hessian estimate."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat, dim=-1), 1).squeeze(-1)
    return F.cross_entropy(flat, labels)


class SophiaG(FirstOrderOptimizer):
    """step(closure=None, hessian_closure=None). After every update_period-th step, when a
    hessian_closure is given, the Hessian estimate is refreshed from it (e.g.
    lambda: gnb_loss(model(x).logits)); it averages over hessian_batch_size sampled labels.
    Before the first refresh h = 0 and the update is lr sign(m), as in the reference code."""

    rule = Rule.SOPHIA
    state_keys = ("exp_avg", "hessian")

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1, update_period: int = 10,
                 hessian_batch_size: int = 1, backend: str | None = None) -> None:
        check_range("lr", lr, 0.0)
        check_betas(betas)
        check_range("rho", rho, 0.0, open_low=True)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        for name, value in (("update_period", update_period), ("hessian_batch_size", hessian_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "rho": rho, "eps": eps, "weight_decay": weight_decay}
        self.update_period, self.hessian_batch_size = update_period, hessian_batch_size
        super().__init__(params, defaults, backend=backend)

    def _hyper(self, group, step):
        b1, b2 = group["betas"]
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=b1, beta2=b2, eps=group["eps"],
                          rho=group["rho"])

    @torch.no_grad()
    def step(self, closure: Closure | None = None, hessian_closure: Closure | None = None) -> Any:  # type: ignore[override]
        steps = self.steps
        loss = super().step(closure)
        if hessian_closure is not None and self.steps > steps and self.steps % self.update_period == 0:
            self.update_hessian(hessian_closure)
        return loss

    @torch.no_grad()
    def update_hessian(self, hessian_closure: Closure) -> None:
        """h = b2 h + (1 - b2) B g_s^2 with g_s the gradient of hessian_closure()'s loss.
        Leaves every .grad None."""
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = hessian_closure()
            loss_value(loss)
            loss.backward()
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p, self.state_keys)[1]
                h.mul_(b2).add_(p.grad.float().square().mul_((1.0 - b2) * self.hessian_batch_size))
        self.zero_grad(set_to_none=True)
