"""The hybrid first-order / zeroth-order optimizer of "Downgrade to Upgrade" (ICLR 2026).

Blocks alternate: `block` first-order steps with an inner first-order optimizer (torch's Adam by
default, any torch optimizer or ours), then `zo_block` zeroth-order steps with an inner ZO
optimizer (AdaZO by default, any of ours). Given total_steps, the schedule is laid out from the
end so that the last block is zeroth-order; without it, it starts with a first-order block.
Both inner optimizers keep their state across blocks.

It is a torch.optim.Optimizer whose param groups carry `lr` (the first-order phase's rate) and
`zo_lr` (the zeroth-order phase's); the inner optimizers' groups mirror them and follow them at
every step. A torch LR scheduler on the hybrid changes each group's lr, and the zeroth-order
phase follows in proportion (zo_lr * lr / initial_lr, initial_lr being what the scheduler
recorded), so one schedule drives both phases.

Memory (docs/memory.md): both inner states persist, so the steady state holds the first-order
optimizer's state and the zeroth-order one's (Adam + AdaZO: 16 bytes of float32 moments per
parameter) plus, in a first-order step, the gradients, freed after each first-order step. Leaner:
a first-order optimizer that updates inside backward (one gradient tensor at a time), a
stateless zeroth-order phase (ZOSGD), or shared_state=True, where one state serves both phases
(the pairs that can: zounlearn/optim/shared_state.py). Presets by name: zounlearn.optim.registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..checks import check_int, check_range
from ..errors import UsageError
from .base import Closure, FusedOptimizer, ParamsT, step
from .shared_state import share_state
from .zo import AdaZO, ZeroOrderOptimizer

# A factory gets the hybrid's param groups ([{"params": [...]}, ...]) and builds the inner optimizer.
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class HybridFOZO(torch.optim.Optimizer):
    """step(closure) runs one step of the phase the schedule says; last_phase is "fo" or "zo".

    fo_optimizer / zo_optimizer: factories that take the param groups, e.g.
    lambda groups: torch.optim.AdamW(groups, lr=1e-5). Defaults: Adam(lr=lr) and AdaZO(lr=zo_lr,
    seed=seed, model=model) (model: for the exact zeroth-order mode of half-precision parameters).
    The inner optimizers' learning rates are set from the hybrid's groups at every step, whatever
    the factories gave them. shared_state: the ZO optimizer keeps its state in the first-order
    one's (a pair that keeps the same statistic, else UsageError).
    """

    takes_loss_closure = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-5,
        *,
        zo_lr: float = 1e-5,
        fo_optimizer: OptimizerFactory | None = None,
        zo_optimizer: Callable[[list[dict[str, Any]]], ZeroOrderOptimizer] | None = None,
        block: int = 20,
        zo_block: int | None = None,
        total_steps: int | None = None,
        seed: int = 0,
        model: torch.nn.Module | None = None,
        shared_state: bool = False,
    ) -> None:
        zo_block = block if zo_block is None else zo_block
        check_range("lr", lr, 0.0)
        check_range("zo_lr", zo_lr, 0.0)
        check_int("block", block, 1)
        check_int("zo_block", zo_block, 1)
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        super().__init__(params, {"lr": lr, "zo_lr": zo_lr})
        # Each inner optimizer its own group dicts: torch.optim keeps and fills the ones it is given.
        groups = lambda: [{"params": list(g["params"])} for g in self.param_groups]  # noqa: E731
        self.fo = fo_optimizer(groups()) if fo_optimizer else torch.optim.Adam(groups(), lr=lr)
        self.zo = zo_optimizer(groups()) if zo_optimizer else AdaZO(groups(), lr=zo_lr, seed=seed, model=model)
        if not isinstance(self.zo, ZeroOrderOptimizer):
            raise TypeError(f"zo_optimizer must build a zounlearn zeroth-order optimizer, got {type(self.zo).__name__}")
        for inner in (self.fo, self.zo):
            if len(inner.param_groups) != len(self.param_groups):
                raise UsageError(f"the hybrid's {type(inner).__name__} has {len(inner.param_groups)} param groups, "
                                 f"the hybrid {len(self.param_groups)}: a factory must keep the groups it is given")
        if not isinstance(shared_state, bool):
            raise UsageError(f"shared_state must be true or false, got {shared_state!r}")
        if shared_state:
            share_state(self.fo, self.zo)
        self.shared_state = shared_state
        self.fo_steps, self.zo_steps, self.total_steps = block, zo_block, total_steps
        self.steps = 0
        self.last_phase: str | None = None
        self._follow_rates()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "zo"):  # after __init__: the inner optimizers get the group too
            for inner in (self.fo, self.zo):
                inner.add_param_group({"params": list(self.param_groups[-1]["params"])})
            self._follow_rates()

    def phase(self, step_index: int) -> str:
        """"fo" or "zo" for step index `step_index` (0-based)."""
        cycle = self.fo_steps + self.zo_steps
        if self.total_steps is None:
            return "fo" if step_index % cycle < self.fo_steps else "zo"
        # Counted from the last step back: the final zo_steps steps are ZO, the fo_steps before FO, ...
        return "zo" if (self.total_steps - 1 - step_index) % cycle < self.zo_steps else "fo"

    def _follow_rates(self) -> None:
        for group, fo, zo in zip(self.param_groups, self.fo.param_groups, self.zo.param_groups):
            fo["lr"] = group["lr"]
            scheduled = group.get("initial_lr")
            zo["lr"] = group["zo_lr"] * (group["lr"] / scheduled if scheduled else 1.0)

    def step(self, closure: Closure | None = None) -> float | None:  # type: ignore[override]
        """One step of the scheduled phase on the closure's loss. Without a closure, a first-order step
        uses the gradients already in .grad (as torch.optim's step() does: a Trainer that backpropagates
        itself calls it so) and returns None; a zeroth-order step always needs the closure."""
        phase = self.phase(self.steps)
        if closure is None and phase == "zo":
            raise ValueError("HybridFOZO's zeroth-order steps need a closure that returns the loss (step "
                             f"{self.steps} is one); without a closure only its first-order steps can run")
        self._follow_rates()
        self.last_phase = phase
        if closure is None:
            self.fo.step()
            self.fo.zero_grad(set_to_none=True)  # free the gradients before a ZO block
            self.steps += 1
            return None
        if phase == "zo":
            before = self.zo.draws
            loss = self.zo.step(closure)
            self.steps += self.zo.draws > before  # a skipped ZO step (non-finite loss) does not count
            return loss
        loss = step(self.fo, closure)
        self.fo.zero_grad(set_to_none=True)  # free the gradients before a ZO block
        self.steps += math.isfinite(loss)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fo.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        zo = self.zo.state_dict()
        if self.shared_state:  # the state is fo's: saved once
            zo["state"] = {}
        return {**super().state_dict(), "fo": self.fo.state_dict(), "zo": zo, "steps": self.steps,
                "schedule": [self.fo_steps, self.zo_steps, self.total_steps], "shared_state": self.shared_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Everything checked that can be before anything changes."""
        schedule = [self.fo_steps, self.zo_steps, self.total_steps]
        if not isinstance(state_dict, dict) or not {"fo", "zo", "steps", "schedule"} <= set(state_dict):
            raise UsageError("not a HybridFOZO state dict: it lacks the fo, zo, steps and schedule entries")
        if list(state_dict["schedule"]) != schedule:
            raise UsageError(f"the state dict's schedule (fo, zo, total) = {state_dict['schedule']} differs from this "
                             f"optimizer's {schedule}; build it with the same block sizes")
        if state_dict.get("shared_state", False) != self.shared_state:
            raise UsageError(f"the state dict's shared_state is {state_dict.get('shared_state', False)}, this "
                             f"optimizer's {self.shared_state}; build it the same way")
        self.zo._check_state_dict(state_dict["zo"])
        if isinstance(self.fo, FusedOptimizer):
            self.fo._check_state_dict(state_dict["fo"])
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
        if self.shared_state:
            self.zo.state = self.fo.state
        super().load_state_dict({"state": state_dict.get("state", {}), "param_groups": state_dict["param_groups"]})
        self.steps = state_dict["steps"]


def takes_zeroth_order_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's next step is zeroth-order (a ZO optimizer, or the hybrid in a ZO block)."""
    if isinstance(optimizer, ZeroOrderOptimizer):
        return True
    return isinstance(optimizer, HybridFOZO) and optimizer.phase(optimizer.steps) == "zo"
