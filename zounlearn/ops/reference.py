"""The fused ops in pure PyTorch: the portable fallback backend and the oracle of every other one.

The kernels take the ops' schema arguments (zounlearn/ops/library.py), validated by the caller.
They work in chunks so that their temporaries stay small whatever the tensor size, compute in
float32 with one rounding per operation in csrc/update_rules.h's order, and bump the version
counter of every tensor they write, as torch's in-place ops do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng
from .rules import Hyper, Rule, float32

CHUNK = 1 << 20


def _chunks(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
    return None if t is None else t.view(-1)[start : start + CHUNK]


def _perturb(params: Sequence[torch.Tensor], out: Sequence[torch.Tensor], offsets: Sequence[int],
             coefs: Sequence[float], streams: Sequence[int], seed: int, dist: str, alpha: float) -> None:
    alpha = float32(alpha)
    coefs = [float32(c) for c in coefs]
    for t, o, base in zip(params, out, offsets):
        for start in range(0, t.numel(), CHUNK):
            part = _chunks(t, start)
            acc = part.float() * alpha  # always a new float32 tensor
            for c, stream in zip(coefs, streams):
                # acc + (c * z): two roundings, never a fused multiply-add
                acc += rng.sample(seed, stream, base + start, part.numel(), dist, part.device).mul_(c)
            _chunks(o, start).copy_(acc)
    torch.autograd.graph.increment_version(out)


def perturb_(params: Sequence[torch.Tensor], offsets: Sequence[int], coefs: Sequence[float], streams: Sequence[int],
             seed: int, dist: str, alpha: float) -> None:
    _perturb(params, params, offsets, coefs, streams, seed, dist, alpha)


def perturb_into(params: Sequence[torch.Tensor], out: Sequence[torch.Tensor], offsets: Sequence[int],
                 coefs: Sequence[float], streams: Sequence[int], seed: int, dist: str, alpha: float) -> None:
    _perturb(params, out, offsets, coefs, streams, seed, dist, alpha)


def _store(part: torch.Tensor, value: torch.Tensor, rounding: str, seed: int, stream: int, offset: int) -> None:
    """part <- value (float32), rounded to part's dtype to nearest or stochastically (docs/rng.md)."""
    if rounding == "stochastic" and part.dtype != torch.float32:
        bits = rng.rounding_bits(seed, stream, offset, part.numel(), part.device)
        value = rng.round_stochastic(value, bits, part.dtype)
    part.copy_(value)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).float() - (x < 0).float()  # NaN gives 0, as sign_of


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    # x / c with a Python scalar c is x * (1 / c) on the CPU: not the kernels' IEEE division.
    return x / torch.full_like(x, c)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch.sqrt of float32 on the CPU goes through MKL's vsSqrt, which is not always correctly
    # rounded; in float64 (even within 1 ulp) it rounds to the IEEE float32 result.
    return torch.sqrt(x.double()).float()


