"""ZO-RNG v2 in pure PyTorch: the oracle every backend is tested against (docs/rng.md).

v2 keeps v1's directions bit for bit and adds the rounding words of stochastic rounding.

Unsigned 32-bit words live in int64 tensors; products are split into 16-bit
halves so that nothing overflows a signed 64-bit lane. Runs on any device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
PHILOX_ROUND_A = 0xD2511F53  # multiplies counter word 0
PHILOX_ROUND_B = 0xCD9E8D57  # multiplies counter word 2
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit words
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586
RADEMACHER_PER_BLOCK = 128
GAUSSIAN_PER_BLOCK = 4
ROUNDING_PER_BLOCK = 8  # 16 random bits per element
ROUNDING_STREAM_BASE = 1 << 63  # rounding streams are 2^63 + n; the optimizers draw directions below
# Lean state (bfloat16 m and v) rounds with the parameters' rounding stream with one bit flipped,
# so that the three roundings of an element are independent (docs/rng.md).
STATE_STREAM_BITS = {"m": 1 << 62, "v": 1 << 61}
DISTRIBUTIONS = ("rademacher", "gaussian")
ROUNDINGS = ("nearest", "stochastic")


def _mul_lo_hi(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * m) mod 2^32 and (x * m) >> 32 for 32-bit x (int64 tensor) and constant m."""
    p_lo = (x & 0xFFFF) * m
    mid = (x >> 16) * m + (p_lo >> 16)
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return lo, mid >> 16


def philox(seed: int, block: torch.Tensor, stream: int = 0) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (block lo, block hi, stream lo, stream hi) under key seed.

    block is an int64 tensor of non-negative block indices; returns four int64
    tensors holding the unsigned 32-bit output words.
    """
    seed &= MASK64
    stream &= MASK64
    k0, k1 = seed & MASK32, seed >> 32
    c0 = block & MASK32
    c1 = (block >> 32) & MASK32  # also right for blocks given as negative int64
    c2 = torch.full_like(block, stream & MASK32)
    c3 = torch.full_like(block, stream >> 32)
    for _ in range(PHILOX_ROUNDS):
        lo_b, hi_b = _mul_lo_hi(c2, PHILOX_ROUND_B)
        lo_a, hi_a = _mul_lo_hi(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: a 32-bit word to float32 in [0, 1)."""
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal, in float32."""
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=MIN_UNIFORM)))
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def _check(seed: int, stream: int, offset: int, numel: int, dist: str) -> None:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    for name, value in (("seed", seed), ("stream", stream), ("offset", offset), ("numel", numel)):
        if not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if offset < 0 or numel < 0 or offset + numel > 1 << 63:
        raise ValueError(f"elements [{offset}, {offset + numel}) must lie in [0, 2^63)")


def sample(
    seed: int,
    stream: int,
    offset: int,
    numel: int,
    dist: str = "rademacher",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """z for global elements offset .. offset + numel - 1, as a float32 vector."""
    _check(seed, stream, offset, numel, dist)
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    per_block = RADEMACHER_PER_BLOCK if dist == "rademacher" else GAUSSIAN_PER_BLOCK
    first, last = offset // per_block, (offset + numel - 1) // per_block
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox(seed, blocks, stream)
    if dist == "rademacher":
        shifts = torch.arange(32, dtype=torch.int64, device=device)
        bits = (torch.stack(words, dim=1).unsqueeze(-1) >> shifts) & 1  # [blocks, 4, 32]
        values = (1 - 2 * bits).to(torch.float32).reshape(-1)
    else:
        n0, n1 = box_muller(uniform(words[0]), uniform(words[1]))
        n2, n3 = box_muller(uniform(words[2]), uniform(words[3]))
        values = torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)
    start = offset - first * per_block
    return values[start : start + numel]


def rounding_bits(seed: int, stream: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-bit rounding words of global elements offset .. offset + numel - 1 (int64 tensor)."""
    _check(seed, stream, offset, numel, "rademacher")
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first, last = offset // ROUNDING_PER_BLOCK, (offset + numel - 1) // ROUNDING_PER_BLOCK
    words = torch.stack(philox(seed, torch.arange(first, last + 1, dtype=torch.int64, device=device), stream), 1)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2).reshape(-1)  # element e: word (e>>1)&3, half e&1
    start = offset - first * ROUNDING_PER_BLOCK
    return halves[start : start + numel]


def state_rounding_stream(stream: int, kind: str) -> int:
    """The rounding stream of state `kind` ("m" or "v") stored in bfloat16, for an update whose
    parameters round with `stream` (an int64 or uint64 value; the result has its sign)."""
    return stream ^ STATE_STREAM_BITS[kind]


_HALF_MAX = {torch.bfloat16: torch.finfo(torch.bfloat16).max, torch.float16: torch.finfo(torch.float16).max}


def _step_up(t: torch.Tensor) -> torch.Tensor:
    """The next value of t's dtype away from zero (t >= 0), by its bit pattern."""
    return (t.view(torch.int16) + 1).view(t.dtype)


def round_stochastic(x: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 x to dtype (bfloat16 or float16), rounded away from zero with probability f / 2^16,
    f = (|x| - t) / (u - t) * 2^16 for t = |x| rounded toward zero and u the next value up: the
    neighbour above wins iff bits < f. NaN stays NaN; beyond the largest finite value, nearest."""
    a = x.abs()
    t = a.to(dtype)  # nearest, then one step toward zero where that went up
    t = torch.where(t.float() > a, (t.view(torch.int16) - 1).view(dtype), t)
    lo, hi = t.float(), _step_up(t).float()
    f = (a - lo) / (hi - lo) * 65536.0
    f = torch.where(hi.isinf(), torch.zeros_like(f), f)  # t is the largest finite value and a == t
    magnitude = torch.where(bits.float() < f, _step_up(t), t)
    magnitude = torch.where(a > _HALF_MAX[dtype], a.to(dtype), magnitude)
    y = torch.where(x < 0, -magnitude, magnitude)
    y = torch.where(torch.signbit(x) & (magnitude == 0), -magnitude, y)  # -0.0 keeps its sign
    return torch.where(x.isnan(), torch.full_like(y, float("nan")), y)
