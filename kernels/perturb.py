"""Triton kernel for the fused in-place update of ZO-RNG v1 (docs/rng.md).

theta <- round_to_dtype(alpha * theta + sum_k coef_k * z(seed, stream_k, e)), float32 math.

Each program owns GROUPS_PER_PROGRAM whole Philox blocks ("groups") of the global
index space: 128 elements per group for Rademacher, 4 for Gaussian. Its tile is
[GROUPS_PER_PROGRAM, GROUP_SIZE], rows aligned to global groups, so Philox runs on a
1-D [GROUPS_PER_PROGRAM] vector (once per group) and its words are broadcast along
the row. Elements of a row that fall outside the tensor are masked out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox_impl, uint_to_uniform_float

MAX_TERMS = 8
DISTRIBUTIONS = ("rademacher", "gaussian")
RADEMACHER_GROUP = 128  # elements per Philox call
GAUSSIAN_GROUP = 4
# ~4096 elements per program: enough bytes in flight per thread to hide latency.
RADEMACHER_GROUPS_PER_PROGRAM = 32
GAUSSIAN_GROUPS_PER_PROGRAM = 1024
NUM_WARPS = 4


@triton.jit
def _philox_words(seed, stream, block):
    """Philox4x32-10 with key seed and counters (block lo, block hi, stream lo, stream hi)."""
    seed = tl.cast(seed, tl.int64).to(tl.uint64, bitcast=True)
    stream = tl.cast(stream, tl.int64).to(tl.uint64, bitcast=True)
    zero = tl.zeros(block.shape, tl.uint32)
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = zero + stream.to(tl.uint32)
    c3 = zero + (stream >> 32).to(tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    rnd = 0
    while rnd < 10:
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = tl.mul(0xCD9E8D57, _c2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        rnd += 1
    return c0, c1, c2, c3


@triton.jit
def _add_term(acc, coef, stream, seed, block, col, GAUSSIAN: tl.constexpr):
    """acc + coef * z for the [groups, group size] tile whose rows are Philox blocks `block`."""
    w0, w1, w2, w3 = _philox_words(seed, stream, block)
    coef = tl.cast(coef, tl.float32)
    if GAUSSIAN:
        n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
        n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
        lane = col[None, :]
        z = tl.where(
            lane == 0, n0[:, None], tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None]))
        )
        return acc + coef * z
    else:
        word_index = (col >> 5)[None, :]
        word = tl.where(
            word_index == 0,
            w0[:, None],
            tl.where(word_index == 1, w1[:, None], tl.where(word_index == 2, w2[:, None], w3[:, None])),
        )
        bit = (word >> (col & 31).to(tl.uint32)[None, :]) & 1
        # coef * (+-1) is exact: select the sign instead of multiplying.
        return acc + tl.where(bit != 0, -coef, coef)


@triton.jit(do_not_specialize=["first_group", "seed", "stream0", "stream1", "stream2", "stream3", "stream4",
                               "stream5", "stream6", "stream7"])
def _perturb_kernel(
    param_ptr,
    numel,
    lead,  # (base offset) mod GROUP_SIZE: local index of the first element is -lead in the tile
    first_group: tl.int64,  # (base offset) // GROUP_SIZE
    alpha: tl.float32,
    seed: tl.int64,
    # Terms as scalar arguments (unused ones are 0): no device buffer, so no host-to-device
    # copy per call; NUM_TERMS prunes the unused ones at compile time.
    coef0: tl.float32, coef1: tl.float32, coef2: tl.float32, coef3: tl.float32,
    coef4: tl.float32, coef5: tl.float32, coef6: tl.float32, coef7: tl.float32,
    stream0: tl.int64, stream1: tl.int64, stream2: tl.int64, stream3: tl.int64,
    stream4: tl.int64, stream5: tl.int64, stream6: tl.int64, stream7: tl.int64,
    NUM_TERMS: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM).to(tl.int64)
    col = tl.arange(0, GROUP_SIZE)
    local = group[:, None] * GROUP_SIZE + col[None, :] - lead
    mask = (local >= 0) & (local < numel)
    theta = tl.load(param_ptr + local, mask=mask).to(tl.float32)
    block = tl.cast(first_group, tl.int64) + group

    acc = tl.cast(alpha, tl.float32) * theta
    acc = _add_term(acc, coef0, stream0, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 1:
        acc = _add_term(acc, coef1, stream1, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 2:
        acc = _add_term(acc, coef2, stream2, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 3:
        acc = _add_term(acc, coef3, stream3, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 4:
        acc = _add_term(acc, coef4, stream4, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 5:
        acc = _add_term(acc, coef5, stream5, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 6:
        acc = _add_term(acc, coef6, stream6, seed, block, col, GAUSSIAN)
    if NUM_TERMS > 7:
        acc = _add_term(acc, coef7, stream7, seed, block, col, GAUSSIAN)
    tl.store(param_ptr + local, acc.to(param_ptr.dtype.element_ty), mask=mask)


def _as_int64(value: int) -> int:
    """A 64-bit value (any Python int, taken mod 2^64) as the signed int64 with the same bits."""
    return (value + 2**63) % 2**64 - 2**63


def perturb_(
    params: list[torch.Tensor],
    offsets: list[int],
    alpha: float,
    coefs: list[float],
    streams: list[int],
    seed: int,
    dist: str,
) -> None:
    """theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], offset + i), in place.

    Tensors are contiguous float32/bfloat16/float16 on one device, validated by the caller.
    """
    gaussian = dist == "gaussian"
    group_size = GAUSSIAN_GROUP if gaussian else RADEMACHER_GROUP
    groups_per_program = GAUSSIAN_GROUPS_PER_PROGRAM if gaussian else RADEMACHER_GROUPS_PER_PROGRAM
    num_terms = len(coefs)
    padding = MAX_TERMS - num_terms
    term_args = [float(c) for c in coefs] + [0.0] * padding + [_as_int64(s) for s in streams] + [0] * padding
    for param, offset in zip(params, offsets):
        numel = param.numel()
        if numel == 0:
            continue
        lead = offset % group_size
        grid = (triton.cdiv(lead + numel, group_size * groups_per_program),)
        _perturb_kernel[grid](
            param,
            numel,
            lead,
            offset // group_size,
            float(alpha),
            _as_int64(seed),
            *term_args,
            NUM_TERMS=num_terms,
            GAUSSIAN=gaussian,
            GROUP_SIZE=group_size,
            GROUPS_PER_PROGRAM=groups_per_program,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
