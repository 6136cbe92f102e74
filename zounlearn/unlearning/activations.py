"""Activation checkpointing for the first-order phase of a Hugging Face model.

With it, backward keeps each decoder layer's input only and recomputes the layer's forward when
its gradient is needed: the saved activations drop from all of every layer's to one layer's
plus the layer inputs, for one more forward pass per first-order step (docs/memory.md). The
zeroth-order phase runs under no_grad, where nothing is saved and nothing is recomputed.

Hugging Face checkpoints a layer only while it is in training mode; the loop runs the model in
eval mode (dropout off, so that a ZO difference sees one network), so inside
`activation_checkpointing(model)` the modules that checkpoint (those with a
`gradient_checkpointing` flag) are put in training mode themselves, their children (dropout,
attention) keeping theirs. Everything is put back on the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import UsageError


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Checkpoint model's layers inside (non-reentrant torch.utils.checkpoint); no-op if not enabled."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} does not support activation checkpointing (Hugging Face's "
                         f"gradient_checkpointing_enable); run without it")
    had_input_hook = hasattr(model, "_require_grads_hook")
    was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # the caller's own: kept
    if was_on:
        pass
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    modes = [(m, m.training) for m in flagged]
    for m in flagged:
        m.training = True  # the flag HF checks, on this module only
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        if was_on:
            pass
        elif hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if not had_input_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()


__all__ = ["activation_checkpointing"]
