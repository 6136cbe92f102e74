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

from ..checks import check_betas, check_int, check_range
from ..errors import UsageError
from ..ops.rules import Rule
from .base import Closure, ParamsT, hyper_adam, loss_value
from .first_order import FirstOrderOptimizer


def gnb_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., vocab] against labels sampled from their own softmax:
    the loss whose gradient gives the Gauss-Newton-Bartlett Hessian estimate."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat, dim=-1), 1).squeeze(-1)
    return F.cross_entropy(flat, labels)


class SophiaG(FirstOrderOptimizer):
    """step(closure=None, hessian_closure=None). After every update_period-th step of the optimizer
    the Hessian estimate is refreshed from hessian_closure, or else from the closure's own
    `hessian_closure` attribute when it has one (e.g. lambda: gnb_loss(model(x).logits)); it
    averages over hessian_batch_size sampled labels. Before the first refresh h = 0 and the update
    is lr sign(m), as in the reference code. update_period and hessian_batch_size are the
    optimizer's (one refresh covers every group); the rest are per group."""

    rule = Rule.SOPHIA
    state_keys = ("exp_avg", "hessian")

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1, update_period: int = 10,
                 hessian_batch_size: int = 1, **fused: Any) -> None:
        check_range("lr", lr, 0.0)
        betas = check_betas(betas)
        check_range("rho", rho, 0.0, open_low=True)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_int("update_period", update_period, 1)
        check_int("hessian_batch_size", hessian_batch_size, 1)
        defaults = {"lr": lr, "betas": betas, "rho": rho, "eps": eps, "weight_decay": weight_decay}
        self.update_period, self.hessian_batch_size = update_period, hessian_batch_size
        self.steps = 0  # steps taken, for the refresh period
        super().__init__(params, defaults, **fused)

    def _hyper(self, group, step):
        return hyper_adam(group, step, rho=group["rho"])

    def _state_dtype(self, group: dict[str, Any]) -> torch.dtype:
        if group.get("state_dtype", "float32") != "float32":
            raise UsageError("SophiaG keeps float32 state (state_dtype='float32'): its Hessian refresh is plain "
                             "torch, outside the fused rules that round lean state")
        return super()._state_dtype(group)

    def _counters(self) -> dict[str, Any]:
        return {**super()._counters(), "steps": self.steps}

    def _set_counters(self, counters: dict[str, Any]) -> None:
        super()._set_counters(counters)
        self.steps = counters["steps"]

    @torch.no_grad()
    def step(self, closure: Closure | None = None, hessian_closure: Closure | None = None) -> Any:  # type: ignore[override]
        hessian_closure = hessian_closure or getattr(closure, "hessian_closure", None)
        loss, updated = self._step(closure)
        if updated:
            self.steps += 1
            if hessian_closure is not None and self.steps % self.update_period == 0:
                self.update_hessian(hessian_closure)
        return loss

    @torch.no_grad()
    def update_hessian(self, hessian_closure: Closure) -> None:
        """h = b2 h + (1 - b2) B g_s^2 with g_s the gradient of hessian_closure()'s loss.
        Leaves every .grad None."""
        self.zero_grad(set_to_none=True)
        # Updating in backward, each gradient refreshes its h as it arrives and is freed at once.
        with torch.enable_grad(), self._gradients_to(self._refresh):
            loss = hessian_closure()
            loss_value(loss)
            loss.backward()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._refresh(group, p, p.grad)
        self.zero_grad(set_to_none=True)

    def _refresh(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        b2 = group["betas"][1]
        h = self._state(p, self.state_keys[1], torch.float32)
        h.mul_(b2).add_(grad.float().square().mul_((1.0 - b2) * self.hessian_batch_size))
