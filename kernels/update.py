"""Triton kernel for the fused optimizer updates (torch.ops.zounlearn.zo_update_ and grad_update_):

    zo_update_:   theta <- rule(theta + restore * z_last, g = sum_k coefs[k] * z_k, m, v)
    grad_update_: theta <- rule(theta, g = grad, m, v)

One kernel serves both (NUM_TERMS = 0 reads g from the gradient), on the tile layout and
random stream of kernels/perturb.py. The rules are csrc/update_rules.h one float32
operation at a time in its order: no FMA (enable_fp_fusion=False) and IEEE division and
square root (div_rn, sqrt_rn; on a GPU `/` and tl.sqrt are approximate), so every backend
computes the same bits. theta is rounded once, at the store; bfloat16 (lean) state m, v is
loaded to float32 and stored back rounded with its own streams (zounlearn.rng.state_rounding_stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zounlearn.ops.rules import Hyper, Rule
from zounlearn.rng import STATE_STREAM_BITS

from . import tables
from .perturb import (
    GAUSSIAN_GROUP,
    LAUNCH_OPTIONS,
    MAX_TERMS,
    RADEMACHER_GROUP,
    _add_term,
    _round_stochastic,
    _round_to,
    _rounding_bits,
    _sum_terms,
    _tensor_of,
    _tile,
    check_dist,
    term_args,
)

# The rules' constexpr numbers, from the registry (jit code reads only constexpr globals).
SGD, SIGN, ADAM, ADAZO, SIGN_ADAM, ADAM_MOMENTS, QUANTIZED, SOPHIA, DESCENT = (
    tl.constexpr(Rule[name].index)
    for name in ("SGD", "SIGN", "ADAM", "ADAZO", "SIGN_ADAM", "ADAM_MOMENTS", "QUANTIZED", "SOPHIA", "DESCENT")
)
M_STREAM_BIT, V_STREAM_BIT = tl.constexpr(STATE_STREAM_BITS["m"]), tl.constexpr(STATE_STREAM_BITS["v"])
# Half perturb_'s tiles (8 and 4 elements per thread at 4 warps): with m and v in flight too,
# Adam at K = 8 took all 255 registers on sm_90 and spilled; now ~100 and ~150.
RADEMACHER_GROUPS_PER_PROGRAM = 8
GAUSSIAN_GROUPS_PER_PROGRAM = 128


@triton.jit
def _sign(x):
    """torch.sign for finite x; NaN gives 0 (sign_of of update_rules.h)."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _adam_direction(m, v, bias_correction1, sqrt_bias_correction2, eps):
    return tl.math.div_rn(tl.math.div_rn(m, bias_correction1),
                          tl.math.div_rn(tl.math.sqrt_rn(v), sqrt_bias_correction2) + eps)


@triton.jit
def _quantize(u, scale, levels):
    """Q(u; levels) of update_rules.h: sign for levels 0, else levels steps of scale (0 if scale is 0)."""
    # Branches on the scalars, not tl.where: no division by a zero levels or scale is even computed.
    if levels == 0:
        q = _sign(u)
    elif scale > 0:
        # (x + 1.5 * 2^23) - 1.5 * 2^23 rounds |x| < 2^22 half to even; nothing folds it without fast-math.
        steps = (tl.math.div_rn(u, scale) * levels + 12582912.0) - 12582912.0
        q = tl.math.div_rn(steps, levels) * scale
    else:
        q = tl.zeros_like(u)
    return q


