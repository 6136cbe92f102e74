"""Activation checkpointing for the first-order phase (zounlearn/unlearning/activations.py): the
layers really are recomputed in eval mode, the gradients are the same, everything is put back,
and the loop's option gives the same run as without it."""

from __future__ import annotations

import pytest
import torch
from tiny import DATA, tiny_gpt2, tokenizer

from zounlearn.errors import UsageError
from zounlearn.unlearning import loop as loop_module
from zounlearn.unlearning.activations import activation_checkpointing
from zounlearn.unlearning.loop import LoopConfig, unlearn


def _grads(model, tokens, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    calls = []
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *_: calls.append(1))
    model.zero_grad()
    with activation_checkpointing(model, checkpointing):
        model(tokens, labels=tokens, use_cache=False).loss.backward()
    hook.remove()
    return [p.grad.clone() for p in model.parameters()], len(calls)


def test_layers_are_recomputed_in_eval_mode_with_the_same_gradients():
    model = tiny_gpt2().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    plain, forwards = _grads(model, tokens, False)
    checkpointed, recomputed = _grads(model, tokens, True)
    assert (forwards, recomputed) == (1, 2), "the checkpointed layer runs again in backward"
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_everything_is_put_back():
    model = tiny_gpt2().eval()
    modes = [m.training for m in model.modules()]
    with activation_checkpointing(model):
        assert model.transformer.h[0].training and not model.transformer.h[0].mlp.dropout.training
        with torch.no_grad():  # the zeroth-order phase: nothing saved, nothing recomputed
            model(torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    assert [m.training for m in model.modules()] == modes
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not hasattr(model, "_require_grads_hook")


def test_a_model_without_checkpointing_is_refused():
    with pytest.raises(UsageError, match="does not support activation checkpointing"):
        with activation_checkpointing(torch.nn.Linear(2, 2)):
            pass


def test_the_loop_option_runs_the_same_unlearning(monkeypatch):
    monkeypatch.setattr(loop_module, "evaluate", lambda *args, **kwargs: {})  # the weights are what is compared
    results = []
    for checkpointing in (False, True):
        model = tiny_gpt2(seed=1).eval()
        config = LoopConfig(optimizer="hybrid_signadam", lr=1e-3, steps=4, batch_size=4,
                            optimizer_options={"block": 2, "zo_lr": 1e-4}, activation_checkpointing=checkpointing)
        unlearn(model, tokenizer(), DATA, config, progress=False)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false"):
        LoopConfig(activation_checkpointing="yes")
