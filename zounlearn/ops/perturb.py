"""The perturbation op and sampling, for users: arguments normalised and validated, then one call
of the registered op (zounlearn/ops/library.py).

theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], e)   for every element e

MeZO's perturb (alpha = 1, c = +mu), restore (c = -mu), the update (c = -lr * g) and a fused
restore + update are all one pass of this op; z is regenerated from (seed, stream, e) by ZO-RNG
v1 (docs/rng.md) and never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .library import ops
from .validation import as_int64, check_perturb, check_perturb_into, check_terms


def flat_offsets(params: Sequence[torch.Tensor], start: int = 0) -> list[int]:
    """Base offsets that make the tensors one flat vector, in the given order."""
    offsets, total = [], start
    for t in params:
        offsets.append(total)
        total += t.numel()
    return offsets


def perturb_(
    params: torch.Tensor | Sequence[torch.Tensor],
    coefs: float | Sequence[float],
    seed: int,
    *,
    streams: int | Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
    alpha: float = 1.0,
    dist: str = "rademacher",
) -> None:
    """In place: theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], e).

    params: one tensor or a list (float32, bfloat16 or float16, contiguous, one device, no two
        sharing memory).
    coefs: 1 to 8 finite coefficients, one pass for all of them.
    seed, streams: 64-bit ids, taken mod 2^64; streams default to 0 .. K-1.
    offsets: each tensor's global base index; by default the tensors are laid end to end as one
        flat vector (flat_offsets), so z does not depend on how a model is split.
    Math is float32 with one rounding to each tensor's dtype. Invalid input raises before any
    tensor is modified. The backend is the device's (zounlearn.ops.backends; `zounlearn info`).
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    offsets, coefs, streams, seed = _terms(params, coefs, seed, streams, offsets)
    args = (params, offsets, coefs, streams, seed, dist, float(alpha))
    if not torch.compiler.is_compiling():  # a trace runs the same checks as the op's fake
        check_perturb(*args)
    if params:  # nothing to dispatch on otherwise
        ops.perturb_(*args)


def perturb_into(
    params: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    coefs: float | Sequence[float],
    seed: int,
    *,
    streams: int | Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
    alpha: float = 1.0,
    dist: str = "rademacher",
) -> None:
    """out <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], e), theta unchanged: perturb_'s
    pass written to other tensors of the same shapes and dtypes (the exact zeroth-order mode
    perturbs copies this way, so that theta itself is never rounded)."""
    params, out = list(params), list(out)
    offsets, coefs, streams, seed = _terms(params, coefs, seed, streams, offsets)
    args = (params, out, offsets, coefs, streams, seed, dist, float(alpha))
    if not torch.compiler.is_compiling():
        check_perturb_into(*args)
    if params:
        ops.perturb_into(*args)


def _terms(params: list[torch.Tensor], coefs: float | Sequence[float], seed: int,
           streams: int | Sequence[int] | None, offsets: Sequence[int] | None
           ) -> tuple[list[int], list[float], list[int], int]:
    """The perturbation's arguments as the ops take them: (offsets, coefs, streams, seed)."""
    coefs = [float(c) for c in ([coefs] if isinstance(coefs, (int, float)) else coefs)]
    if streams is None:
        streams = list(range(len(coefs)))
    streams = [as_int64(s, f"streams[{k}]") for k, s in enumerate([streams] if isinstance(streams, int) else streams)]
    offsets = flat_offsets(params) if offsets is None else list(offsets)
    return offsets, coefs, streams, as_int64(seed, "seed")


def sample(
    shape: int | Sequence[int],
    seed: int,
    stream: int = 0,
    *,
    offset: int = 0,
    dist: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Materialise z(seed, stream, offset + i) for tests and debugging (the optimizers never do)."""
    shape = [shape] if isinstance(shape, int) else list(shape)
    stream, seed = as_int64(stream, "stream"), as_int64(seed, "seed")
    check_terms([1.0], [stream], dist)
    out = torch.empty(shape, dtype=dtype, device=device)
    check_perturb([out], [offset], [1.0], [stream], seed, dist, 0.0)
    return ops.sample(shape, seed, stream, offset, dist, dtype, torch.device(device))
