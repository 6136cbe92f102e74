"""Base of the fused first-order optimizers: one grad_update_ pass per param group and step count.

step() uses the gradients in p.grad; step(closure) first sets them to None, calls the closure
with grad enabled and calls backward() on the loss it returns. As in torch.optim, a parameter
without a gradient is skipped (its state and step count stay as they are), and each parameter's
bias correction uses its own step count. A non-finite loss from the closure skips the update
(as the ZO optimizers do); without a closure the update always runs, like torch.optim's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..ops.library import ops
from ..ops.rules import Hyper, Rule
from .base import Closure, FusedOptimizer, backward


class FirstOrderOptimizer(FusedOptimizer):
    """Subclasses name their `rule` and `_hyper(group, step)`; the rule's m and v live in
    state[p][state_keys[0]] and state[p][state_keys[1]]."""

    rule: ClassVar[Rule]

    def _hyper(self, group: dict[str, Any], step: int) -> Hyper:
        raise NotImplementedError

    def _with_grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """(group, params, grads) of each group's parameters that have a gradient, checked before any write."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            self._checked(self.rule, params, grads, self._scales(params))
            self._rounding(group)
            out.append((group, params, grads))
        return out

    def _scales(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The per-tensor scales the rule needs (compressed Adam's), else None."""
        return None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | float | None:  # type: ignore[override]
        return self._step(closure)[0]

    def _step(self, closure: Closure | None) -> tuple[Any, bool]:
        """(the closure's loss or None, whether the update ran)."""
        loss = None
        if closure is not None:
            loss, finite = backward(closure, self, type(self).__name__)
            if not finite:
                return loss, False
        groups = self._with_grads()
        layout = self._layout()
        for group, params, grads in groups:
            for step, indices in self._count_steps(params).items():
                ps = [params[i] for i in indices]
                self._apply(group, ps, [grads[i] for i in indices], [layout[p] for p in ps], self._hyper(group, step))
        self.roundings += bool(groups)
        self._check_float16([p for _, params, _ in groups for p in params], "the update")
        return loss, True

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
               offsets: list[int], hyper: Hyper) -> None:
        m, v = self._moments(self.rule, params)
        ops.grad_update_(params, grads, m, v, None, offsets, self.seed, self.rule.value, *self._rounding(group),
                         *hyper)


__all__ = ["FirstOrderOptimizer"]
