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


def _check_like(kind: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor], dtype) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"one {kind} tensor per parameter: got {len(params)} params and {len(tensors)} {kind}")
    for i, (s, p) in enumerate(zip(tensors, params)):
        want = p.dtype if dtype is None else dtype
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{kind}[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != p.shape or s.dtype != want or s.device != p.device or not s.is_contiguous():
            raise ValueError(
                f"{kind}[{i}] must be a contiguous {want} tensor of shape {tuple(p.shape)} on {p.device} "
                f"like {_describe(i, p)}; got shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}"
            )


def check_state_args(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor] | None,
    m: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    scales: torch.Tensor | None,
    rule,
) -> None:
    """The optimizer updates' tensors: grads like params (same dtype), state in float32.

    rule is a zounlearn.ops.update.Rule; m and v are given exactly when it uses them.
    Call check_perturb_args (zo_update_) or this alone (grad_update_) first for params.
    """
    if grads is not None:
        check_perturb_args(params, [0] * len(params), [0.0], [0], "rademacher")
        _check_like("grads", grads, params, None)
    for kind, tensors, used in (("m", m, rule.uses_m), ("v", v, rule.uses_v)):
        if used:
            _check_like(kind, tensors, params, torch.float32)
        elif tensors:
            raise ValueError(f"rule {rule.name} keeps no {kind} state; pass an empty list")
    if rule.name in ("ADAM_MOMENTS", "QUANTIZED"):
        if grads is None:
            raise ValueError(f"rule {rule.name} is first-order only (compressed Adam's two passes)")
        if (
            not isinstance(scales, torch.Tensor)
            or scales.shape != (len(params),)
            or scales.dtype != torch.float32
            or (params and scales.device != params[0].device)
        ):
            raise ValueError(f"rule {rule.name} needs scales: a float32 tensor of shape ({len(params)},) on the params' device")
