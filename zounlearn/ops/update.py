"""The fused optimizer updates, for users: arguments normalised and validated, then one call of
the registered op (zounlearn/ops/library.py).

    zo_update_:   theta <- rule(theta + r z_K, g = sum_k c_k z_k, m, v)  directions regenerated
    grad_update_: theta <- rule(theta, g = grad, m, v)                     gradients read

The rules (zounlearn/ops/rules.py, csrc/update_rules.h, docs/optimizers.md) are one element at a
time in float32 with state m and v in float32 or bfloat16 (the lean state: loaded to float32,
stored back rounded as `rounding` says, with its own rounding words: docs/rng.md); each call is
one pass over params and state.
zo_update_ restores the last query's perturbation (coefficient r on the last stream) in the same
pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rng import ROUNDING_STREAM_BASE
from .library import ops
from .perturb import flat_offsets
from .rules import Hyper, Rule
from .validation import as_int64, check_grad_update, check_zo_update


def zo_update_(
    params: Sequence[torch.Tensor],
    coefs: Sequence[float],
    seed: int,
    streams: Sequence[int],
    offsets: Sequence[int],
    *,
    rule: Rule | str,
    hyper: Hyper,
    m: Sequence[torch.Tensor] = (),
    v: Sequence[torch.Tensor] = (),
    restore: float = 0.0,
    dist: str = "rademacher",
    rounding: str = "nearest",
    rounding_stream: int = ROUNDING_STREAM_BASE,
) -> None:
    """One pass: regenerate z_k = z(seed, streams[k], e), g = sum_k coefs[k] z_k, restore
    theta += restore * z_last, then apply `rule` with state m (and v) per tensor.

    params, offsets and streams as for perturb_ (offsets are required here: the optimizer owns
    the layout). m and v: tensors shaped like params, given when the rule uses them, all float32
    or all bfloat16 (stored back with `rounding`, under the streams of rng.state_rounding_stream).
    rounding: how theta is stored into a half-precision tensor: "nearest" (even) or
    "stochastic" with the rounding words of (seed, rounding_stream) (docs/rng.md).
    """
    args = (list(params), list(m), list(v), list(offsets), [float(c) for c in coefs],
            [as_int64(s, f"streams[{k}]") for k, s in enumerate(streams)], as_int64(seed, "seed"), dist,
            float(restore), Rule(rule).value, rounding, as_int64(rounding_stream, "rounding_stream"), *hyper)
    if not torch.compiler.is_compiling():  # a trace runs the same checks as the op's fake
        check_zo_update(*args)
    if args[0]:
        ops.zo_update_(*args)


def grad_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    rule: Rule | str,
    hyper: Hyper,
    m: Sequence[torch.Tensor] = (),
    v: Sequence[torch.Tensor] = (),
    scales: torch.Tensor | None = None,
    offsets: Sequence[int] | None = None,
    seed: int = 0,
    rounding: str = "nearest",
    rounding_stream: int = ROUNDING_STREAM_BASE,
) -> None:
    """One pass of `rule` with each tensor's gradient. scales (float32, one per tensor): written
    with max |u| by Rule.ADAM_MOMENTS, read by Rule.QUANTIZED. offsets (the tensors laid end to
    end by default), seed, rounding and rounding_stream: the stochastic rounding's, as zo_update_'s."""
    params = list(params)
    offsets = flat_offsets(params) if offsets is None else list(offsets)
    args = (params, list(grads), list(m), list(v), scales, offsets, as_int64(seed, "seed"), Rule(rule).value,
            rounding, as_int64(rounding_stream, "rounding_stream"), *hyper)
    if not torch.compiler.is_compiling():
        check_grad_update(*args)
    if args[0]:
        ops.grad_update_(*args)
