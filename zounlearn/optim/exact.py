"""The exact zeroth-order mode: the closure sees theta + c z, theta itself is never written.

In place, a ZO step adds mu z, subtracts 2 mu z and adds mu z back, rounding each time: in
bfloat16 the weights random-walk away even at lr = 0. Here every parameter slot of the model's
modules holds, while the closure runs, a `PerturbedParameter`: a tensor without storage whose
every use (any aten op that reads it) first materialises theta + sum_k c_k mu_g z_k into a fresh
tensor with perturb_into, the fused op, from the untouched theta and the parameter's global
offset. So:
  - theta is bit-identical after a step at lr = 0, in every dtype, on every backend;
  - memory: one parameter tensor's copy at a time (the op that reads it holds it), no model copy;
  - passes: one read of theta and one write of the copy per use, as the in-place pass costs;
    the restore pass disappears, so a step is 2q + 1 passes as in place;
  - tied weights (GPT-2's wte and lm_head) are one parameter with one offset: the same z
    wherever they are read; a read outside the parameter's own module (a regulariser over
    model.parameters(), a parent module's F.linear on a child's weight) is covered the same way.
A closure that reads the Parameter objects themselves, not through the modules, would see
unperturbed values: while the closure runs each one holds NaN instead (a zero-stride view, no
memory), so that such a read shows as a non-finite loss, which the optimizer tells apart from a
real one and refuses with a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils._pytree import tree_map

from ..errors import UsageError
from ..ops.library import ops

Slot = tuple[torch.nn.Module, str, torch.nn.Parameter]  # module._parameters[name] is the parameter


class PerturbedParameter(torch.Tensor):
    """theta + sum_k coefs[k] z(seed, streams[k], offset + e), materialised at every use."""

    # Results are plain tensors: torch.Tensor's default would turn them into this class.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, theta: torch.Tensor, *args) -> PerturbedParameter:
        return torch.Tensor._make_wrapper_subclass(cls, theta.shape, dtype=theta.dtype, device=theta.device,
                                                   requires_grad=False)

    def __init__(self, theta: torch.Tensor, name: str, offset: int, coefs: Sequence[float], streams: Sequence[int],
                 seed: int, dist: str) -> None:
        self.theta, self.label, self.offset = theta, name, offset
        self.coefs, self.streams, self.seed, self.dist = list(coefs), list(streams), seed, dist

    def materialize(self) -> torch.Tensor:
        out = torch.empty_like(self.theta)
        ops.perturb_into([self.theta], [out], [self.offset], self.coefs, self.streams, self.seed, self.dist, 1.0)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mutated = [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        for arg_name, value in zip((a.name for a in func._schema.arguments), args):
            if arg_name in mutated and isinstance(value, PerturbedParameter):
                raise UsageError(f"the closure changed parameter {value.label} in place ({func}) during a "
                                 "zeroth-order step; a closure only computes the loss")
        unwrap = lambda t: t.materialize() if isinstance(t, PerturbedParameter) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def __repr__(self) -> str:
        return f"PerturbedParameter({self.label}, shape {tuple(self.shape)}, {self.dtype})"


def module_slots(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[Slot]:
    """Every (module, name, parameter) of model that holds one of params; each of params must be
    held by at least one module (the exact mode perturbs parameters where the model reads them)."""
    wanted = {id(p) for p in params}
    slots, found = [], set()
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                slots.append((module, name, p))
                found.add(id(p))
    missing = [i for i, p in enumerate(params) if id(p) not in found]
    if missing:
        raise UsageError(f"{len(missing)} of the optimizer's parameters (the first has shape "
                         f"{tuple(params[missing[0]].shape)}) are not parameters of the model's modules; the exact "
                         "zeroth-order mode perturbs parameters where the model reads them: pass the model that holds "
                         "them, or perturbation='in_place'")
    return slots


@contextlib.contextmanager
def perturbed(slots: Sequence[Slot], names: dict[int, str], offsets: dict[int, int], mus: dict[int, float],
              terms: Sequence[tuple[float, int]], seed: int, dist: str) -> Iterator[None]:
    """While the block runs, every slot reads theta + sum_k (c_k mu_p) z(seed, stream_k) for the
    terms (c_k, stream_k), and every Parameter object itself holds NaN. Everything is put back
    however the block ends."""
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        for module, name, p in slots:
            if id(p) not in saved:
                saved[id(p)] = (p, p.data)
            theta = saved[id(p)][1]
            module._parameters[name] = PerturbedParameter(
                theta, names[id(p)], offsets[id(p)], [c * mus[id(p)] for c, _ in terms], [s for _, s in terms], seed,
                dist)
        for p, theta in saved.values():
            p.data = torch.full((), float("nan"), dtype=theta.dtype, device=theta.device).expand(theta.shape)
        yield
    finally:
        for p, theta in saved.values():
            p.data = theta
        for module, name, p in slots:
            module._parameters[name] = p
