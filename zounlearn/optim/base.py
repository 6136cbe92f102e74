"""What every fused zounlearn optimizer shares: torch.optim's per-parameter state (a "step" count
per parameter, float32 moments), counters of the random stream saved in the state dict, a
load_state_dict that validates before it changes anything, and the closure contract.

The closure only computes and returns the loss (a float or a one-element tensor). Zeroth-order
optimizers call it under torch.no_grad(); first-order ones call it with grad enabled, after
setting the gradients to None, and call backward() themselves. A closure may carry a
`hessian_closure` attribute: the loss whose gradient estimates the Hessian (SophiaG reads it,
the others ignore it). `step(optimizer, closure)` takes one step of any torch optimizer on such
a closure.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..checks import check_choice
from ..errors import UsageError
from ..ops import flat_offsets
from ..ops.rules import Hyper, Rule
from ..ops.validation import as_int64, check_grads, check_params, check_state
from ..rng import ROUNDING_STREAM_BASE, ROUNDINGS
from . import quantized_state as q8

Closure = Callable[[], "torch.Tensor | float"]
ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
COUNTERS = "zounlearn"  # the state dict's entry for the optimizer-wide counters
# state_dtype (a param-group key) -> how the rules' m and v are stored (docs/memory.md, "Lean state");
# "int8": uint8 codes of bitsandbytes' block-wise dynamic quantization (quantized_state.py).
STATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
# The rules int8 state serves: m signed, v >= 0 (Adam's g^2, R-AdaZO's m^2), both updated from g alone.
INT8_RULES = (Rule.ADAM, Rule.SIGN_ADAM, Rule.ADAZO)


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
    raise TypeError(f"the closure must return a scalar loss (a float or a one-element tensor), got "
                    f"{type(value).__name__}")


def backward(closure: Closure, optimizer: torch.optim.Optimizer, who: str, *, zero_grad: bool = True
             ) -> tuple[Any, bool]:
    """Set the gradients to None (unless zero_grad is False: accumulated micro-batches), call closure
    with grad enabled, and backward() its loss when it is finite: (loss, finite). A non-finite loss
    leaves the gradients as they were and warns that who skips."""
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = closure()
        value = loss_value(loss)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise TypeError(f"{who} is first-order: the closure must return a loss tensor that requires grad "
                            "(computed from the parameters with grad enabled), not a float or a detached tensor")
        finite = math.isfinite(value)
        if finite:
            loss.backward()
        else:
            warnings.warn(f"{who}: the closure returned a non-finite loss ({value}); the step was skipped",
                          RuntimeWarning, stacklevel=3)
    return loss, finite


def step(optimizer: torch.optim.Optimizer, closure: Closure) -> float:
    """One step of any torch.optim optimizer on a loss-only closure; returns the loss (before the step).

    zounlearn's optimizers take the closure as it is; any other optimizer gets the gradients of
    its loss (a non-finite loss skips the step with a warning), and they are freed afterwards."""
    if getattr(optimizer, "takes_loss_closure", False):
        return loss_value(optimizer.step(closure))
    loss, finite = backward(closure, optimizer, type(optimizer).__name__)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value(loss)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the optimizers whose update is one fused pass (torch.ops.zounlearn.*).

    Per-parameter state as torch.optim keeps it: state[p]["step"] (an int: the steps that updated
    p, so a parameter that joins late is bias-corrected from its own first step) and the rule's
    float32 moments, named by `state_keys`, kept float32 when a state dict is loaded next to half
    parameters (torch would cast them). Optimizer-wide counters (`_counters`) travel in the state
    dict's "zounlearn" entry.

    state_dtype (a param-group key): "float32" (the default) or "bfloat16", the lean state: m and v
    stored in bfloat16, computed in float32 by the fused rules and stored back rounded as
    `rounding` says, with rounding words of their own (docs/rng.md): 2 bytes per value instead of 4.
    "int8" (the rules in INT8_RULES): bitsandbytes' 8-bit block-wise state, state[p][key + "_q"]
    (uint8 codes, p's shape) and state[p][key + "_absmax"] (float32, one per 256 elements), for
    tensors of 4096 elements or more (smaller ones keep float32 under key); each tensor's pass
    runs on float32 m and v dequantized into scratch, then quantized back (quantized_state.py).

    rounding (a param-group key): how updates are stored into bfloat16 and float16 parameters,
    "stochastic" (the default: rounded up with probability equal to the fraction of the unit in
    the last place, so that an update far below half a unit still moves the parameter on average)
    or "nearest" (even). float32 parameters are stored exactly either way. The random bits come
    from ZO-RNG's rounding streams under `seed`, one stream per step (docs/rng.md), so a run is
    deterministic and resumes bit-identically.
    """

    takes_loss_closure = True  # step(closure) wants a closure that only returns the loss
    # Names of the rules' m and v in self.state[p].
    state_keys: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, seed: int = 0,
                 rounding: str = "stochastic", state_dtype: str = "float32") -> None:
        check_choice("rounding", rounding, ROUNDINGS)
        self.seed = as_int64(seed, "seed")
        self.roundings = 0  # the rounding streams used so far: the next step's is 2^63 + roundings
        super().__init__(params, {**defaults, "rounding": rounding, "state_dtype": state_dtype})
        for group in self.param_groups:
            self._state_dtype(group)

    def _state_dtype(self, group: dict[str, Any]) -> torch.dtype:
        """The dtype of group's m and v (torch.uint8: int8 state); a state dict from before lean state
        has float32."""
        name = group.get("state_dtype", "float32")
        check_choice("state_dtype", name, tuple(STATE_DTYPES))
        if name == "int8" and self._rule(group) not in INT8_RULES:
            raise UsageError(f"{type(self).__name__} takes no state_dtype='int8': 8-bit block-wise state is for "
                             f"AdamW, SignAdam, ZOAdam, AdaZO and ZOSignAdam (Adam's and Signum's moments); use "
                             f"'bfloat16' or 'float32'")
        return STATE_DTYPES[name]

    def _rule(self, group: dict[str, Any]) -> Rule | None:
        """The rule group's passes run (None: no fused rule keeps state)."""
        raise NotImplementedError

    def _counters(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, "seed": self.seed, "roundings": self.roundings}

    def _set_counters(self, counters: dict[str, Any]) -> None:
        self.seed, self.roundings = counters["seed"], counters["roundings"]

    def _rounding(self, group: dict[str, Any]) -> tuple[str, int]:
        """(rounding, stream) of this step's updates of group's parameters."""
        check_choice("rounding", group["rounding"], ROUNDINGS)
        return group["rounding"], as_int64(ROUNDING_STREAM_BASE + self.roundings, "rounding stream")

    def _layout(self) -> dict[torch.Tensor, int]:
        """Each parameter's global offset, the parameters of all groups laid end to end: the element
        indices of the rounding words."""
        params = [p for g in self.param_groups for p in g["params"]]
        return dict(zip(params, flat_offsets(params)))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[COUNTERS] = self._counters()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, after checking everything it would not: whose state dict this is,
        that every state tensor fits its parameter. A refused state dict changes nothing."""
        self._check_state_dict(state_dict)
        state_dict = dict(state_dict)
        counters = state_dict.pop(COUNTERS)
        super().load_state_dict(state_dict)
        # Put back the saved state as it was saved (float32 or bfloat16), which torch just cast to
        # each parameter's dtype: a round trip is bit-identical.
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for param_id, p in zip(ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._set_counters(counters)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        counters = state_dict.get(COUNTERS) if isinstance(state_dict, dict) else None
        if not isinstance(counters, dict) or counters.get("optimizer") != name:
            got = counters.get("optimizer") if isinstance(counters, dict) else "no zounlearn optimizer"
            raise UsageError(f"not a {name} state dict: it is from {got} (its 'zounlearn' entry); load the state "
                             f"dict of the same optimizer class")
        missing = sorted(set(self._counters()) - set(counters))
        if missing:
            raise UsageError(f"the {name} state dict lacks its counters {', '.join(missing)}")
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"]) for saved, group in zip(groups, self.param_groups)):
            raise UsageError(f"the {name} state dict has {[len(g['params']) for g in groups]} parameters per group, "
                             f"this optimizer {[len(g['params']) for g in self.param_groups]}")
        for saved, group in zip(groups, self.param_groups):
            self._state_dtype(saved)
            for param_id, p in zip(saved["params"], group["params"]):
                layout = {entry: spec for key in self.state_keys for entry, spec in self._entries(p, key, saved)}
                for key, value in state_dict.get("state", {}).get(param_id, {}).items():
                    if key == "step":
                        continue
                    if key not in layout:
                        raise UsageError(f"the {name} state dict holds {key!r} for a parameter of shape "
                                         f"{tuple(p.shape)}; with its group's state_dtype "
                                         f"{saved.get('state_dtype', 'float32')!r} {name} keeps "
                                         f"{', '.join(['step', *sorted(layout)])} for it")
                    shape, dtype = layout[key]
                    if isinstance(value, torch.Tensor) and value.shape != shape:
                        raise UsageError(f"the {name} state dict's {key!r} has shape {tuple(value.shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}; it belongs to another model")
                    if isinstance(value, torch.Tensor) and value.dtype != dtype:
                        raise UsageError(f"the {name} state dict's {key!r} is {value.dtype} but its group's "
                                         f"state_dtype is {saved.get('state_dtype', 'float32')!r}; the state dict "
                                         f"was edited or mixes optimizers")

    def _entries(self, p: torch.Tensor, key: str, group: dict[str, Any]
                 ) -> list[tuple[str, tuple[tuple[int, ...], torch.dtype]]]:
        """The state entries that hold p's state `key` under group's state_dtype: (name, (shape, dtype))."""
        dtype = self._state_dtype(group)
        if dtype != torch.uint8:
            return [(key, (tuple(p.shape), dtype))]
        if not q8.quantizes(p):
            return [(key, (tuple(p.shape), torch.float32))]
        return [(f"{key}_q", (tuple(p.shape), torch.uint8)),
                (f"{key}_absmax", ((q8.blocks(p.numel()),), torch.float32))]

    def _used_keys(self, rule: Rule) -> list[str | None]:
        """state_keys' m and v names, None for what the rule does not keep."""
        return [key if used else None for key, used in zip(self.state_keys, (rule.uses_m, rule.uses_v))]

    def _stored(self, p: torch.Tensor, key: str, group: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors that hold p's state `key` (_entries'), created as zeros on first use."""
        dtype, entries = self._state_dtype(group), self._entries(p, key, group)
        other = sorted({key, f"{key}_q", f"{key}_absmax"} - {name for name, _ in entries} & set(self.state[p]))
        if other:  # the group's state_dtype changed, or shared state is another optimizer's layout
            raise UsageError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} holds {', '.join(other)} "
                             f"but its group's state_dtype is {_dtype_name(dtype)!r}, which keeps "
                             f"{', '.join(name for name, _ in entries)}; give every optimizer that keeps this state "
                             f"the same state_dtype")
        return [self._state(p, name, kind, shape, group_dtype=dtype) for name, (shape, kind) in entries]

    def _moments(self, rule: Rule | None, params: list[torch.Tensor], group: dict[str, Any]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The rule's stored m and v of each parameter (float32 or bfloat16 state; int8 state goes
        through _pass_moments); [] for what the rule does not keep."""
        if rule is None:
            return [], []
        m, v = ([self._stored(p, key, group)[0] for p in params] if key else [] for key in self._used_keys(rule))
        return m, v

    @contextlib.contextmanager
    def _pass_moments(self, rule: Rule | None, params: list[torch.Tensor], group: dict[str, Any]
                      ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """m and v for one fused pass over params: the state itself, or for int8 state float32
        scratch dequantized from it, quantized back after the pass (params is then one tensor, see
        _passes, so the scratch is one tensor's m and v; a float32 state of a small tensor is itself)."""
        if rule is None or self._state_dtype(group) != torch.uint8:
            yield self._moments(rule, params, group)
            return
        (p,) = params
        signs = (True, False)  # m on the signed map, v (>= 0) on the unsigned one, as bitsandbytes
        stored = [self._stored(p, key, group) if key else [] for key in self._used_keys(rule)]
        scratch = [[q8.dequantize(*s, signed)] if len(s) == 2 else s for s, signed in zip(stored, signs)]
        yield scratch[0], scratch[1]
        for s, values, signed in zip(stored, scratch, signs):
            if len(s) == 2:  # quantized (a small tensor's float32 state was the pass's own)
                q8.quantize_(values[0], signed, *s)

    def _passes(self, group: dict[str, Any], *lists: list[Any], one_by_one: bool = False) -> list[tuple[list, ...]]:
        """The fused passes over a group's tensors (lists in parallel: params, offsets, ...): one, or
        one per tensor when one_by_one or under int8 state (whose scratch is then one tensor's m and v)."""
        if one_by_one or self._state_dtype(group) == torch.uint8:
            return [tuple([x] for x in items) for items in zip(*lists)]
        return [lists]

    def _state(self, p: torch.Tensor, key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None, *,
               group_dtype: torch.dtype | None = None) -> torch.Tensor:
        """state[p][key], a dtype tensor of shape (p's unless given) on p's device, created as zeros on
        first use; one that does not fit (shared with another optimizer's state, say) is a UsageError
        that names the group's state dtype (group_dtype, dtype unless given)."""
        shape, state = tuple(p.shape) if shape is None else shape, self.state[p]
        if key not in state:
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        elif state[key].dtype != dtype or state[key].shape != shape or state[key].device != p.device:
            raise UsageError(f"{type(self).__name__}: the {key!r} state of a parameter of shape {tuple(p.shape)} is "
                             f"{state[key].dtype} but its group's state_dtype is "
                             f"{_dtype_name(group_dtype or dtype)!r}, which keeps {dtype} of shape {shape} on "
                             f"{p.device} (this one: shape {tuple(state[key].shape)} on {state[key].device}); give "
                             f"every optimizer that keeps this state the same state_dtype")
        return state[key]

    def _checked(self, rule: Rule | None, params: list[torch.Tensor], group: dict[str, Any],
                 grads: list[torch.Tensor] | None = None, scales: torch.Tensor | None = None, *,
                 check_tensors: bool = True) -> None:
        """The fused pass's arguments, checked once per step before any write (state loaded from a
        state dict may not fit); check_tensors=False when the caller checks the params themselves."""
        if check_tensors:
            check_params(params)
        if rule is None:
            return
        if self._state_dtype(group) == torch.uint8:  # the passes get float32 scratch: check what is stored
            for p in params:
                for key in filter(None, self._used_keys(rule)):
                    self._stored(p, key, group)
            if grads is not None:
                check_grads(params, grads)
            return
        m, v = self._moments(rule, params, group)
        check_state(params, m, v, rule, scales, grads)

    def _check_float16(self, params: list[torch.Tensor], after: str) -> None:
        """float16 tops out at 65504: a value the pass made infinite is an error that names its tensor,
        never a silent inf (one read of the float16 parameters; other dtypes are not looked at)."""
        halves = [(i, p) for i, p in enumerate(params) if p.dtype == torch.float16]
        if not halves or not bool(torch.stack([p.isinf().any() for _, p in halves]).any()):
            return
        i, p = next((i, p) for i, p in halves if bool(p.isinf().any()))
        raise UsageError(f"{type(self).__name__}: float16 overflow after {after}: parameter {i} (shape "
                         f"{tuple(p.shape)}) now holds inf (|value| > 65504); use bfloat16, a smaller lr, or for a "
                         "zeroth-order optimizer the exact mode (model=..., which never writes a perturbation)")

    def _count_steps(self, params: list[torch.Tensor]) -> dict[int, list[int]]:
        """Add one to each parameter's step; {step: indices of the params at that step} in order."""
        by_step: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            by_step.setdefault(state["step"], []).append(i)
        return by_step


def precision(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """How an optimizer treats its parameters' precision, for a run's report: the dtypes, the
    rounding of its updates and, for a zeroth-order one, how it perturbs (the hybrid's inner ones)."""
    inner = [optimizer.fo, optimizer.zo] if hasattr(optimizer, "fo") and hasattr(optimizer, "zo") else [optimizer]
    out: dict[str, Any] = {"dtypes": sorted({str(p.dtype).removeprefix("torch.") for g in optimizer.param_groups
                                             for p in g["params"]})}
    for o in inner:
        name = type(o).__name__
        out[f"{name} rounding"] = (sorted({g["rounding"] for g in o.param_groups}) if "rounding" in o.defaults
                                    else "torch's (nearest)")
        if hasattr(o, "exact"):
            out[f"{name} perturbation"] = "exact" if o.exact else "in place"
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in STATE_DTYPES.items() if d == dtype)


def hyper_adam(group: dict[str, Any], step: int, **extra: Any) -> Hyper:
    """Adam-type scalars of a param group with betas, eps and weight_decay, at a parameter's step."""
    b1, b2 = group["betas"]
    return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=b1, beta2=b2, eps=group["eps"],
                      step=step, **extra)


__all__ = ["COUNTERS", "INT8_RULES", "STATE_DTYPES", "Closure", "FusedOptimizer", "ParamsT", "backward", "hyper_adam",
           "loss_value", "precision", "step"]
