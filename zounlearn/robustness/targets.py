"""The weights that quantization and weight noise act on.

Weight-only LLM quantization (GPTQ, AWQ, bitsandbytes' load_in_4bit, llama.cpp's k-quants)
quantizes the matrices of the linear layers inside the transformer blocks and leaves the
token embeddings, the LM head, the norms and every bias in higher precision; the attacks
here do the same, so that they measure what a user who quantizes the model would get. The
blocks are `transformer_blocks(model)`; a linear layer is a `torch.nn.Linear` (weight
(out_features, in_features): output channels on dim 0) or a GPT-2-style
`transformers.pytorch_utils.Conv1D` (weight (in_features, out_features): output channels
on dim 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from ..unlearning.objectives import transformer_blocks


@dataclass(frozen=True)
class Target:
    """One weight matrix to quantize or perturb."""

    name: str                  # the parameter's qualified name in the model, e.g. "transformer.h.0.attn.c_attn.weight"
    weight: torch.nn.Parameter
    channel_dim: int           # the dimension of the output channels: 0 for Linear, 1 for Conv1D


def target_weights(model: torch.nn.Module) -> list[Target]:
    """The weights of the Linear and Conv1D layers inside the transformer blocks, in module order."""
    inside = {id(m) for block in transformer_blocks(model) for m in block.modules()}
    targets, seen = [], set()
    for name, module in model.named_modules():
        if id(module) not in inside:
            continue
        if isinstance(module, torch.nn.Linear):
            channel_dim = 0
        elif isinstance(module, Conv1D):
            channel_dim = 1
        else:
            continue
        if id(module.weight) in seen:
            continue  # a weight that two layers share is acted on once
        seen.add(id(module.weight))
        targets.append(Target(f"{name}.weight", module.weight, channel_dim))
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D layer inside its transformer blocks; "
                         f"quantization and weight noise need a model built from them (GPT-2, Llama, ...)")
    return targets
