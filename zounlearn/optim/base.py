"""What every zounlearn optimizer shares: counters saved in the state dict, float32 state that
survives load_state_dict, the closure contract and its checks.

The closure only computes and returns the loss (a float or a one-element tensor). Zeroth-order
optimizers call it under torch.no_grad(); first-order ones call it with grad enabled, after
setting the gradients to None, and call backward() themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..checks import check_betas, check_range
from ..ops import backends
from ..ops.update import Hyper, Rule

Closure = Callable[[], "torch.Tensor | float"]
ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def loss_value(value: Any) -> float:
    """The closure's loss as a float; anything that is not one scalar is a clear error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss (a float or a one-element tensor), got a tensor of "
                f"shape {tuple(value.shape)}; reduce it first, e.g. loss.mean()"
            )
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"the closure must return a scalar loss (a float or a one-element tensor), got {type(value).__name__}")


class CountedOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer with global counters (steps taken, random directions drawn) that
    travel in the state dict, and float32 state kept float32 when loaded next to half parameters
    (torch casts floating state to the parameter's dtype)."""

    # Names of the rules' m and v in self.state[p].
    state_keys: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, backend: str | None = None) -> None:
        super().__init__(params, defaults)
        self.backend = backend
        self.steps = 0

    def _counters(self) -> dict[str, int]:
        return {"steps": self.steps}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self.steps = counters["steps"]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zounlearn"] = self._counters()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "zounlearn" not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state dict: it has no 'zounlearn' counters entry")
        counters = state_dict.pop("zounlearn")
        super().load_state_dict(state_dict)
        # Put back the saved float32 state that torch just cast to each parameter's dtype.
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for param_id, p in zip(ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._set_counters(counters)

    def _state(self, p: torch.Tensor, keys: tuple[str, ...]) -> list[torch.Tensor]:
        """p's float32 state tensors named keys, created as zeros on first use."""
        state = self.state[p]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return [state[key] for key in keys]

    def _rule_states(self, rule: Rule | None, params: list[torch.Tensor], which: int) -> list[torch.Tensor]:
        """m (which=0) or v (which=1) of each param for rule; [] when the rule keeps no such state."""
        if rule is None or not (rule.uses_m, rule.uses_v)[which]:
            return []
        keys = rule_state(rule, self.state_keys)
        return [self._state(p, keys)[keys.index(self.state_keys[which])] for p in params]

    def _kernels(self, device: torch.device) -> backends.Kernels:
        return backends.select(device.type, self.backend)[1]


def rule_state(rule: Rule | None, keys: tuple[str, str]) -> tuple[str, ...]:
    """The state keys a rule keeps, from the optimizer's names for (m, v)."""
    if rule is None:
        return ()
    return tuple(k for k, used in zip(keys, (rule.uses_m, rule.uses_v)) if used)


__all__ = ["Closure", "CountedOptimizer", "Hyper", "ParamsT", "Rule", "check_betas", "check_range", "loss_value", "rule_state"]
