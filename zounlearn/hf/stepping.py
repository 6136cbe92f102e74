"""The optimizer as a Trainer holds it: `StepAdapter` gives any torch optimizer, ours included, the
closure-less step() that transformers' Trainer calls after it has backpropagated.

- a first-order step (torch's optimizers, ours, the hybrid's first-order blocks) uses the
  gradients in .grad; SophiaG also gets the Hessian closure the Trainer left (`hessian_closure`);
- a zeroth-order step (ours, the hybrid's zeroth-order blocks) needs a closure, so the Trainer's
  training_step takes it and marks it `taken`; the step() the Trainer calls after it is then a
  no-op, as accelerate makes it for LOMO, whose step also happens in the training step.

It shares the optimizer's param_groups, state and defaults (as accelerate's AcceleratedOptimizer
does), so LR schedulers built on it drive the optimizer itself, and its state_dict is the
optimizer's own.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..optim import SophiaG
from ..optim.base import Closure
from ..optim.base import step as take_step
from ..optim.hybrid import takes_zeroth_order_step


class StepAdapter(torch.optim.Optimizer):
    """See the module docstring. `optimizer` is the optimizer adapted."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__: everything is delegated
        self.optimizer = optimizer
        self.taken = False  # the Trainer's training_step took this step already
        self.hessian_closure: Closure | None = None  # SophiaG's, for the step to come

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return take_step(self.optimizer, closure)
        if self.taken:
            self.taken = False
            return None
        if takes_zeroth_order_step(self.optimizer):
            raise UsageError(f"{type(self.optimizer).__name__}'s zeroth-order step needs a closure that returns the "
                             f"loss; train with zounlearn.hf.Trainer (or TrainerMixin), whose training_step builds it")
        if isinstance(self.optimizer, SophiaG):
            return self.optimizer.step(hessian_closure=self.hessian_closure)
        return self.optimizer.step()

    def __repr__(self) -> str:
        return f"StepAdapter({self.optimizer!r})"


def find_adapter(optimizer: Any) -> StepAdapter | None:
    """The StepAdapter inside optimizer (itself, or under accelerate's AcceleratedOptimizer), or None."""
    while optimizer is not None and not isinstance(optimizer, StepAdapter):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


__all__ = ["StepAdapter", "find_adapter", "takes_zeroth_order_step"]
