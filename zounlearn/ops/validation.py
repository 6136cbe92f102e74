"""Argument checks shared by every backend: all run before any tensor is touched."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor  # tensors torch.compile traces with

from ..rng import DISTRIBUTIONS

MAX_TERMS = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def as_int64(value: int, name: str) -> int:
    """A 64-bit id (seed or stream) taken mod 2^64, as the signed int64 the op schema carries."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value %= 1 << 64
    return value - (1 << 64) if value > INT64_MAX else value


def _address(t: torch.Tensor) -> int | None:
    """The tensor's data address, or None when it has no data (empty, meta or fake tensors)."""
    if t.numel() == 0 or t.device.type == "meta" or isinstance(t, FakeTensor):
        return None
    return t.data_ptr()


def _describe(i: int, t: torch.Tensor) -> str:
    return f"params[{i}] (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def check_perturb_args(
    params: Sequence[torch.Tensor],
    offsets: Sequence[int],
    coefs: Sequence[float],
    streams: Sequence[int],
    dist: str,
) -> None:
    """Raise a ValueError/TypeError that names the bad argument; never mutates."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    if not 1 <= len(coefs) <= MAX_TERMS:
        raise ValueError(
            f"perturb_ takes 1 to {MAX_TERMS} terms in one pass, got {len(coefs)}; split the terms over several calls"
        )
    if len(streams) != len(coefs):
        raise ValueError(f"one stream per coefficient: got {len(coefs)} coefs and {len(streams)} streams")
    if len(offsets) != len(params):
        raise ValueError(f"one base offset per tensor: got {len(params)} tensors and {len(offsets)} offsets")
    device = None
    seen: dict[int, int] = {}
    for i, (t, off) in enumerate(zip(params, offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{_describe(i, t)}: dtype must be float32, bfloat16 or float16; "
                "integer, complex and float64 tensors are not supported"
            )
        if not t.is_contiguous():
            raise ValueError(f"{_describe(i, t)} is not contiguous; pass a contiguous tensor (e.g. t.contiguous())")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"{_describe(i, t)} is on {t.device} but params[0] is on {device}; all tensors must share one device"
            )
        if isinstance(off, bool) or not isinstance(off, int):
            raise TypeError(f"offsets[{i}] must be an int, got {type(off).__name__}")
        if off < 0 or off + t.numel() > INT64_MAX:
            raise ValueError(
                f"offsets[{i}] = {off} for {_describe(i, t)}: global indices must lie in [0, 2^63); "
                "base offsets are non-negative"
            )
        address = _address(t)
        if address in seen:
            raise ValueError(f"params[{i}] and params[{seen[address]}] share memory; each tensor may appear once")
        if address is not None:
            seen[address] = i
