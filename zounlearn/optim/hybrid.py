"""The hybrid first-order / zeroth-order optimizer of "Downgrade to Upgrade" (ICLR 2026).

Blocks alternate: fo_steps first-order steps with an inner first-order optimizer (Adam by
default, any torch optimizer or ours), then zo_steps zeroth-order steps with an inner ZO
optimizer (AdaZO by default, any of ours). Given total_steps, the schedule is laid out from
the end so that the last block is zeroth-order; without it, it starts with a first-order
block. Both inner optimizers keep their state across blocks.

Memory: the peak is the first-order phase's (gradients plus the inner optimizer's state);
gradients are freed after each first-order step, so ZO blocks run at inference memory plus
the ZO optimizer's state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .base import Closure, loss_value
from .zo import AdaZO, ZeroOrderOptimizer

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class HybridFOZO(torch.optim.Optimizer):
    """step(closure) runs one step of the phase the schedule says; last_phase is "fo" or "zo".

    fo_optimizer / zo_optimizer: factories that take the parameter list, e.g.
    lambda ps: torch.optim.AdamW(ps, lr=1e-5). Defaults: Adam(lr=fo_lr) and AdaZO(lr=zo_lr, seed=seed).
    """

    def __init__(
        self,
        params,
        *,
        fo_optimizer: OptimizerFactory | None = None,
        zo_optimizer: Callable[[list[torch.Tensor]], ZeroOrderOptimizer] | None = None,
        fo_lr: float = 1e-5,
        zo_lr: float = 1e-5,
        block: int = 20,
        zo_block: int | None = None,
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        zo_block = block if zo_block is None else zo_block
        for name, value in (("block", block), ("zo_block", zo_block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        super().__init__(params, {})
        plist = [p for g in self.param_groups for p in g["params"]]
        self.fo = fo_optimizer(plist) if fo_optimizer else torch.optim.Adam(plist, lr=fo_lr)
        self.zo = zo_optimizer(plist) if zo_optimizer else AdaZO(plist, lr=zo_lr, seed=seed)
        if not isinstance(self.zo, ZeroOrderOptimizer):
            raise TypeError(f"zo_optimizer must build a zounlearn zeroth-order optimizer, got {type(self.zo).__name__}")
        self.fo_steps, self.zo_steps, self.total_steps = block, zo_block, total_steps
        self.steps = 0
        self.last_phase: str | None = None

    def phase(self, step: int) -> str:
        """"fo" or "zo" for step index `step` (0-based)."""
        cycle = self.fo_steps + self.zo_steps
        if self.total_steps is None:
            return "fo" if step % cycle < self.fo_steps else "zo"
        # Counted from the last step back: the final zo_steps steps are ZO, the fo_steps before FO, ...
        return "zo" if (self.total_steps - 1 - step) % cycle < self.zo_steps else "fo"

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("HybridFOZO needs a closure that returns the loss; it calls backward() itself in FO phases")
        phase = self.phase(self.steps)
        self.last_phase = phase
        if phase == "zo":
            before = self.zo.steps
            loss = self.zo.step(closure)
            self.steps += self.zo.steps > before  # a skipped ZO step (non-finite loss) does not count
            return loss
        self.fo.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            value = loss_value(loss)
            if value != value or abs(value) == float("inf"):
                warnings.warn(f"HybridFOZO: the closure returned a non-finite loss ({value}); the first-order step "
                              "was skipped", RuntimeWarning, stacklevel=2)
                self.fo.zero_grad(set_to_none=True)
                return loss
            loss.backward()
        self.fo.step()
        self.fo.zero_grad(set_to_none=True)  # free the gradients before a ZO block
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fo.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"fo": self.fo.state_dict(), "zo": self.zo.state_dict(), "steps": self.steps,
                "schedule": [self.fo_steps, self.zo_steps, self.total_steps]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict.get("schedule", [])) != [self.fo_steps, self.zo_steps, self.total_steps]:
            raise ValueError(
                f"the state dict's schedule (fo, zo, total) = {state_dict.get('schedule')} differs from this "
                f"optimizer's {[self.fo_steps, self.zo_steps, self.total_steps]}; build it with the same block sizes"
            )
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
        self.steps = state_dict["steps"]
