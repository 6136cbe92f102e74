"""The fused op in pure PyTorch: the portable fallback and the oracle for every backend.

Works in chunks so that its temporaries stay small whatever the tensor size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng

CHUNK = 1 << 20


def float32(x: float) -> float:
    """x rounded to float32, as the kernels see their scalar arguments."""
    return torch.tensor(x, dtype=torch.float32).item()


def perturb_(
    params: Sequence[torch.Tensor],
    offsets: Sequence[int],
    alpha: float,
    coefs: Sequence[float],
    streams: Sequence[int],
    seed: int,
    dist: str,
) -> None:
    alpha = float32(alpha)
    coefs = [float32(c) for c in coefs]
    for t, base in zip(params, offsets):
        flat = t.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            acc = part.float() * alpha  # always a new float32 tensor
            for c, stream in zip(coefs, streams):
                # acc + (c * z): two roundings, never a fused multiply-add
                acc += rng.sample(seed, stream, base + start, part.numel(), dist, part.device).mul_(c)
            part.copy_(acc)


def apply_rule(
    rule: int,
    h: Sequence[float],
    theta: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """csrc/update_rules.h on float32 tensors, one rounding per operation in the same order.

    Updates m and v in place; returns (new theta, |u| for kAdamMoments else None). Only
    plain + - * / and sqrt: torch's fused forms (add with alpha, addcmul) may use FMA.
    """
    from .update import Hyper, Rule

    h = Hyper(*h)
    sign = lambda x: (x > 0).float() - (x < 0).float()  # noqa: E731 -- NaN gives 0, as sign_of

    def div(x: torch.Tensor, c: float) -> torch.Tensor:
        # x / c with a Python scalar c is x * (1 / c) on the CPU: not the kernels' IEEE division.
        return x / torch.full_like(x, c)

    def sqrt(x: torch.Tensor) -> torch.Tensor:
        # torch.sqrt of float32 on the CPU goes through MKL's vsSqrt, which is not always
        # correctly rounded; in float64 (even within 1 ulp) it rounds to the IEEE float32 result.
        return torch.sqrt(x.double()).float()
    if rule == Rule.SGD:
        g = g + theta * h.weight_decay
        m.copy_(m * h.beta1 + g)
        return theta - m * h.lr, None
    if rule == Rule.SIGN:
        return theta * h.decay - sign(g) * h.lr, None
    if rule in (Rule.ADAM, Rule.ADAM_MOMENTS, Rule.ADAZO, Rule.SIGN_ADAM, Rule.SOPHIA):
        m.copy_(m * h.beta1 + g * h.one_minus_beta1)
    if rule in (Rule.ADAM, Rule.ADAM_MOMENTS):
        v.copy_(v * h.beta2 + (g * g) * h.one_minus_beta2)
    if rule == Rule.ADAZO:
        v.copy_(v * h.beta2 + (m * m) * h.one_minus_beta2)
        return theta * h.decay - (m / (sqrt(v) + h.eps)) * h.lr, None
    if rule == Rule.SIGN_ADAM:
        return theta * h.decay - sign(m) * h.lr, None
    if rule == Rule.SOPHIA:
        ratio = m / (v * h.rho + h.eps)
        return theta * h.decay - torch.clamp(ratio, -1.0, 1.0) * h.lr, None
    u = div(m, h.bias_correction1) / (div(sqrt(v), h.sqrt_bias_correction2) + h.eps)
    if rule == Rule.ADAM:
        return theta * h.decay - u * h.lr, None
    if rule == Rule.ADAM_MOMENTS:
        return theta, u.abs()
    if h.levels == 0:  # Rule.QUANTIZED
        q = sign(u)
    elif scale > 0:
        q = div(torch.round(div(u, scale) * h.levels), h.levels) * scale
    else:
        q = torch.zeros_like(u)
    return theta * h.decay - q * h.lr, None


def _chunks(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
    return None if t is None else t.view(-1)[start : start + CHUNK]


def zo_update_(
    params: Sequence[torch.Tensor],
    m: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    offsets: Sequence[int],
    coefs: Sequence[float],
    streams: Sequence[int],
    seed: int,
    dist: str,
    restore: float,
    rule: int,
    hyper: Sequence[float],
) -> None:
    coefs = [float32(c) for c in coefs]
    restore = float32(restore)
    hyper = [float32(x) for x in hyper]
    for i, (t, base) in enumerate(zip(params, offsets)):
        for start in range(0, t.numel(), CHUNK):
            part = _chunks(t, start)
            zs = [rng.sample(seed, s, base + start, part.numel(), dist, part.device) for s in streams]
            theta = part.float() + zs[-1] * restore  # the restore of the last query's perturbation
            g = torch.zeros_like(theta)
            for c, z in zip(coefs, zs):
                g = g + z * c
            mi = _chunks(m[i], start) if m else None
            vi = _chunks(v[i], start) if v else None
            new, _ = apply_rule(rule, hyper, theta, g, mi, vi, 0.0)
            part.copy_(new)


def grad_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    scales: torch.Tensor | None,
    rule: int,
    hyper: Sequence[float],
) -> None:
    from .update import Rule

    hyper = [float32(x) for x in hyper]
    if rule == Rule.ADAM_MOMENTS:
        scales.zero_()
    for i, (t, grad) in enumerate(zip(params, grads)):
        scale = float(scales[i]) if rule == Rule.QUANTIZED else 0.0
        for start in range(0, t.numel(), CHUNK):
            part = _chunks(t, start)
            mi = _chunks(m[i], start) if m else None
            vi = _chunks(v[i], start) if v else None
            new, abs_u = apply_rule(rule, hyper, part.float(), _chunks(grad, start).float(), mi, vi, scale)
            if abs_u is not None and abs_u.numel():
                scales[i] = torch.maximum(scales[i], abs_u.max())
            part.copy_(new)
