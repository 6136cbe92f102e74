"""Triton kernel for the fused in-place update of ZO-RNG v1 (docs/rng.md).

    theta <- round_to_dtype(alpha * theta + sum_k coefs[k] * z(seed, streams[k], e))

in float32, terms added left to right, one rounding at the store.

Tile layout: a program owns GROUPS_PER_PROGRAM whole Philox blocks ("groups") of the
global index space, 128 elements each for Rademacher and 4 for Gaussian, as a
[GROUPS_PER_PROGRAM, GROUP_SIZE] tile whose rows are global groups. Philox runs on
the 1-D vector of the tile's group indices, once per group, and its words are
broadcast along the rows. The first and last tiles of a tensor overhang it and are
masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from . import tables

MAX_TERMS = 8
DISTRIBUTIONS = ("rademacher", "gaussian")
RADEMACHER_GROUP = 128  # elements served by one Philox call
GAUSSIAN_GROUP = 4
# Tiles of 2048 (Rademacher) and 1024 (Gaussian) elements: 16 and 8 per thread at 4
# warps. Larger tiles push K = 8 past ~190 registers (and Gaussian into spills), for no
# gain in a memory-bound op.
RADEMACHER_GROUPS_PER_PROGRAM = 16
GAUSSIAN_GROUPS_PER_PROGRAM = 256
LAUNCH_OPTIONS = {
    "num_warps": 4,
    # Keeps alpha * theta rounded before the first add, as the CUDA op does (__fmul_rn),
    # so Rademacher results match the other backends bit for bit.
    "enable_fp_fusion": False,
}
# Philox4x32-10 constants (tl.philox's); jit code reads only constexpr globals.
PHILOX_ROUNDS = tl.constexpr(10)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_words(seed, stream, block):
    """Philox4x32-10 under key seed of counters (block lo, block hi, stream lo, stream hi).

    Same rounds as tl.philox. The rounds run in a runtime `while` loop on purpose:
    Triton does not rematerialize a while loop into another layout, so Philox stays in
    the 1-D layout of `block` (each thread computes one group) instead of being
    recomputed by every thread that holds a piece of a row (16 to 32 threads per
    Rademacher row); the words reach the tile through one layout conversion in shared
    memory. LLVM still unrolls the loop.
    """
    seed = tl.cast(seed, tl.int64).to(tl.uint64, bitcast=True)
    stream = tl.cast(stream, tl.int64).to(tl.uint64, bitcast=True)
    zero = tl.zeros(block.shape, tl.uint32)
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = zero + stream.to(tl.uint32)
    c3 = zero + (stream >> 32).to(tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    round_index = 0
    while round_index < PHILOX_ROUNDS:
        old_c0, old_c2 = c0, c2
        c0 = tl.umulhi(PHILOX_ROUND_B, old_c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, old_c0) ^ c3 ^ k1
        c1 = tl.mul(PHILOX_ROUND_B, old_c2, sanitize_overflow=False)
        c3 = tl.mul(PHILOX_ROUND_A, old_c0, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_KEY_B, sanitize_overflow=False)
        round_index += 1
    return c0, c1, c2, c3


@triton.jit
def _add_term(acc, coef, stream, seed, block, col, GAUSSIAN: tl.constexpr):
    """acc + coef * z for the tile whose rows are the Philox blocks `block`."""
    w0, w1, w2, w3 = _philox_words(seed, stream, block)
    coef = tl.cast(coef, tl.float32)
    if GAUSSIAN:
        n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
        n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
        lane = col[None, :]
        z = tl.where(lane == 0, n0[:, None],
                     tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
        return acc + coef * z
    else:
        word_index = (col >> 5)[None, :]
        word = tl.where(word_index == 0, w0[:, None],
                        tl.where(word_index == 1, w1[:, None],
                                 tl.where(word_index == 2, w2[:, None], w3[:, None])))
        # coef * z with z = -1 iff bit (e & 31) is set: move that bit onto coef's sign bit.
        # Exact, like the product, and leaves no multiply for the compiler to fuse.
        sign = (word << (31 - (col & 31)).to(tl.uint32)[None, :]) & 0x80000000
        return acc + (coef.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)


@triton.jit
def _sum_terms(acc, seed, block, col,
               coef0, coef1, coef2, coef3, coef4, coef5, coef6, coef7,
               stream0, stream1, stream2, stream3, stream4, stream5, stream6, stream7,
               NUM_TERMS: tl.constexpr, GAUSSIAN: tl.constexpr):
    """acc + coef0 z_0 + ... in order, for the first NUM_TERMS terms; and the last term's stream."""
    acc = _add_term(acc, coef0, stream0, seed, block, col, GAUSSIAN)
    last = stream0
    if NUM_TERMS > 1:
        acc = _add_term(acc, coef1, stream1, seed, block, col, GAUSSIAN)
        last = stream1
    if NUM_TERMS > 2:
        acc = _add_term(acc, coef2, stream2, seed, block, col, GAUSSIAN)
        last = stream2
    if NUM_TERMS > 3:
        acc = _add_term(acc, coef3, stream3, seed, block, col, GAUSSIAN)
        last = stream3
    if NUM_TERMS > 4:
        acc = _add_term(acc, coef4, stream4, seed, block, col, GAUSSIAN)
        last = stream4
    if NUM_TERMS > 5:
        acc = _add_term(acc, coef5, stream5, seed, block, col, GAUSSIAN)
        last = stream5
    if NUM_TERMS > 6:
        acc = _add_term(acc, coef6, stream6, seed, block, col, GAUSSIAN)
        last = stream6
    if NUM_TERMS > 7:
        acc = _add_term(acc, coef7, stream7, seed, block, col, GAUSSIAN)
        last = stream7
    return acc, last


