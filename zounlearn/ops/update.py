"""The fused optimizer updates, declared once with torch.library like `perturb_`.

    zo_update_:   theta <- rule(theta + r z_K, g = sum_k c_k z_k, m, v)  directions regenerated
    grad_update_: theta <- rule(theta, g = grad, m, v)                     gradients read

The rules (csrc/update_rules.h, docs/optimizers.md) are one element at a time in float32 with
float32 state m and v; each call is one pass over params and state. zo_update_ restores the
last query's perturbation (coefficient r on the last stream) in the same pass.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import backends
from .reference import float32
from .validation import check_perturb_args, check_state_args


class Rule(enum.IntEnum):
    """Numbered as zo::Rule in csrc/update_rules.h."""

    SGD = 0
    SIGN = 1
    ADAM = 2
    ADAZO = 3
    SIGN_ADAM = 4
    ADAM_MOMENTS = 5
    QUANTIZED = 6
    SOPHIA = 7

    @property
    def uses_m(self) -> bool:
        return self is not Rule.SIGN

    @property
    def uses_v(self) -> bool:
        return self in (Rule.ADAM, Rule.ADAZO, Rule.ADAM_MOMENTS, Rule.QUANTIZED, Rule.SOPHIA)


class Hyper(NamedTuple):
    """The rules' scalars, each rounded to float32 once here so that every backend sees the same bits."""

    lr: float
    decay: float
    weight_decay: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    bias_correction1: float
    sqrt_bias_correction2: float
    levels: float
    rho: float

    @classmethod
    def make(
        cls,
        lr: float,
        *,
        weight_decay: float = 0.0,
        decoupled: bool = True,
        beta1: float = 0.0,
        beta2: float = 0.0,
        eps: float = 1e-8,
        step: int = 1,
        bits: int = 1,
        rho: float = 0.0,
    ) -> Hyper:
        """step counts from 1 (bias corrections); bits is compressed Adam's N."""
        values = (
            lr,
            1.0 - lr * weight_decay if decoupled else 1.0,
            0.0 if decoupled else weight_decay,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            1.0 - beta1**step,
            math.sqrt(1.0 - beta2**step),
            float(2 ** (bits - 1) - 1),
            rho,
        )
        return cls(*(float32(x) for x in values))


def _zo_launch(
    params: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    offsets: list[int],
    coefs: list[float],
    streams: list[int],
    seed: int,
    dist: str,
    restore: float,
    rule: int,
    hyper: list[float],
    backend: str,
) -> None:
    check_perturb_args(params, offsets, coefs, streams, dist)
    check_state_args(params, None, m, v, None, Rule(rule))
    kernels = backends.select(params[0].device.type, backend)[1]
    with torch.no_grad():
        kernels.zo_update_(params, m, v, offsets, coefs, streams, seed, dist, restore, rule, hyper)


def _grad_launch(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    scales: torch.Tensor | None,
    rule: int,
    hyper: list[float],
    backend: str,
) -> None:
    check_state_args(params, grads, m, v, scales, Rule(rule))
    kernels = backends.select(params[0].device.type, backend)[1]
    with torch.no_grad():
        kernels.grad_update_(params, grads, m, v, scales, rule, hyper)


_zo_op = torch.library.custom_op("zounlearn::zo_update_", mutates_args=("params", "m", "v"))(_zo_launch)
_grad_op = torch.library.custom_op("zounlearn::grad_update_", mutates_args=("params", "m", "v", "scales"))(
    _grad_launch
)


@_zo_op.register_fake
def _(params, m, v, offsets, coefs, streams, seed, dist, restore, rule, hyper, backend) -> None:
    check_perturb_args(params, offsets, coefs, streams, dist)
    check_state_args(params, None, m, v, None, Rule(rule))


@_grad_op.register_fake
def _(params, grads, m, v, scales, rule, hyper, backend) -> None:
    check_state_args(params, grads, m, v, scales, Rule(rule))


def _call(op, launch, args) -> None:
    # As perturb_: eager calls skip the dispatcher, torch.compile traces the registered op.
    (op if torch.compiler.is_compiling() else launch)(*args)


def zo_update_(
    params: Sequence[torch.Tensor],
    coefs: Sequence[float],
    seed: int,
    streams: Sequence[int],
    offsets: Sequence[int],
    *,
    rule: Rule,
    hyper: Hyper,
    m: Sequence[torch.Tensor] = (),
    v: Sequence[torch.Tensor] = (),
    restore: float = 0.0,
    dist: str = "rademacher",
    backend: str | None = None,
) -> None:
    """One pass: regenerate z_k = z(seed, streams[k], e), g = sum_k coefs[k] z_k, restore
    theta += restore * z_last, then apply `rule` with float32 state m (and v) per tensor.

    params, offsets and streams as for perturb_ (offsets are required here: the optimizer
    owns the layout). m and v: float32 tensors shaped like params, given when the rule uses them.
    """
    params, m, v = list(params), list(m), list(v)
    if not params:
        return
    args = (params, m, v, list(offsets), [float(c) for c in coefs], list(streams), seed, dist,
            float(restore), int(rule), list(hyper), backend or "auto")
    _call(_zo_op, _zo_launch, args)


def grad_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    rule: Rule,
    hyper: Hyper,
    m: Sequence[torch.Tensor] = (),
    v: Sequence[torch.Tensor] = (),
    scales: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One pass of `rule` with each tensor's gradient. scales (float32, one per tensor):
    written with max |u| by Rule.ADAM_MOMENTS, read by Rule.QUANTIZED."""
    params, grads, m, v = list(params), list(grads), list(m), list(v)
    if not params:
        return
    _call(_grad_op, _grad_launch, (params, grads, m, v, scales, int(rule), list(hyper), backend or "auto"))
