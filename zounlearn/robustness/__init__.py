"""Robustness of unlearning: attacks that try to bring forgotten knowledge back, and
weight-space diagnostics. Each works on any Hugging Face causal LM, on a copy: the model
passed in is left bit-identical.

Attacks (attacks.py; each returns `evaluate`'s metrics, see `zounlearn.unlearning.evaluation`):
- `relearning_attack`: AdamW fine-tuning on k forget examples for n steps (a grid: the
  relearning curve); measures on the held-out forget portion (the forget examples not
  relearned: does relearning some facts bring the others back?) and on the whole data.
- `retain_finetune_attack`: the same on k retain examples only: does benign fine-tuning
  bring the forgotten knowledge back?
- `quantization_attack`: round-to-nearest int8/int4 per channel and group-wise (128, 64) and
  NormalFloat4, quantized then dequantized (quantize.py), and bitsandbytes' FP4, NF4 and
  LLM.int8 through its functions and through transformers' BitsAndBytesConfig (bnb.py; bnb-fp4
  is the seed paper's load_in_4bit): does low precision undo the small weight changes of unlearning?
- `noise_attack`: Gaussian weight noise relative to each tensor's RMS, averaged over draws
  (noise.py): the control for quantization, a perturbation of the same size without rounding.

Diagnostics (diagnostics.py):
- `weight_distance`: the L2 distance between original and unlearned weights, in total,
  relative to the original's norm and per transformer block: how far unlearning moved.
- `mode_connectivity`: forget and retain metrics along (1 - t) theta_original +
  t theta_unlearned and the barrier heights: whether the unlearned model stays in the
  original's basin.
"""

from .attacks import (
                      RelearningSplit,
                      noise_attack,
                      quantization_attack,
                      relearning_attack,
                      relearning_split,
                      retain_finetune_attack,
)
from .bnb import LOADED_SCHEMES, bitsandbytes_unavailable, load_quantized, quantize_4bit_weight
from .diagnostics import barrier_height, interpolate, mode_connectivity, weight_distance
from .noise import add_weight_noise, add_weight_noise_
from .quantize import (
                      BITSANDBYTES_SCHEMES,
                      DEFAULT_SCHEMES,
                      NF4_LEVELS,
                      QUANTIZATION_SCHEMES,
                      Scheme,
                      quantize_model,
                      quantize_nf4,
                      quantize_rtn,
)
from .targets import Target, target_weights

__all__ = [
    "BITSANDBYTES_SCHEMES", "DEFAULT_SCHEMES", "LOADED_SCHEMES", "NF4_LEVELS", "QUANTIZATION_SCHEMES",
    "RelearningSplit", "Scheme", "Target", "add_weight_noise", "add_weight_noise_", "barrier_height",
    "bitsandbytes_unavailable", "interpolate", "load_quantized", "mode_connectivity", "noise_attack",
    "quantization_attack", "quantize_4bit_weight", "quantize_model", "quantize_nf4", "quantize_rtn",
    "relearning_attack", "relearning_split", "retain_finetune_attack", "target_weights", "weight_distance",
]
