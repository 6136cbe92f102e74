"""bitsandbytes' quantization as an attack, two ways, both on the CPU and on a GPU.

Loaded (`load_quantized`): the model saved and loaded again through transformers'
BitsAndBytesConfig, as the seed paper's code loads it (`load_in_4bit`): its Linear / Conv1D
layers become bitsandbytes' Linear4bit or Linear8bitLt (all but the LM head, which transformers
keeps: the same weights as `targets.py`'s), and the model computes with them.
- "bnb-fp4": 4-bit FP4, blocks of 64, no double quantization, bfloat16 compute: the seed
  paper's settings, the default 4-bit attack;
- "bnb-nf4": the same with NormalFloat4;
- "bnb-int8": LLM.int8 (`load_in_8bit`, outlier threshold 6.0: activations above it run in 16 bit).
Everything else keeps the model's dtype. On the CPU, bitsandbytes' repacked AVX512-BF16
inference path is turned off (it rounds each block's absmax to bfloat16), so the CPU computes
what a GPU does.

Functional (`quantize_4bit_weight`): one weight matrix through bitsandbytes.functional's
quantize_4bit then dequantize_4bit, fake-quantized in the model's dtype ("fp4-g64" in
quantize.py); the model then computes in its own dtype, so it isolates the rounding of the
weights from the bfloat16 compute. quantize.py's own nf4-g64 equals bitsandbytes' NF4 bit for bit.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

LOADED_SCHEMES: dict[str, dict[str, Any]] = {
    "bnb-fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": torch.bfloat16},
    "bnb-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": torch.bfloat16},
    "bnb-int8": {"load_in_8bit": True},
}


def bitsandbytes_unavailable() -> str | None:
    """Why bitsandbytes cannot run here, or None when it can."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'zounlearn[quantization]', or make)"
    return None


def load_quantized(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """The model saved to a temporary directory and loaded back through BitsAndBytesConfig with the
    scheme's settings, on the model's device, in eval mode; the model passed in is left as it is."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"scheme {scheme!r} reloads the model through transformers' BitsAndBytesConfig, and "
                         f"{type(model).__name__} is no transformers PreTrainedModel (a LoRA model: merge its "
                         f"adapters first, zounlearn.hf.lora.merged)")
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="zounlearn-bnb-") as directory:
        model.save_pretrained(directory)
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=BitsAndBytesConfig(**LOADED_SCHEMES[scheme]), dtype=model.dtype,
            device_map={"": device})
    for module in loaded.modules():
        # On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit for inference and rounds each
        # block's absmax to bfloat16 (and fails when in_features is not a multiple of 64): off, so that
        # the CPU computes what a GPU does, float32 absmax and bfloat16 compute.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return loaded.eval()


def quantize_4bit_weight(weight: torch.Tensor, channel_dim: int, quant_type: str, blocksize: int = 64
                         ) -> torch.Tensor:
    """bitsandbytes' 4-bit quantization of the (out, in) matrix, dequantized to the weight's dtype and layout."""
    import bitsandbytes.functional as bnb

    matrix = weight.detach().movedim(channel_dim, 0).contiguous()
    packed, state = bnb.quantize_4bit(matrix, blocksize=blocksize, quant_type=quant_type)
    return bnb.dequantize_4bit(packed, state).to(weight.dtype).movedim(0, channel_dim).contiguous()


__all__ = ["LOADED_SCHEMES", "bitsandbytes_unavailable", "load_quantized", "quantize_4bit_weight"]