@triton.jit
def _state_out(x, dtype: tl.constexpr, seed, stream, block, col, STOCHASTIC: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """float32 state x as a dtype tensor stores it: as it is, or rounded to bfloat16 (lean state)
    to nearest or with stream's rounding words."""
    if dtype == tl.float32:
        out = x
    elif STOCHASTIC:
        out = _round_stochastic(x, _rounding_bits(seed, stream, block[:, None] * GROUP_SIZE + col[None, :]), dtype)
    else:
        out = _round_to(x, dtype)
    return out


@triton.jit(do_not_specialize=["count", "seed", "stream0", "stream1", "stream2", "stream3", "stream4", "stream5",
                               "stream6", "stream7", "rounding_stream"])
def _update_kernel(
    table_ptr,  # kernels/tables.py: the launch's tensors, param, grad (read when NUM_TERMS == 0), m and v
    count,  # (float32 or bfloat16 state, read when HAS_M / HAS_V)
    scales_ptr,  # float32, one per tensor: written by ADAM_MOMENTS (zeroed beforehand), read by QUANTIZED
    seed: tl.int64,
    coef0: tl.float32, coef1: tl.float32, coef2: tl.float32, coef3: tl.float32,
    coef4: tl.float32, coef5: tl.float32, coef6: tl.float32, coef7: tl.float32,
    stream0: tl.int64, stream1: tl.int64, stream2: tl.int64, stream3: tl.int64,
    stream4: tl.int64, stream5: tl.int64, stream6: tl.int64, stream7: tl.int64,
    restore: tl.float32,
    rounding_stream: tl.int64,
    # zounlearn.ops.rules.Hyper's fields, passed by name
    lr: tl.float32, decay: tl.float32, weight_decay: tl.float32, beta1: tl.float32,
    one_minus_beta1: tl.float32, beta2: tl.float32, one_minus_beta2: tl.float32, eps: tl.float32,
    bias_correction1: tl.float32, sqrt_bias_correction2: tl.float32, levels: tl.float32, rho: tl.float32,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    RULE: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_V: tl.constexpr,
    WRITES_M: tl.constexpr,
    WRITES_V: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # stochastic rounding of theta (a half-precision parameter)
    STATE_DTYPE: tl.constexpr,  # m's and v's: float32, or bfloat16 (lean state)
    STOCHASTIC_STATE: tl.constexpr,  # rounding="stochastic": of bfloat16 state too
    GROUP_SIZE: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
):
    column, pid, numel, lead, first_group = _tensor_of(table_ptr, count, ALIGNED)
    param_ptr = tables.pointer(table_ptr, count, tables.PARAM, column, DTYPE, ALIGNED)
    grad_ptr = tables.pointer(table_ptr, count, tables.OTHER, column, DTYPE, ALIGNED)
    m_ptr = tables.pointer(table_ptr, count, tables.M, column, STATE_DTYPE, ALIGNED)
    v_ptr = tables.pointer(table_ptr, count, tables.V, column, STATE_DTYPE, ALIGNED)
    index = tables.entry(table_ptr, count, tables.INDEX, column)  # the tensor's slot in scales
    offs, mask, block, col = _tile(pid, numel, lead, first_group, GROUP_SIZE, GROUPS_PER_PROGRAM)
    theta = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    # The interpreter ignores the float32 annotations (Python floats stay float64): cast once here.
    lr = tl.cast(lr, tl.float32)
    decay = tl.cast(decay, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    bias_correction1 = tl.cast(bias_correction1, tl.float32)
    sqrt_bias_correction2 = tl.cast(sqrt_bias_correction2, tl.float32)
    levels = tl.cast(levels, tl.float32)
    rho = tl.cast(rho, tl.float32)

    if NUM_TERMS == 0:
        if RULE != QUANTIZED:  # which reads the moments pass's m and v, not the gradient
            g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        else:
            g = tl.zeros(theta.shape, tl.float32)
    else:
        g, last = _sum_terms(tl.zeros(theta.shape, tl.float32), seed, block, col,
                             coef0, coef1, coef2, coef3, coef4, coef5, coef6, coef7,
                             stream0, stream1, stream2, stream3, stream4, stream5, stream6, stream7,
                             NUM_TERMS, GAUSSIAN)
        # z_last again: LLVM folds the repeated Philox into the last term's (tests/test_triton_kernels.py).
        theta = _add_term(theta, restore, last, seed, block, col, GAUSSIAN)
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    if HAS_V:
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)

    # apply_rule of csrc/update_rules.h
    if RULE == SGD:
        g = g + weight_decay * theta
        m = beta1 * m + g
        theta = theta - lr * m
    elif RULE == SIGN:
        theta = decay * theta - lr * _sign(g)
    elif RULE == DESCENT:
        theta = decay * theta - lr * g
    elif RULE == ADAZO:
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * (m * m)
        theta = decay * theta - lr * tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)
    elif RULE == SIGN_ADAM:
        m = beta1 * m + one_minus_beta1 * g
        theta = decay * theta - lr * _sign(m)
    elif RULE == SOPHIA:
        m = beta1 * m + one_minus_beta1 * g
        ratio = tl.math.div_rn(m, rho * v + eps)
        theta = decay * theta - lr * tl.where(ratio < -1.0, -1.0, tl.where(ratio > 1.0, 1.0, ratio))  # NaN stays
    else:  # Adam's direction u: ADAM, ADAM_MOMENTS, QUANTIZED (which reads the moments pass's m, v)
        if RULE != QUANTIZED:
            m = beta1 * m + one_minus_beta1 * g
            v = beta2 * v + one_minus_beta2 * (g * g)
        u = _adam_direction(m, v, bias_correction1, sqrt_bias_correction2, eps)
        if RULE == ADAM:
            theta = decay * theta - lr * u
        elif RULE == QUANTIZED:
            theta = decay * theta - lr * _quantize(u, tl.load(scales_ptr + index), levels)
        else:
            # |u| >= 0 orders as its int32 bits, NaN above inf, so it wins as in torch.max.
            bits = tl.where(mask, tl.abs(u), 0.0).to(tl.int32, bitcast=True)
            tl.atomic_max(scales_ptr.to(tl.pointer_type(tl.int32)) + index, tl.max(bits), sem="relaxed")

    if RULE != ADAM_MOMENTS:
        if STOCHASTIC:
            e = block[:, None] * GROUP_SIZE + col[None, :]  # the elements' global indices
            bits = _rounding_bits(seed, rounding_stream, e)
            tl.store(param_ptr + offs, _round_stochastic(theta, bits, DTYPE), mask=mask)
        else:
            tl.store(param_ptr + offs, _round_to(theta, DTYPE), mask=mask)
    # The interpreter may hand a small stream over as int32: widen it before the high bit goes in.
    m_stream = tl.cast(rounding_stream, tl.int64) ^ M_STREAM_BIT
    v_stream = tl.cast(rounding_stream, tl.int64) ^ V_STREAM_BIT
    if WRITES_M:
        tl.store(m_ptr + offs, _state_out(m, STATE_DTYPE, seed, m_stream, block, col,
                                          STOCHASTIC_STATE, GROUP_SIZE), mask=mask)
    if WRITES_V:  # not SOPHIA, whose h is read only
        tl.store(v_ptr + offs, _state_out(v, STATE_DTYPE, seed, v_stream, block, col,
                                          STOCHASTIC_STATE, GROUP_SIZE), mask=mask)


