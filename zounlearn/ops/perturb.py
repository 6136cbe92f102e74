"""The fused in-place op `perturb_` and `sample`, declared once with torch.library.

theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], e)   for every element e

MeZO's perturb (alpha = 1, c = +mu), restore (c = -mu), the update (c = -lr * g)
and a fused restore + update are all one pass of this op; z is regenerated from
(seed, stream, e) by ZO-RNG v1 (docs/rng.md) and never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends
from .validation import as_int64, check_perturb_args


def flat_offsets(params: Sequence[torch.Tensor], start: int = 0) -> list[int]:
    """Base offsets that make the tensors one flat vector, in the given order."""
    offsets, total = [], start
    for t in params:
        offsets.append(total)
        total += t.numel()
    return offsets


def _launch(
    params: list[torch.Tensor],
    offsets: list[int],
    alpha: float,
    coefs: list[float],
    streams: list[int],
    seed: int,
    dist: str,
    backend: str,
) -> None:
    check_perturb_args(params, offsets, coefs, streams, dist)
    kernels = backends.select(params[0].device.type, backend)[1]
    with torch.no_grad():
        kernels.perturb_(params, offsets, alpha, coefs, streams, seed, dist)


# The op is _launch itself; eager calls below skip the dispatcher and call _launch directly.
_perturb_op = torch.library.custom_op("zounlearn::perturb_", mutates_args=("params",))(_launch)


@_perturb_op.register_fake
def _(params, offsets, alpha, coefs, streams, seed, dist, backend) -> None:
    # Tracing validates too; and a list mixing meta with real tensors dispatches here.
    check_perturb_args(params, offsets, coefs, streams, dist)


def perturb_(
    params: torch.Tensor | Sequence[torch.Tensor],
    coefs: float | Sequence[float],
    seed: int,
    *,
    streams: int | Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
    alpha: float = 1.0,
    dist: str = "rademacher",
    backend: str | None = None,
) -> None:
    """In place: theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], e).

    params: one tensor or a list (float32, bfloat16 or float16, contiguous, one device).
    coefs: 1 to 8 coefficients, one pass for all of them.
    seed, streams: 64-bit ids, taken mod 2^64; streams default to 0 .. K-1.
    offsets: each tensor's global base index; by default the tensors are laid end to
        end as one flat vector (flat_offsets), so z does not depend on how a model is split.
    backend: "cpp", "cuda", "triton", "reference" or None/"auto" (ZOUNLEARN_BACKEND, then the
        fastest available for the device; see `zounlearn info`).
    Math is float32 with one rounding to each tensor's dtype. Invalid input raises
    before any tensor is modified.
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    coefs = [coefs] if isinstance(coefs, (int, float)) else list(coefs)
    if streams is None:
        streams = list(range(len(coefs)))
    elif isinstance(streams, int):
        streams = [streams]
    streams = [as_int64(s, f"streams[{k}]") for k, s in enumerate(streams)]
    seed = as_int64(seed, "seed")
    offsets = flat_offsets(params) if offsets is None else list(offsets)
    coefs = [float(c) for c in coefs]
    if not params:  # nothing to dispatch on; still reject bad terms
        check_perturb_args(params, offsets, coefs, streams, dist)
        return
    args = (params, offsets, float(alpha), coefs, streams, seed, dist, backend or "auto")
    if torch.compiler.is_compiling():
        _perturb_op(*args)  # what torch.compile traces: the registered op
    else:
        # Eager calls run the op's own kernel directly: the dispatcher adds ~0.1 ms plus a few
        # microseconds per tensor to every pass, for nothing outside a trace.
        _launch(*args)


def sample(
    shape: int | Sequence[int],
    seed: int,
    stream: int = 0,
    *,
    offset: int = 0,
    dist: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Materialise z(seed, stream, offset + i) for tests and debugging (the optimizers never do)."""
    out = torch.zeros(shape, dtype=dtype, device=device)
    # 0 * 0 + 1 * z is exactly z: sampling is one pass of the same kernels.
    perturb_(out, 1.0, seed, streams=stream, offsets=[offset], alpha=0.0, dist=dist, backend=backend)
    return out
