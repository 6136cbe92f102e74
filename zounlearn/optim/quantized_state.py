"""8-bit block-wise dynamic quantization of optimizer state, bitsandbytes' scheme in pure PyTorch.

A tensor is cut into blocks of 256 elements (the last one may be shorter); each block keeps its
absmax in float32 and each element the uint8 index of the nearest value of the dynamic map
(bitsandbytes.functional.create_dynamic_map) to element / absmax. The signed map holds m, the
unsigned one v (>= 0), as bitsandbytes' 8-bit Adam does; tensors under 4096 elements are not
quantized (bitsandbytes' min_8bit_size).

The code is the nearest map value (the lower one on a tie), as bitsandbytes' generic CPU path
computes it (the one its quantize_blockwise op takes for a float64 tensor): tests/test_int8_state.py
checks codes, absmax and the dequantized values bit for bit against it. bitsandbytes' float32 CPU
kernel looks codes up with an approximate search that is not nearest far below a block's absmax
(4e-9 of it gets the code of 2.1e-5), so it is not the oracle.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256  # elements per absmax
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 state
_CHUNK = 1 << 20  # elements (a multiple of BLOCK) per piece of work: bounds the temporaries to a few MiB


def quantizes(p: torch.Tensor) -> bool:
    """Whether p's state is quantized (else it stays float32)."""
    return p.numel() >= MIN_8BIT_SIZE


def blocks(numel: int) -> int:
    """The absmax values of a tensor of numel elements."""
    return -(-numel // BLOCK)


@functools.cache
def dynamic_map(signed: bool, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed) (7 exponent bits, 8 bits), its arithmetic step by
    step so that the 256 float32 values are the same bits: sorted ascending."""
    data: list[float] = []
    for i in range(7):  # the decade 10^(i-6), with 2^i (signed) or 2^(i+1) fraction values in it
        items = 2 ** (i + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@functools.cache
def _thresholds(signed: bool, device: torch.device) -> torch.Tensor:
    """t_i, the least float32 n with |n - code[i+1]| < |n - code[i]| in float32 arithmetic, for
    each pair of neighbours. float32 subtraction is monotone, so that inequality holds from t_i
    on, and the nearest value's index (the lower one on a tie) is the count of t_i <= n: one
    search instead of a search and two comparisons."""
    code = dynamic_map(signed, device)
    lower, upper = code[:-1], code[1:]
    nearer = lambda n: (n - upper).abs() < (n - lower).abs()  # noqa: E731
    t = ((lower.double() + upper.double()) / 2).float()  # within an ulp or two of the crossing
    for _ in range(8):  # (each step moves every t_i one ulp towards its crossing)
        down = torch.nextafter(t, lower)
        t = torch.where(nearer(down), down, torch.where(nearer(t), t, torch.nextafter(t, upper)))
    assert bool(nearer(t).all() and not nearer(torch.nextafter(t, lower)).any()), "thresholds not converged"
    return t


def quantize_(x: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Write x's (float32) codes (uint8, x's shape) and per-block absmax (float32, blocks(x.numel()))
    on the signed or the unsigned map.

    As bitsandbytes: absmax = max |x| of the block, n = x (1 / absmax) clamped to [-1, 1], the
    index of the nearest map value (the lower one on a tie); an all-zero block (n = NaN) gets 0."""
    flat, out, thresholds = x.reshape(-1), codes.view(-1), _thresholds(signed, x.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        n = len(part)
        padded = torch.nn.functional.pad(part, (0, -n % BLOCK)).view(-1, BLOCK)  # zeros leave absmax as it is
        amax = padded.abs().amax(dim=1)
        normed = (padded * (1 / amax)[:, None]).clamp_(-1, 1).view(-1)[:n]
        i = torch.searchsorted(thresholds, normed, right=True, out_int32=True)
        out[start:start + n] = i.masked_fill_(normed.isnan(), 0).to(torch.uint8)
        absmax[start // BLOCK:start // BLOCK + len(amax)] = amax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of codes on the signed or unsigned map (map[codes] times the block's
    absmax), in codes' shape."""
    code = dynamic_map(signed, codes.device)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    flat, src = out.view(-1), codes.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        values = code[src[start:start + _CHUNK].int()]
        scale = absmax[start // BLOCK:start // BLOCK + blocks(len(values))].repeat_interleave(BLOCK)[:len(values)]
        flat[start:start + len(values)] = values * scale
    return out


__all__ = ["BLOCK", "MIN_8BIT_SIZE", "blocks", "dequantize", "dynamic_map", "quantize_", "quantizes"]
