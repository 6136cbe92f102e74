"""Examples as model inputs for any Hugging Face tokenizer, batches of them, and the answer
log-likelihoods that the objectives and the evaluation share.

Text of an example (`join`): the prompt, one space, the answer; no space is added when the
prompt is empty (a plain text), ends with whitespace or the answer starts with whitespace
(a MUSE verbmem prefix and its continuation are joined as they are).

Tokens (`tokenize_examples`): the joined text is tokenized with the tokenizer's special
tokens (a Llama BOS, for instance) and an EOS is appended unless the tokenization already
ends with one. The prompt tokens are the longest common prefix of the prompt's own
tokenization and the joined one, so a token that a tokenizer merges across the boundary
counts as an answer token. Answer tokens (EOS included) carry the loss; prompt and padding
tokens get the label -100. The first token of a sequence is never predicted, so a plain
text without BOS has one scored token fewer than it has tokens.

Truncation to `max_length`: prompt tokens are dropped from the start (the end of the prompt
stays next to the answer); if the answer and its EOS alone are longer than max_length, the
first max_length answer tokens are kept, without prompt or EOS.

Batches are right-padded with the pad token (the EOS when the tokenizer has none; the
attention mask hides it either way) and carry each example's index in the tuple it came
from, which the objectives' caches are keyed by.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .data import Example

IGNORE = -100  # the label of a token without loss, as Hugging Face losses expect


def join(prompt: str, answer: str) -> str:
    """The text the model reads for a prompt and its answer (the rule in the module docstring)."""
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


@dataclass(frozen=True)
class Tokens:
    """One example's token ids (prompt then answer, EOS last) and how many are prompt."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_answer(self) -> int:
        return len(self.ids) - self.n_prompt


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                      max_length: int | None = None) -> list[Tokens]:
    """Each example's tokens under the rules of the module docstring."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) so that answers end")
    if max_length is not None and max_length < 2:
        # One token predicts nothing: at least two are needed for an answer token to be scored.
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    texts = tokenizer([join(e.prompt, e.answer) for e in examples])["input_ids"]
    tokens = []
    for prompt, ids in zip(prompts, texts):
        n_prompt = 0
        while n_prompt < min(len(prompt), len(ids)) and prompt[n_prompt] == ids[n_prompt]:
            n_prompt += 1
        # The EOS ends the answer, unless the tokenizer already put one there.
        if not ids or ids[-1] != eos or len(ids) == n_prompt:
            ids = [*ids, eos]
        if max_length is not None and len(ids) > max_length:
            if len(ids) - n_prompt >= max_length:
                ids, n_prompt = ids[n_prompt:n_prompt + max_length], 0
            else:
                drop = len(ids) - max_length
                ids, n_prompt = ids[drop:], n_prompt - drop
        tokens.append(Tokens(tuple(ids), n_prompt))
    return tokens


@dataclass(frozen=True)
class Batch:
    """Right-padded model inputs; labels are IGNORE on prompt and padding tokens."""

    input_ids: torch.Tensor       # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    labels: torch.Tensor          # (B, T) int64
    indices: torch.Tensor         # (B,) int64: each example's index in the tuple it came from

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.indices)))


def _pad(tokens: Sequence[Tokens], indices: Sequence[int], fill: int) -> Batch:
    width = max(len(t.ids) for t in tokens)
    input_ids = torch.full((len(tokens), width), fill, dtype=torch.long)
    attention_mask = torch.zeros((len(tokens), width), dtype=torch.long)
    labels = torch.full((len(tokens), width), IGNORE, dtype=torch.long)
    for row, t in enumerate(tokens):
        ids = torch.tensor(t.ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        labels[row, t.n_prompt:len(ids)] = ids[t.n_prompt:]
    return Batch(input_ids, attention_mask, labels, torch.tensor(list(indices), dtype=torch.long))


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the pad token, else the EOS (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Batches:
    """Deterministic batches over a tuple of examples, tokenized once at construction.

    Epoch e visits the examples in the order `random.Random(f"{seed}:{e}")` shuffles them
    into (or in index order with shuffle=False), so `batch(step)` depends only on the seed
    and the step: a resumed run draws the same batches. With drop_last, an epoch ends before
    a last batch smaller than batch_size; `in_order()` always yields every example once.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, batch_size: int, *,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, max_length: int | None = None) -> None:
        self.examples = tuple(examples)
        if not self.examples:
            raise ValueError("no examples to batch")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if drop_last and batch_size > len(self.examples):
            raise ValueError(f"batch_size {batch_size} is larger than the {len(self.examples)} examples and "
                             f"drop_last would leave no batch; lower batch_size or set drop_last=False")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.tokens = tokenize_examples(tokenizer, self.examples, max_length)
        self.pad_id = pad_id(tokenizer)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): one shuffle per epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The example indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, step: int) -> Batch:
        """The batch of global step `step` (epoch step // len(self), counted from 0)."""
        epoch, position = divmod(step, len(self))
        return self._collate(self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size])

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch."""
        return (self.batch(epoch * len(self) + i) for i in range(len(self)))

    def in_order(self) -> Iterator[Batch]:
        """Every example once, in index order (what caches and evaluation run over)."""
        n = len(self.examples)
        return (self._collate(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size))

    def _collate(self, indices: Sequence[int]) -> Batch:
        return _pad([self.tokens[i] for i in indices], indices, self.pad_id)


# ---------------------------------------------------------------------------------------
# Forward passes


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def rng_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA device whose random stream the model draws from (dropout), for torch.random.fork_rng."""
    device = model_device(model)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """Train (or eval) mode inside, then every submodule's own train/eval flag back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def evaluating(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode inside, then every submodule's own train/eval flag back as it was."""
    return model_mode(model, False)


def token_log_probs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token | previous tokens) of every scored token, float32 whatever the model's dtype.

    Returns (log_probs, mask), both (B, T-1): position t is the prediction of token t + 1;
    log_probs is 0 where mask (a scored answer token) is False.
    """
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.labels[:, 1:]
    # float32 before the softmax: a bfloat16 log-likelihood summed over an answer loses the digits NPO needs.
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                          reduction="none")
    return -nll.view_as(targets), targets != IGNORE


def answer_log_likelihoods(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-likelihood of its answer tokens (float32) and their number (int64)."""
    log_probs, mask = token_log_probs(model, batch)
    return log_probs.sum(dim=1), mask.sum(dim=1)