def _adam_direction(h: Hyper, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _div(m, h.bias_correction1) / (_div(_sqrt(v), h.sqrt_bias_correction2) + h.eps)


def apply_rule(rule: Rule, h: Hyper, theta: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
               v: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """csrc/update_rules.h's apply_rule on float32 tensors, one rounding per operation in its order.

    Updates m and v in place; returns (new theta, |u| for ADAM_MOMENTS else None). Only plain
    + - * / and sqrt: torch's fused forms (add with alpha, addcmul) may use FMA.
    """
    if rule is Rule.SGD:
        g = g + theta * h.weight_decay
        m.copy_(m * h.beta1 + g)
        return theta - m * h.lr, None
    if rule is Rule.SIGN:
        return theta * h.decay - _sign(g) * h.lr, None
    if rule is Rule.DESCENT:
        return theta * h.decay - g * h.lr, None
    if rule is Rule.QUANTIZED:
        u = _adam_direction(h, m, v)
        if h.levels == 0:
            q = _sign(u)
        elif scale > 0:
            q = _div(torch.round(_div(u, scale) * h.levels), h.levels) * scale
        else:
            q = torch.zeros_like(u)
        return theta * h.decay - q * h.lr, None
    m.copy_(m * h.beta1 + g * h.one_minus_beta1)  # every other rule keeps Adam's first moment
    if rule is Rule.SIGN_ADAM:
        return theta * h.decay - _sign(m) * h.lr, None
    if rule is Rule.SOPHIA:
        ratio = m / (v * h.rho + h.eps)
        return theta * h.decay - torch.clamp(ratio, -1.0, 1.0) * h.lr, None
    if rule is Rule.ADAZO:
        v.copy_(v * h.beta2 + (m * m) * h.one_minus_beta2)
        return theta * h.decay - (m / (_sqrt(v) + h.eps)) * h.lr, None
    v.copy_(v * h.beta2 + (g * g) * h.one_minus_beta2)  # ADAM, ADAM_MOMENTS
    u = _adam_direction(h, m, v)
    if rule is Rule.ADAM:
        return theta * h.decay - u * h.lr, None
    return theta, u.abs()  # ADAM_MOMENTS


def _hyper(hyper: Sequence[float]) -> Hyper:
    return Hyper(*(float32(x) for x in hyper))


def _state(state: Sequence[torch.Tensor], i: int, start: int) -> torch.Tensor | None:
    """The rule's float32 view of a state chunk: the chunk itself, or a float32 copy of bfloat16 state."""
    if not state:
        return None
    part = _chunks(state[i], start)
    return part if part.dtype == torch.float32 else part.float()


def _store_state(state: Sequence[torch.Tensor], i: int, start: int, value: torch.Tensor | None, written: bool,
                 rounding: str, seed: int, stream: int, kind: str, offset: int) -> None:
    """Lean (bfloat16) state back from its float32 copy, rounded with its own stream (docs/rng.md)."""
    part = _chunks(state[i], start) if state else None
    if written and part is not None and part.dtype != torch.float32:
        _store(part, value, rounding, seed, rng.state_rounding_stream(stream, kind), offset)


def zo_update_(params: Sequence[torch.Tensor], m: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
               offsets: Sequence[int], coefs: Sequence[float], streams: Sequence[int], seed: int, dist: str,
               restore: float, rule: str, rounding: str, rounding_stream: int, *hyper: float) -> None:
    rule, h = Rule(rule), _hyper(hyper)
    coefs = [float32(c) for c in coefs]
    restore = float32(restore)
    for i, (t, base) in enumerate(zip(params, offsets)):
        for start in range(0, t.numel(), CHUNK):
            part = _chunks(t, start)
            zs = [rng.sample(seed, s, base + start, part.numel(), dist, part.device) for s in streams]
            theta = part.float() + zs[-1] * restore  # the restore of the last query's perturbation
            g = torch.zeros_like(theta)
            for c, z in zip(coefs, zs):
                g = g + z * c
            mi, vi = _state(m, i, start), _state(v, i, start)
            new, _ = apply_rule(rule, h, theta, g, mi, vi, 0.0)
            _store(part, new, rounding, seed, rounding_stream, base + start)
            _store_state(m, i, start, mi, rule.info.writes_m, rounding, seed, rounding_stream, "m", base + start)
            _store_state(v, i, start, vi, rule.info.writes_v, rounding, seed, rounding_stream, "v", base + start)
    torch.autograd.graph.increment_version([*params, *m, *v])


def grad_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], m: Sequence[torch.Tensor],
                 v: Sequence[torch.Tensor], scales: torch.Tensor | None, offsets: Sequence[int], seed: int, rule: str,
                 rounding: str, rounding_stream: int, *hyper: float) -> None:
    rule, h = Rule(rule), _hyper(hyper)
    writes_scales = rule.info.scales == "write"
    if writes_scales:
        scales.zero_()
    for i, (t, grad) in enumerate(zip(params, grads)):
        scale = float(scales[i]) if rule.info.scales == "read" else 0.0
        for start in range(0, t.numel(), CHUNK):
            part = _chunks(t, start)
            mi, vi = _state(m, i, start), _state(v, i, start)
            new, abs_u = apply_rule(rule, h, part.float(), _chunks(grad, start).float(), mi, vi, scale)
            offset = offsets[i] + start
            _store_state(m, i, start, mi, rule.info.writes_m, rounding, seed, rounding_stream, "m", offset)
            _store_state(v, i, start, vi, rule.info.writes_v, rounding, seed, rounding_stream, "v", offset)
            if abs_u is not None:
                if abs_u.numel():
                    scales[i] = torch.maximum(scales[i], abs_u.max())
                continue  # the moments pass leaves theta as it is
            _store(part, new, rounding, seed, rounding_stream, offset)
    written = [*params, *(m if rule.info.writes_m else ()), *(v if rule.info.writes_v else ())]
    torch.autograd.graph.increment_version(written + ([scales] if writes_scales else []))
