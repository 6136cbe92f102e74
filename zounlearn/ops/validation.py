"""The one validation layer of the fused ops: the fake implementations run it when torch.compile
traces, the public ops (zounlearn.ops) before they dispatch, and the optimizers once per step
before their passes. Nothing here mutates; every failure names the argument and says how to
fix it. The compiled kernels keep only the checks that guard their raw pointers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor  # tensors torch.compile traces with

from ..errors import UsageError
from ..rng import DISTRIBUTIONS, ROUNDINGS
from .rules import RULES, Hyper, Rule

MAX_TERMS = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)  # m and v; bfloat16 is the lean state (docs/memory.md)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def as_int64(value: int, name: str) -> int:
    """A 64-bit id (seed or stream) taken mod 2^64, as the signed int64 the op schema carries."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value %= 1 << 64
    return value - (1 << 64) if value > INT64_MAX else value


def _describe(kind: str, i: int, t: torch.Tensor) -> str:
    return f"{kind}[{i}] (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def check_params(params: Sequence[torch.Tensor], offsets: Sequence[int] | None = None, kind: str = "params") -> None:
    """Contiguous float32/bfloat16/float16 tensors on one device, no two sharing any memory; with
    offsets, one non-negative base index per tensor and every global index below 2^63.

    Runs once per optimizer step over every parameter: kept to the attribute reads it needs."""
    if offsets is not None and len(offsets) != len(params):
        raise UsageError(f"one base offset per tensor: got {len(params)} tensors and {len(offsets)} offsets")
    device = None
    spans = []  # (first byte, end byte, index) of the tensors that have data
    has_memory = bool(params) and not isinstance(params[0], FakeTensor)  # tracing: all fake, no memory
    for i, t in enumerate(params):
        try:
            dtype, contiguous, numel, here = t.dtype, t.is_contiguous(), t.numel(), t.device
        except AttributeError:
            raise TypeError(f"{kind}[{i}] must be a torch.Tensor, got {type(t).__name__}") from None
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_describe(kind, i, t)}: dtype must be float32, bfloat16 or float16; "
                            "integer, complex and float64 tensors are not supported")
        if not contiguous:
            raise UsageError(f"{_describe(kind, i, t)} is not contiguous; pass a contiguous tensor "
                             "(e.g. t.contiguous())")
        if device is None:
            device = here
        elif here != device:
            raise UsageError(f"{_describe(kind, i, t)} is on {here} but {kind}[0] is on {device}; all tensors "
                             "must share one device")
        if offsets is not None:
            off = offsets[i]
            if off.__class__ is not int:
                if isinstance(off, bool) or not isinstance(off, int):
                    raise TypeError(f"offsets[{i}] must be an int, got {type(off).__name__}")
            if off < 0 or off + numel > INT64_MAX:
                raise UsageError(f"offsets[{i}] = {off} for {_describe(kind, i, t)}: global indices must lie in "
                                 "[0, 2^63); base offsets are non-negative")
        if numel and has_memory and here.type != "meta":
            start = t.data_ptr()
            spans.append((start, start + t.nbytes, i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:  # distinct allocations never overlap: this is one memory, twice
            first, second = sorted((i, j))
            raise UsageError(f"{kind}[{second}] and {kind}[{first}] share memory; each element may appear once "
                             "(pass each tensor once, and no overlapping views of one tensor)")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{name} must be finite, got {value}; a NaN or inf would overwrite every element")


def check_terms(coefs: Sequence[float], streams: Sequence[int], dist: str) -> None:
    """1 to 8 finite coefficients, one int64 stream each, a known distribution."""
    if dist not in DISTRIBUTIONS:
        raise UsageError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    if not 1 <= len(coefs) <= MAX_TERMS:
        raise UsageError(f"perturb_ takes 1 to {MAX_TERMS} terms in one pass, got {len(coefs)}; split the terms "
                         "over several calls")
    if len(streams) != len(coefs):
        raise UsageError(f"one stream per coefficient: got {len(coefs)} coefs and {len(streams)} streams")
    for k, c in enumerate(coefs):
        check_finite(f"coefs[{k}]", c)


def _check_like(kind: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor], dtype) -> None:
    if len(tensors) != len(params):
        raise UsageError(f"one {kind} tensor per parameter: got {len(params)} params and {len(tensors)} {kind}")
    for i, (s, p) in enumerate(zip(tensors, params)):
        want = p.dtype if dtype is None else dtype
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{kind}[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != p.shape or s.dtype != want or s.device != p.device or not s.is_contiguous():
            raise UsageError(
                f"{kind}[{i}] must be a contiguous {want} tensor of shape {tuple(p.shape)} on {p.device} "
                f"like {_describe('params', i, p)}; got shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}"
            )


def check_rule(rule: str, *, zeroth_order: bool) -> Rule:
    """The named rule, if the op may use it."""
    try:
        r = Rule(rule)
    except ValueError:
        raise UsageError(f"unknown rule {rule!r}; the rules: {', '.join(r.value for r in RULES)}") from None
    if zeroth_order and not r.info.zeroth_order:
        raise UsageError(f"rule {r.value!r} is first-order only; zo_update_ takes "
                         f"{', '.join(x.value for x, i in RULES.items() if i.zeroth_order)}")
    return r


def check_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One gradient per parameter, of its shape, dtype and device, contiguous."""
    _check_like("grads", grads, params, None)


def check_state(
    params: Sequence[torch.Tensor],
    m: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    rule: Rule,
    scales: torch.Tensor | None = None,
    grads: Sequence[torch.Tensor] | None = None,
) -> None:
    """The rule's tensors besides params: state m and v exactly when the rule uses them, all of one
    dtype (float32, or bfloat16: the lean state), grads like params (same dtype), scales a float32
    vector with one value per tensor."""
    if grads is not None:
        check_grads(params, grads)
    state = [t for t in (*m, *v) if isinstance(t, torch.Tensor)]
    dtype = state[0].dtype if state else torch.float32
    if dtype not in STATE_DTYPES:
        dtype = torch.float32  # the error below names the first tensor that is not
    for kind, tensors, used in (("m", m, rule.uses_m), ("v", v, rule.uses_v)):
        if used:
            _check_like(kind, tensors, params, dtype)
        elif tensors:
            raise UsageError(f"rule {rule.value!r} keeps no {kind} state; pass an empty list")
    if rule.info.scales is not None:
        if (not isinstance(scales, torch.Tensor) or scales.shape != (len(params),) or scales.dtype != torch.float32
                or (params and scales.device != params[0].device)):
            raise UsageError(f"rule {rule.value!r} needs scales: a float32 tensor of shape ({len(params)},) on the "
                             "params' device")


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise UsageError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def check_hyper(hyper: Sequence[float]) -> None:
    """The update rules' scalars, in Hyper's order."""
    for name, value in zip(Hyper._fields, hyper):
        check_finite(name, value)


# The ops' checks, with the ops' signatures: they are also the fake implementations.

def check_perturb(params, offsets, coefs, streams, seed, dist, alpha) -> None:
    check_terms(coefs, streams, dist)
    check_finite("alpha", alpha)
    check_params(params, offsets)


def check_perturb_into(params, out, offsets, coefs, streams, seed, dist, alpha) -> None:
    check_perturb(params, offsets, coefs, streams, seed, dist, alpha)
    _check_like("out", out, params, None)
    check_params(out, kind="out")
    if any(o is p for o, p in zip(out, params)):
        raise UsageError("perturb_into writes out and reads params: pass other tensors as out "
                         "(perturb_ works in place)")


def check_zo_update(params, m, v, offsets, coefs, streams, seed, dist, restore, rule, rounding, rounding_stream,
                    *hyper) -> None:
    check_terms(coefs, streams, dist)
    check_finite("restore", restore)
    check_rounding(rounding)
    check_hyper(hyper)
    check_params(params, offsets)
    check_state(params, m, v, check_rule(rule, zeroth_order=True))


def check_grad_update(params, grads, m, v, scales, offsets, seed, rule, rounding, rounding_stream, *hyper) -> None:
    check_rounding(rounding)
    check_hyper(hyper)
    check_params(params, offsets)
    check_state(params, m, v, check_rule(rule, zeroth_order=False), scales, grads)
