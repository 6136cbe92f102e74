"""What the measurements run on: the parameter lists of real models (shapes only, random values)
and small Hugging Face causal LMs built from a config (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError

Shape = tuple[int, ...]


def _llama(vocab: int, hidden: int, inner: int, layers: int, kv: int | None = None) -> tuple[list, list, list]:
    kv = hidden if kv is None else kv
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
             (inner, hidden), (inner, hidden), (hidden, inner),  # gate, up, down
             (hidden,), (hidden,)]  # the two RMS norms
    return [(vocab, hidden)], [layer] * layers, [(hidden,), (vocab, hidden)]  # embedding; final norm, lm_head


def _gpt2(vocab: int, positions: int, d: int, layers: int) -> tuple[list, list, list]:
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)], [layer] * layers, [(d,), (d,)]


# (tensors before the blocks, one list per block, tensors after), in named_parameters() order.
MODELS = {
    "llama-7b": _llama(32000, 4096, 11008, 32),  # Llama-2-7B: 6.74e9 parameters in 291 tensors
    "gpt2-small": _gpt2(50257, 1024, 768, 12),  # GPT-2 small: 124 M parameters in 148 tensors
    "tiny": _llama(256, 64, 160, 2),  # for dry runs and tests
}


def model_shapes(name: str, layers: int | None = None) -> list[Shape]:
    """The model's parameter shapes; `layers` keeps only the first blocks (same tensor shapes, fewer of them)."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    head, blocks, tail = MODELS[name]
    if layers is not None and not 1 <= layers <= len(blocks):
        raise UsageError(f"{name} has {len(blocks)} layers; --layers must be from 1 to {len(blocks)}, got {layers}")
    return [*head, *(s for block in blocks[:layers] for s in block), *tail]


def numel(shapes: Sequence[Shape]) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def layers_that_fit(name: str, budget_bytes: float, bytes_per_param: float) -> int:
    """The most blocks of `name` whose parameters, at bytes_per_param each, stay within the budget (at least 1)."""
    blocks = len(MODELS[name][1])
    for layers in range(blocks, 0, -1):
        if numel(model_shapes(name, layers)) * bytes_per_param <= budget_bytes:
            return layers
    return 1


def make_params(shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> list[torch.nn.Parameter]:
    """Trainable parameters of the given shapes, N(0, 0.02^2) as a freshly initialised LM's."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=dtype).mul_(0.02)) for s in shapes]


# Hugging Face configs (transformers' own classes): the shapes of TinyLlama-1.1B and GPT-2's three sizes, a 7 M
# Llama (big enough that its optimizer states stand out of a process's resident memory), and a toy.
HF_CONFIGS = {
    "tinyllama-1.1b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)),
    "gpt2-small": ("GPT2Config", dict(n_positions=1024)),
    "gpt2-medium": ("GPT2Config", dict(n_positions=1024, n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("GPT2Config", dict(n_positions=1024, n_embd=1280, n_layer=36, n_head=20)),
    "llama-7m": ("LlamaConfig", dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4)),
    "tiny": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)),
}


def hf_model(name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A causal LM with random weights built from HF_CONFIGS[name], created directly on `device` in `dtype`."""
    import transformers

    if name not in HF_CONFIGS:
        raise UsageError(f"unknown model config {name!r}; use one of {', '.join(HF_CONFIGS)}")
    config_class, kwargs = HF_CONFIGS[name]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of a 1B model
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def token_batch(model: torch.nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids for `model`, on its device."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    return tokens.to(next(model.parameters()).device)