def _launch(params, grads, m, v, scales, offsets, seed, terms, restore, rule: Rule, rounding: str,
            rounding_stream: int, hyper, num_terms, gaussian) -> None:
    """All tensors, one launch per dtype and alignment (kernels/tables.py); grads, m and v are
    empty where unused, scales None."""
    group_size = GAUSSIAN_GROUP if gaussian else RADEMACHER_GROUP
    groups_per_program = GAUSSIAN_GROUPS_PER_PROGRAM if gaussian else RADEMACHER_GROUPS_PER_PROGRAM
    pointers = [(p, grads[i] if grads else None, m[i] if m else None, v[i] if v else None)
                for i, p in enumerate(params)]
    for launch in tables.launches(pointers, offsets, group_size, group_size * groups_per_program):
        _update_kernel[(launch.tiles,)](
            launch.table, launch.count, launch.table if scales is None else scales, seed, *terms, float(restore),
            rounding_stream, **hyper._asdict(),
            DTYPE=launch.dtype,
            ALIGNED=launch.aligned,
            RULE=rule.index,
            NUM_TERMS=num_terms,
            GAUSSIAN=gaussian,
            HAS_M=bool(m),
            HAS_V=bool(v),
            WRITES_M=rule.info.writes_m,
            WRITES_V=rule.info.writes_v,
            STOCHASTIC=rounding == "stochastic" and launch.dtype != tl.float32,
            STATE_DTYPE=tables.TRITON_DTYPES[m[0].dtype] if m else tl.float32,
            STOCHASTIC_STATE=rounding == "stochastic",
            GROUP_SIZE=group_size,
            GROUPS_PER_PROGRAM=groups_per_program,
            **LAUNCH_OPTIONS,
        )


def _rule(name: str, zeroth_order: bool) -> Rule:
    rule = Rule(name)
    if zeroth_order and not rule.info.zeroth_order:
        raise ValueError(f"rule {name!r} is first-order only")
    return rule


def zo_update_(params: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], offsets: list[int],
               coefs: list[float], streams: list[int], seed: int, dist: str, restore: float, rule: str,
               rounding: str, rounding_stream: int, *hyper: float) -> None:
    """g = sum_k coefs[k] * z_k, theta += restore * z_last, then `rule`, in one pass per tensor
    (torch.ops.zounlearn.zo_update_'s arguments, validated by the caller: m and v are given,
    float32 or bfloat16, exactly when the rule uses them, else empty). One launch per dtype
    and alignment over all the tensors."""
    gaussian = check_dist(dist)
    terms = term_args(coefs, streams)
    rule, h = _rule(rule, True), Hyper(*hyper)
    _launch(params, [], m, v, None, offsets, seed, terms, restore, rule, rounding, rounding_stream, h, len(coefs),
            gaussian)
    torch.autograd.graph.increment_version([*params, *m, *v])


def grad_update_(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                 scales: torch.Tensor | None, offsets: list[int], seed: int, rule: str, rounding: str,
                 rounding_stream: int, *hyper: float) -> None:
    """`rule` with each tensor's gradient (grads[i] has params[i]'s dtype), in one pass
    (torch.ops.zounlearn.grad_update_'s arguments). scales: float32, one per tensor, for
    ADAM_MOMENTS (overwritten with max |u|, 0 for an empty tensor) and QUANTIZED (read)."""
    rule, h = _rule(rule, False), Hyper(*hyper)
    if rule.info.scales == "write":
        scales.zero_()  # the kernel max-es into it
    no_terms = term_args([0.0] * MAX_TERMS, [0] * MAX_TERMS)
    _launch(params, grads, m, v, scales, offsets, seed, no_terms, 0.0, rule, rounding, rounding_stream, h, 0, False)
    torch.autograd.graph.increment_version([*params, *m, *v, *([scales] if scales is not None else [])])
