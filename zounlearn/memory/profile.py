"""What a causal LM's architecture costs, per parameter and per token, from its Hugging Face config.

`profile(config, dtype)` builds the model on the meta device (no memory, no weights) with one
and with two decoder layers, runs a forward pass with a loss under autograd's saved-tensor
hooks, and counts the bytes of the distinct storages saved for backward that are not
parameters. The difference of the two is one layer's; the rest is the embeddings', the final
norm's, the head's and the loss's. Everything it saves grows with the tokens (batch x length),
so the counts are per token. This is the model's own Hugging Face code, whatever its
architecture, in the dtype it will run in (a bfloat16 model's float32 norms and loss included).

On the meta device, scaled_dot_product_attention takes its math path, which saves the T x T
attention probabilities (and, for half types, float32 copies of q, k and v); the fused kernels
that run on CUDA and on the CPU (flash, memory efficient) save q, k, v, the output and a float32
log-sum-exp per row instead. The trace counts the latter, so it describes the fused path.

SIZES are stand-ins for models by size: GPT-2's three sizes and Llama-2-7B, 13B and 70B and
Llama-3.2-1B (their published configs' shapes).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from ..errors import UsageError

PROFILE_TOKENS = 64  # the traced sequence: one sequence of this many tokens

_LLAMA = {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
SIZES: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2"},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
           "head_dim": 64},
    "7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
}


@dataclass(frozen=True)
class Profile:
    """Per parameter counts in elements, saved activations in bytes per token."""

    name: str
    dtype: torch.dtype
    layers: int
    hidden: int
    vocab: int
    tied: bool  # the input embedding is the output head: its gradient comes in twice
    layer_params: int  # one decoder layer's parameters
    other_params: int  # embeddings, final norm and head
    largest_params: int  # the largest parameter tensor
    layer_largest_params: int  # the largest parameter tensor of a layer
    layer_saved: float  # bytes saved for backward by one layer, per token
    other_saved: float  # by the rest (the head, the loss's float32 log-softmax, embeddings), per token
    layer_largest: float  # the largest tensor one layer saves, per token

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.other_params

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def load_config(model: str) -> Any:
    """A Hugging Face config: a size of SIZES, or a model directory or config file, or a hub name (cached)."""
    from transformers import AutoConfig

    if model.lower() in SIZES:
        spec = dict(SIZES[model.lower()])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read a model config from {model!r} ({' '.join(str(err).split())[:200]}); give a "
                         f"model directory, a config.json, or a size: {', '.join(SIZES)}") from None


_PROFILES: dict[tuple[str, torch.dtype], Profile] = {}


def profile(config: Any, dtype: torch.dtype, name: str | None = None) -> Profile:
    """The architecture's profile in dtype (see the module docstring); cached per config and dtype."""
    key = (config.to_json_string(use_diff=False), dtype)
    if key not in _PROFILES:
        _PROFILES[key] = _profile(config, dtype, name or getattr(config, "_name_or_path", "") or config.model_type)
    return _PROFILES[key]


def _profile(config: Any, dtype: torch.dtype, name: str) -> Profile:
    one, two = (_trace(_with_layers(config, n), dtype) for n in (1, 2))
    layer_params = two["params"] - one["params"]
    layer_saved = (two["saved"] - one["saved"]) / PROFILE_TOKENS
    layers = config.num_hidden_layers
    return Profile(name=name, dtype=dtype, layers=layers, hidden=config.hidden_size, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), layer_params=layer_params,
                   other_params=one["params"] - layer_params, largest_params=one["largest"],
                   layer_largest_params=max(n for name, n in two["shapes"].items() if name not in one["shapes"]),
                   layer_saved=layer_saved, other_saved=one["saved"] / PROFILE_TOKENS - layer_saved,
                   layer_largest=one["layer_largest"] / PROFILE_TOKENS)


def _with_layers(config: Any, layers: int) -> Any:
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


def _trace(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    params = list(model.parameters())
    param_storages = {p.untyped_storage()._cdata for p in params}
    saved: dict[int, float] = {}
    largest = [0.0]
    keep: list[Any] = []  # the storages stay alive, so that no id is reused during the trace
    inside = [False]

    def count(t: torch.Tensor, nbytes: float | None = None) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in param_storages or key in saved:
            return
        keep.append(storage)
        saved[key] = float(storage.nbytes()) if nbytes is None else nbytes
        if t.shape and t.shape[-1] != config.vocab_size:  # not the head's logits or log-probabilities
            largest[0] = max(largest[0], saved[key])

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not inside[0]:
            count(t)
        return t

    fused = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        """The math path runs; what the fused kernels save is counted: q, k, v, the output, the log-sum-exp."""
        inside[0] = True
        try:
            out = fused(query, key, value, *args, **kwargs)
        finally:
            inside[0] = False
        if torch.is_grad_enabled():
            for t in (query, key, value, out):
                count(t)
            keep.append(lse := torch.empty(query.shape[:-1], dtype=torch.float32, device="meta"))
            count(lse)
        return out

    tokens = torch.zeros((1, PROFILE_TOKENS), dtype=torch.long, device="meta")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", attention))
        masks = sys.modules.get("transformers.masking_utils")
        if hasattr(masks, "find_packed_sequence_indices"):  # it reads values, which meta tensors have none of
            stack.enter_context(mock.patch.object(masks, "find_packed_sequence_indices", lambda *a, **k: None))
        model(input_ids=tokens, labels=tokens, use_cache=False)
    return {"params": sum(p.numel() for p in params), "largest": max(p.numel() for p in params),
            "saved": sum(saved.values()), "layer_largest": largest[0],
            "shapes": {name: p.numel() for name, p in model.named_parameters()}}


def describe(p: Profile) -> str:
    return (f"{p.name}: {p.params / 1e9:.3g} B parameters in {p.layers} layers, hidden {p.hidden}, vocab {p.vocab}"
            f"{', tied embeddings' if p.tied else ''}; saves {p.layer_saved / 1024:.1f} KiB per token per layer "
            f"({p.layer_saved / max(p.hidden, 1):.1f} bytes x hidden) and {p.other_saved / 2**20:.2f} MiB per token "
            f"elsewhere ({str(p.dtype)[6:]})")


__all__ = ["PROFILE_TOKENS", "Profile", "SIZES", "describe", "load_config", "profile"]
