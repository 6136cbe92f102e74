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

Truncation to `max_length`: the prompt is kept whole and the answer is cut after its first
max_length - (prompt tokens) tokens (its EOS then goes too), so a question is asked as
written and the answer tokens that remain are scored after the whole prompt. A prompt that
leaves no room for one answer token is refused (DataError, naming the example's source).
`fit_to_context` chooses the limit for a model: max_length, which must not exceed the
model's context (`context_length`), or else the context itself, so that no example runs
past the position embeddings; it warns once with the number of examples it truncates.

Batches are right-padded with the pad token (the EOS when the tokenizer has none; the
attention mask hides it either way) and carry each example's index in the tuple it came
from, which the objectives' caches are keyed by.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..checks import check_int
from ..errors import UsageError
from .data import DataError, Example, Split, UnlearningData

IGNORE = -100  # the label of a token without loss, as Hugging Face losses expect


def join(prompt: str, answer: str) -> str:
    """The text the model reads for a prompt and its answer (the rule in the module docstring)."""
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


class TruncationWarning(UserWarning):
    """Examples longer than the token limit were truncated (`fit_to_context`)."""


@dataclass(frozen=True)
class Tokens:
    """One example's token ids (prompt then answer, EOS last unless truncated) and how many are prompt."""

    ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False

    @property
    def n_answer(self) -> int:
        return len(self.ids) - self.n_prompt


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                      max_length: int | None = None) -> list[Tokens]:
    """Each example's tokens under the rules of the module docstring."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) so that answers end")
    if max_length is not None:
        # One token predicts nothing: at least two are needed for an answer token to be scored.
        check_int("max_length", max_length, 2)
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    texts = tokenizer([join(e.prompt, e.answer) for e in examples])["input_ids"]
    tokens = []
    for index, (example, prompt, ids) in enumerate(zip(examples, prompts, texts)):
        n_prompt = 0
        while n_prompt < min(len(prompt), len(ids)) and prompt[n_prompt] == ids[n_prompt]:
            n_prompt += 1
        # The EOS ends the answer, unless the tokenizer already put one there.
        if not ids or ids[-1] != eos or len(ids) == n_prompt:
            ids = [*ids, eos]
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            if n_prompt >= max_length:
                where = example.source or f"example {index + 1} of {len(examples)}"
                raise DataError(f"{where}: its prompt alone is {n_prompt} tokens, which leaves no room for an answer "
                                f"within the limit of {max_length} tokens; shorten the prompt or raise the limit "
                                f"(max_length, up to the model's context)")
            ids = ids[:max_length]
        tokens.append(Tokens(tuple(ids), n_prompt, truncated))
    return tokens


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model was built for (GPT-2's n_positions, Llama's max_position_embeddings), or None."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


Data = UnlearningData | Split | Example


def fit_to_context(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Data | Iterable[Data],
                   max_length: int | None, *, warn: bool = True) -> int | None:
    """The token limit to tokenize `data` with for `model` (the module docstring's rule): max_length, or the
    model's context when max_length is None. A max_length above the context is a UsageError, a prompt that
    leaves no room for its answer a DataError; with warn, one TruncationWarning counts the examples cut."""
    if max_length is not None:
        check_int("max_length", max_length, 2)
    context = context_length(model)
    if max_length is not None and context is not None and max_length > context:
        raise UsageError(f"max_length {max_length} is above the model's context of {context} tokens; use at most "
                         f"{context}")
    limit = max_length if max_length is not None else context
    if limit is None:
        return None
    examples = _every_example(data)
    cut = sum(t.truncated for t in tokenize_examples(tokenizer, examples, limit))
    if cut and warn:
        what = "max_length" if max_length is not None else "the model's context"
        warnings.warn(f"{cut} of {len(examples)} examples are longer than {limit} tokens ({what}) and are truncated "
                      f"to it: the prompt is kept and the answer cut", TruncationWarning, stacklevel=2)
    return limit


def _every_example(data: Data | Iterable[Data]) -> list[Example]:
    """What gets tokenized for data, each example once: every split's train and qa examples and, per
    multiple-choice question, a question/choice pair for each choice."""
    examples: list[Example] = []
    for item in [data] if isinstance(data, (UnlearningData, Split, Example)) else data:
        if isinstance(item, UnlearningData):
            examples += _every_example([s for s in (item.forget, item.retain, item.holdout) if s is not None])
        elif isinstance(item, Split):
            examples += [*item.train, *item.qa]
            examples += [Example(e.prompt, choice, source=e.source) for e in item.choice for choice in e.choices]
        else:
            examples.append(item)
    return list(dict.fromkeys(examples))


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

    def split(self, k: int) -> list[Batch]:
        """The rows in min(k, len(self)) consecutive micro-batches whose sizes differ by at most one, each at this
        batch's padded width (a padded position's values depend only on the tokens before it, so every row
        computes as it does in the whole batch, and means over positions keep the whole batch's count)."""
        fields = (self.input_ids, self.attention_mask, self.labels, self.indices)
        return [Batch(*parts) for parts in zip(*(t.tensor_split(min(k, len(self))) for t in fields))]


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
            raise DataError("no examples to batch")
        check_int("batch_size", batch_size, 1)
        if drop_last and batch_size > len(self.examples):
            raise UsageError(f"batch_size {batch_size} is larger than the {len(self.examples)} examples and "
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