@triton.jit
def _tile(pid, numel, lead, first_group, GROUP_SIZE: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr):
    """Tile pid (int64) of one tensor: (local element offsets, mask, Philox blocks, columns).

    The tile's rows are GROUPS_PER_PROGRAM whole groups of the global index space; the first and
    last tiles overhang the tensor and are masked. Per-program scalars are int64; offsets inside
    the tile fit int32."""
    TILE: tl.constexpr = GROUP_SIZE * GROUPS_PER_PROGRAM
    tile_start = pid * TILE - lead  # local index of the tile's first element (negative for the first tile)
    row = tl.arange(0, GROUPS_PER_PROGRAM)
    col = tl.arange(0, GROUP_SIZE)
    pos = row[:, None] * GROUP_SIZE + col[None, :]
    first_valid = tl.maximum(-tile_start, 0).to(tl.int32)
    end_valid = tl.minimum(numel - tile_start, TILE).to(tl.int32)
    mask = (pos >= first_valid) & (pos < end_valid)
    block = tl.cast(first_group, tl.int64) + pid * GROUPS_PER_PROGRAM + row
    return tile_start + pos, mask, block, col


@triton.jit
def _rounding_bits(seed, stream, e):
    """The 16-bit rounding words (docs/rng.md) of the elements of global indices e (int64)."""
    w0, w1, w2, w3 = _philox_words(seed, stream, e >> 3)
    q = (e >> 1) & 3
    word = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
    return (word >> ((e & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def _round_stochastic(x, r, dtype: tl.constexpr):
    """float32 x stochastically rounded to dtype with rounding words r (csrc/zo_rng.h's
    bf16_stochastic and f16_stochastic, on the same bits)."""
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    if dtype == tl.bfloat16:
        t = (mag >> 16) + tl.where(r < (mag & 0xFFFF), 1, 0).to(tl.uint32)
        t = tl.where(mag > 0x7F7F0000, tl.where(mag >= 0x7F7F8000, 0x7F80, 0x7F7F).to(tl.uint32), t)
        bits = tl.where(mag > 0x7F800000, 0x7FC0, sign | t)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        a = mag.to(tl.float32, bitcast=True)
        exponent = (mag >> 23).to(tl.int32) - 127
        normal = exponent >= -14  # a normal float16: 13 of the 23 mantissa bits are dropped
        units = a * 16777216.0  # otherwise whole units of 2^-24 stay
        whole = tl.floor(units)
        t = tl.where(normal, ((exponent + 15).to(tl.uint32) << 10) | ((mag >> 13) & 0x3FF), whole.to(tl.uint32))
        f = tl.where(normal, ((mag & 0x1FFF) << 3).to(tl.float32), (units - whole) * 65536.0)
        t = t + tl.where(r.to(tl.float32) < f, 1, 0).to(tl.uint32)
        t = tl.where(a > 65504.0, tl.where(a >= 65520.0, 0x7C00, 0x7BFF).to(tl.uint32), t)
        bits = tl.where(a != a, 0x7E00, sign | t)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        return x


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 x rounded to nearest even in dtype."""
    if dtype == tl.bfloat16:
        # By hand because Triton's interpreter truncates float32 -> bfloat16; on a GPU
        # this is what cvt.rn.bf16.f32 computes. NaN would round to -0 or inf: keep it NaN.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _tensor_of(table_ptr, count, ALIGNED: tl.constexpr):
    """This program's tensor in a launch over many (kernels/tables.py): (column, tile within the
    tensor, numel, lead, first group), with the alignment the launcher checked made known."""
    column, pid = tables.find_tensor(table_ptr, count, tl.program_id(0).to(tl.int64))
    numel = tables.entry(table_ptr, count, tables.NUMEL, column)
    lead = tables.entry(table_ptr, count, tables.LEAD, column)
    if ALIGNED:
        numel = tl.multiple_of(numel, 16)
        lead = tl.multiple_of(lead, 16)
    return column, pid, numel, lead, tables.entry(table_ptr, count, tables.FIRST_GROUP, column)


@triton.jit(do_not_specialize=["count", "seed", "stream0", "stream1", "stream2", "stream3", "stream4", "stream5",
                               "stream6", "stream7"])
def _perturb_kernel(
    table_ptr,  # kernels/tables.py: the launch's tensors, param and out (param itself in place)
    count,
    alpha: tl.float32,
    seed: tl.int64,
    # The terms are scalar arguments, unused ones 0: NUM_TERMS drops the unused ones at compile
    # time. The int64 annotations and do_not_specialize keep one compiled kernel per
    # dtype/alignment/K/dist whatever the seed and stream values.
    coef0: tl.float32, coef1: tl.float32, coef2: tl.float32, coef3: tl.float32,
    coef4: tl.float32, coef5: tl.float32, coef6: tl.float32, coef7: tl.float32,
    stream0: tl.int64, stream1: tl.int64, stream2: tl.int64, stream3: tl.int64,
    stream4: tl.int64, stream5: tl.int64, stream6: tl.int64, stream7: tl.int64,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
):
    column, pid, numel, lead, first_group = _tensor_of(table_ptr, count, ALIGNED)
    param_ptr = tables.pointer(table_ptr, count, tables.PARAM, column, DTYPE, ALIGNED)
    out_ptr = tables.pointer(table_ptr, count, tables.OTHER, column, DTYPE, ALIGNED)
    offs, mask, block, col = _tile(pid, numel, lead, first_group, GROUP_SIZE, GROUPS_PER_PROGRAM)
    theta = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    acc, _ = _sum_terms(tl.cast(alpha, tl.float32) * theta, seed, block, col,
                        coef0, coef1, coef2, coef3, coef4, coef5, coef6, coef7,
                        stream0, stream1, stream2, stream3, stream4, stream5, stream6, stream7, NUM_TERMS, GAUSSIAN)
    tl.store(out_ptr + offs, _round_to(acc, DTYPE), mask=mask)


def term_args(coefs: list[float], streams: list[int]) -> list[float | int]:
    """The kernels' 16 scalar term arguments: the coefficients, then the streams, unused ones 0."""
    if not 1 <= len(coefs) <= MAX_TERMS or len(streams) != len(coefs):
        raise ValueError(f"need 1 to {MAX_TERMS} coefs and as many streams, got {len(coefs)} and {len(streams)}")
    padding = MAX_TERMS - len(coefs)
    return [float(c) for c in coefs] + [0.0] * padding + list(streams) + [0] * padding


def check_dist(dist: str) -> bool:
    """Whether dist is Gaussian; ValueError for an unknown one."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    return dist == "gaussian"


def perturb_(params: list[torch.Tensor], offsets: list[int], coefs: list[float], streams: list[int], seed: int,
             dist: str, alpha: float) -> None:
    """theta <- alpha * theta + sum_k coefs[k] * z(seed, streams[k], offset + i), in place
    (torch.ops.zounlearn.perturb_'s arguments).

    The caller has validated the tensors: contiguous float32/bfloat16/float16. seed and
    streams arrive as signed int64 (zounlearn.ops.validation.as_int64); the kernel reads
    their bits as uint64. One launch per dtype (two where some tensors are misaligned) over
    all the tensors (kernels/tables.py), on the current stream.
    """
    _perturb(params, params, offsets, coefs, streams, seed, dist, alpha)


def perturb_into(params: list[torch.Tensor], out: list[torch.Tensor], offsets: list[int], coefs: list[float],
                 streams: list[int], seed: int, dist: str, alpha: float) -> None:
    """out <- alpha * theta + sum_k coefs[k] * z: perturb_'s pass, written to other tensors."""
    _perturb(params, out, offsets, coefs, streams, seed, dist, alpha)


def _perturb(params, out, offsets, coefs, streams, seed, dist, alpha) -> None:
    gaussian = check_dist(dist)
    terms = term_args(coefs, streams)
    group_size = GAUSSIAN_GROUP if gaussian else RADEMACHER_GROUP
    groups_per_program = GAUSSIAN_GROUPS_PER_PROGRAM if gaussian else RADEMACHER_GROUPS_PER_PROGRAM
    pointers = [(p, o, None, None) for p, o in zip(params, out)]
    for launch in tables.launches(pointers, offsets, group_size, group_size * groups_per_program):
        _perturb_kernel[(launch.tiles,)](
            launch.table,
            launch.count,
            float(alpha),
            seed,
            *terms,
            DTYPE=launch.dtype,
            ALIGNED=launch.aligned,
            NUM_TERMS=len(coefs),
            GAUSSIAN=gaussian,
            GROUP_SIZE=group_size,
            GROUPS_PER_PROGRAM=groups_per_program,
            **LAUNCH_OPTIONS,
        )
    torch.autograd.graph.increment_version(out)
