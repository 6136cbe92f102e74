"""Tiny models, a tokenizer and hand computations that the unlearning tests share (tests
import them as `from tiny import ...`; pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zounlearn.unlearning import EmbeddedConfig, synthetic_data
from zounlearn.unlearning.batches import IGNORE, join

DATA = synthetic_data(seed=3, n_people=10)  # forget: 1 person (15 sentences, 5 questions)


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [join(e.prompt, e.answer) for s in (DATA.forget, DATA.retain, DATA.holdout) for e in s.train + s.qa]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def tiny_gpt2(n_layer: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    eos = tokenizer().eos_token_id
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=len(tokenizer()), bos_token_id=eos,
                        eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_llama(n_layer: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    eos = tokenizer().eos_token_id
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer()),
                                        bos_token_id=eos, eos_token_id=eos))


def hand_token_log_probs(model: torch.nn.Module, batch) -> list[list[float]]:
    """Each row's answer-token log-probabilities, in float64, one token at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    return [[logits[row, t - 1].log_softmax(-1)[batch.labels[row, t]].item()
             for t in range(1, batch.labels.shape[1]) if batch.labels[row, t] != IGNORE] for row in range(len(batch))]


def hand_log_likelihoods(model: torch.nn.Module, batch) -> list[tuple[float, int]]:
    """(summed answer log-likelihood, answer tokens) per row."""
    return [(sum(terms), len(terms)) for terms in hand_token_log_probs(model, batch)]


def hand_ce(model: torch.nn.Module, batch) -> float:
    rows = hand_log_likelihoods(model, batch)
    return -sum(ll for ll, _ in rows) / sum(n for _, n in rows)


def nudge(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter a little, as unlearning steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


# The embedded model on 20 people with one layer: reaches the accuracy bar in a few hundred steps (seconds).
SMALL_EMBEDDED = EmbeddedConfig(name="test-gpt2", n_people=20, n_layer=1, n_embd=64, n_head=4, batch_size=32,
                                eval_every=50, max_steps=1500)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, for `assert_unchanged`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The model holds exactly the `snapshot` it had, and no parameter has a gradient."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())


def split_rows(split) -> dict[str, list[dict]]:
    """A split as JSONL rows, one list per kind (a loader reads one schema per file)."""
    return {"text": [{"text": e.answer} for e in split.train if e.kind == "text"],
            "qa": [{"question": e.prompt, "answer": e.answer} for e in split.qa],
            "choice": [{"question": e.prompt, "choices": list(e.choices), "answer": e.correct} for e in split.choice]}


def data_flags(files: dict, roles: tuple[str, ...] = ("forget", "retain", "holdout")) -> list[str]:
    """--forget F --retain R ... for the JSONL files of the `small_files` fixture."""
    return [arg for role in roles for path in files[role] for arg in (f"--{role}", path)]
