"""Base of the fused first-order optimizers: one grad_update_ pass per param group."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from ..ops.validation import check_state_args
from .base import Closure, CountedOptimizer, Hyper, Rule, loss_value


class FirstOrderOptimizer(CountedOptimizer):
    """step() uses the gradients in p.grad; step(closure) first sets them to None, calls the
    closure with grad enabled and calls backward() on the loss it returns. A non-finite loss
    from the closure skips the update (as the ZO optimizers do); without a closure the update
    always runs, like torch.optim's."""

    rule: ClassVar[Rule]

    def _hyper(self, group: dict[str, Any], step: int) -> Hyper:
        raise NotImplementedError

    def _loss(self, closure: Closure) -> tuple[torch.Tensor, bool]:
        """(loss, finite); backward() has run when it is finite."""
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            finite = math.isfinite(loss_value(loss))
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise TypeError(
                    f"{type(self).__name__} is first-order: the closure must return a loss tensor that requires grad "
                    "(computed from the parameters with grad enabled), not a float or a detached tensor"
                )
            if finite:
                loss.backward()
        return loss, finite

    def _grouped(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """(group, params, grads) of the parameters that have a gradient, checked before any write."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            check_state_args(params, grads, self._rule_states(self.rule, params, 0), self._rule_states(self.rule, params, 1), self._scales(params),
                             self.rule)
            out.append((group, params, grads))
        return out

    def _scales(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            loss, finite = self._loss(closure)
            if not finite:
                warnings.warn(f"{type(self).__name__}: the closure returned a non-finite loss ({loss_value(loss)}); "
                              "the step was skipped", RuntimeWarning, stacklevel=2)
                return loss
        groups = self._grouped()
        for group, params, grads in groups:
            if params:
                self._apply(group, params, grads, self._hyper(group, self.steps + 1))
        self.steps += 1
        return loss

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], hyper: Hyper) -> None:
        kernels = self._kernels(params[0].device)
        kernels.grad_update_(params, grads, self._rule_states(self.rule, params, 0), self._rule_states(self.rule, params, 1), None, int(self.rule),
                             list(hyper))


__all__ = ["FirstOrderOptimizer"]
