"""Weight quantization as an attack: each scheme quantizes then dequantizes ("fake
quantization"), so the model runs in its own dtype with exactly the values a quantized
model would compute with.

Round-to-nearest (RTN), symmetric, `bits` bits: within a group, scale = absmax / qmax with
qmax = 2^(bits-1) - 1 (127 for int8, 7 for int4), q = clamp(round(w / scale), -qmax, qmax)
and the dequantized weight is q * scale. A group is a whole output channel (per-channel) or
`group_size` consecutive elements along the input dimension of one output channel
(group-wise, as GPTQ and AWQ group); when the input dimension is not a multiple of
group_size the last group of each channel is shorter. An all-zero group stays zero.
torch.round rounds halves to even.

NormalFloat4 (QLoRA, Dettmers et al. 2023), as bitsandbytes computes it (quantize_4bit /
dequantize_4bit, quant_type "nf4"), bit for bit on every shape and dtype (tested against it):
the (out, in) matrix is flattened row by row and cut into blocks of `group_size` (64)
consecutive elements, the last one shorter, so a block may cross output channels (it does
when the input dimension is not a multiple of 64: 64 x 1000, say); each element is scaled by
its block's absmax (times 1 / absmax in a full block, divided by absmax in the short last one,
as bitsandbytes does), clamped to [-1, 1], snapped to the nearest of the 16 NF4 levels (a
value exactly between two levels goes to the lower one) and multiplied back by absmax, in
float32. The RTN groups above never cross an output channel (GPTQ's and AWQ's groups).

Arithmetic is float32 whatever the weight's dtype; the result has the weight's dtype.
Which weights a model-level scheme quantizes: see `targets.py` (the Linear and Conv1D
weights inside the transformer blocks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..checks import check_int
from .bnb import LOADED_SCHEMES, bitsandbytes_unavailable, load_quantized, quantize_4bit_weight
from .targets import target_weights

# The NF4 table of QLoRA, as bitsandbytes has it (bitsandbytes/functional.py, get_4bit_type("nf4")).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None, channel_dim: int = 0
                 ) -> torch.Tensor:
    """Symmetric round-to-nearest quantization, dequantized (see the module docstring).

    weight: a 2-D floating tensor; channel_dim: the dimension of its output channels (0 for a
    Linear weight (out, in), 1 for a Conv1D weight (in, out)); group_size None: per channel.
    """
    check_int("bits", bits, 2, 8)
    groups, restore = _groups(weight, group_size, channel_dim)
    if groups is None:
        return weight.detach().clone()
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    # An all-zero group has scale 0: divide by 1 instead, its q is 0 and q * scale is 0, not NaN.
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0)).clamp(-qmax, qmax)
    return restore(q * scale)


def quantize_nf4(weight: torch.Tensor, group_size: int = 64, channel_dim: int = 0) -> torch.Tensor:
    """NormalFloat4 quantization of blocks of the flattened (out, in) matrix, dequantized: what
    bitsandbytes' quantize_4bit then dequantize_4bit give (see the module docstring)."""
    _groups(weight, None, channel_dim)  # the same checks as the RTN quantizer's
    check_int("group_size", group_size, 1)
    if weight.numel() == 0:
        return weight.detach().clone()
    matrix = weight.detach().movedim(channel_dim, 0)
    flat = matrix.reshape(-1).float()
    full = flat.numel() - flat.numel() % group_size
    blocks = flat[:full].reshape(-1, group_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))).reshape(-1)]
    if full < flat.numel():
        last_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        scaled.append(flat[full:] / last_absmax)
        absmax = torch.cat([absmax.reshape(-1), last_absmax.reshape(1)])
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    # The nearest level by the midpoints between levels: no (elements x 16) distance matrix.
    index = torch.bucketize(torch.cat(scaled).clamp(-1, 1), (levels[1:] + levels[:-1]) / 2)
    values = levels[index]
    out = torch.empty_like(flat)
    out[:full] = (values[:full].reshape(-1, group_size) * absmax.reshape(-1)[:full // group_size, None]).reshape(-1)
    out[full:] = values[full:] * absmax.reshape(-1)[-1]
    return out.reshape(matrix.shape).to(weight.dtype).movedim(0, channel_dim).contiguous()


def _groups(weight: torch.Tensor, group_size: int | None, channel_dim: int
            ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """The weight as float32 groups (out, n_groups, group_size), zero-padded, and the inverse map.

    None instead of groups for an empty weight. Padding with zeros leaves every absmax as it is.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        what = f"a {weight.dim()}-D {weight.dtype} tensor" if isinstance(weight, torch.Tensor) \
            else type(weight).__name__
        raise ValueError(f"quantization needs a 2-D floating-point weight matrix, got {what}")
    if channel_dim not in (0, 1):
        raise ValueError(f"channel_dim must be 0 (Linear weight, (out, in)) or 1 (Conv1D weight, (in, out)), "
                         f"got {channel_dim!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one group per output channel), "
                         f"got {group_size!r}")
    if weight.numel() == 0:
        return None, lambda x: x
    matrix = weight.detach().float().movedim(channel_dim, 0)  # (out, in)
    n_in = matrix.shape[1]
    size = n_in if group_size is None else group_size
    padded = F.pad(matrix, (0, -n_in % size)).contiguous()

    def restore(groups: torch.Tensor) -> torch.Tensor:
        return groups.reshape(matrix.shape[0], -1)[:, :n_in].movedim(0, channel_dim).to(weight.dtype).contiguous()

    return padded.reshape(matrix.shape[0], -1, size), restore


# ---------------------------------------------------------------------------------------
# Schemes and whole models


@dataclass(frozen=True)
class Scheme:
    """A quantizer: RTN integers or NF4, its bits and its group size (None: per output channel)."""

    format: Literal["int", "nf4"]
    bits: int
    group_size: int | None

    def __call__(self, weight: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
        if self.format == "nf4":
            return quantize_nf4(weight, self.group_size, channel_dim)
        return quantize_rtn(weight, self.bits, self.group_size, channel_dim)


QUANTIZATION_SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int", 8, None),
    "int8-g128": Scheme("int", 8, 128),
    "int8-g64": Scheme("int", 8, 64),
    "int4": Scheme("int", 4, None),
    "int4-g128": Scheme("int", 4, 128),
    "int4-g64": Scheme("int", 4, 64),
    "nf4-g64": Scheme("nf4", 4, 64),
}
# bitsandbytes' own (bnb.py): fp4-g64 through its functions, weights only; bnb-* the model loaded
# through BitsAndBytesConfig (bnb-fp4: the seed paper's settings). They run on the CPU and on a GPU.
BITSANDBYTES_SCHEMES = ("fp4-g64", *LOADED_SCHEMES)
# quantization_attack's default: every scheme of ours and the seed paper's 4-bit attack.
DEFAULT_SCHEMES = (*QUANTIZATION_SCHEMES, "bnb-fp4")


def check_scheme(scheme: str) -> None:
    """A ValueError that says what to use when `scheme` is unknown or cannot run here."""
    if scheme in BITSANDBYTES_SCHEMES:
        reason = bitsandbytes_unavailable()
        if reason:
            raise ValueError(f"scheme {scheme!r} cannot run: {reason}; or use 'nf4-g64', bitsandbytes' NF4 computed "
                             f"without it")
    elif scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of "
                         f"{', '.join([*QUANTIZATION_SCHEMES, *BITSANDBYTES_SCHEMES])}")


def quantize_model(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """A quantized copy of the model: its block Linear/Conv1D weights quantized then dequantized, or
    for the bnb-* schemes the model loaded through bitsandbytes (bnb.py).

    Embeddings, the LM head, norms and biases are left as they are (see `targets.py`); the
    model passed in is not modified.
    """
    check_scheme(scheme)
    target_weights(model)  # a model without quantizable layers fails before the copy
    if scheme in LOADED_SCHEMES:
        return load_quantized(model, scheme)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for target in target_weights(quantized):
            if scheme == "fp4-g64":
                values = quantize_4bit_weight(target.weight, target.channel_dim, "fp4")
            else:
                values = QUANTIZATION_SCHEMES[scheme](target.weight, target.channel_dim)
            target.weight.copy_(values)
    return quantized
