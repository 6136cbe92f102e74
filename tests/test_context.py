"""Examples longer than the model's context (`batches.fit_to_context`) on the small embedded model
(64 positions): truncated to it with one warning that counts them, the prompt kept and the
answer cut; a prompt with no room for an answer refused by its source; a max_length above the
context refused; the loop, the evaluation and the attacks run on such data instead of
crashing in the position embeddings."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import SMALL_EMBEDDED

from zounlearn.errors import UsageError
from zounlearn.robustness import quantization_attack, relearning_attack
from zounlearn.unlearning import DataError, Example, Split, UnlearningData, embedded_model, evaluate
from zounlearn.unlearning.batches import TruncationWarning, context_length, fit_to_context, tokenize_examples
from zounlearn.unlearning.loop import LoopConfig, unlearn

WORDS = " ".join(["word"] * 100)


@pytest.fixture(scope="module")
def small(small_files):
    torch.set_num_threads(1)
    model, tokenizer, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir=small_files["cache"])
    long = (Example("Who is Ada?", WORDS, source="long.jsonl line 1"), Example("", WORDS))
    forget = Split(data.forget.name, data.forget.train + long, data.forget.qa + long[:1], data.forget.choice)
    return model, tokenizer, UnlearningData(forget, data.retain, data.holdout)


def _truncation_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]


def test_fit_to_context_truncates_to_it_and_warns_once(small):
    model, tokenizer, data = small
    assert context_length(model) == 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit_to_context(model, tokenizer, [data, data], None) == 64  # each example counted once
        assert fit_to_context(model, tokenizer, data, 32) == 32
    first, second = _truncation_warnings(caught)
    assert first.startswith("2 of ") and "longer than 64 tokens (the model's context)" in first
    assert "longer than 32 tokens (max_length)" in second
    qa, text = tokenize_examples(tokenizer, [data.forget.qa[-1], data.forget.train[-1]], 64)
    prompt = tokenize_examples(tokenizer, [Example("Who is Ada?", "Ada")])[0]
    assert qa.ids[:qa.n_prompt] == prompt.ids[:prompt.n_prompt] and len(qa.ids) == 64 and qa.truncated
    assert text.n_prompt == 0 and len(text.ids) == 64


def test_what_cannot_fit_is_refused(small):
    model, tokenizer, data = small
    with pytest.raises(UsageError, match="max_length 65 is above the model's context of 64 tokens"):
        fit_to_context(model, tokenizer, data, 65)
    too_long = Example(WORDS + "?", "Ada", source="questions.jsonl line 7")
    with pytest.raises(DataError, match="questions.jsonl line 7: its prompt alone is 101 tokens.*limit of 64"):
        fit_to_context(model, tokenizer, [too_long], None)
    with pytest.raises(DataError, match="example 2 of 2: its prompt alone"):
        tokenize_examples(tokenizer, [Example("Who?", "Ada"), Example(WORDS, "Ada")], 64)
    with pytest.raises(UsageError, match="max_length"):
        LoopConfig(max_length=1)


def test_the_loop_the_evaluation_and_the_attacks_run_on_long_examples(small, tmp_path):
    model, tokenizer, data = small
    with pytest.raises(IndexError):  # what the position embeddings do without the limit
        evaluate(model, tokenizer, data)
    with pytest.warns(TruncationWarning, match="longer than 64 tokens"):
        result = unlearn(model.__class__.from_pretrained(model.name_or_path), tokenizer, data,
                         LoopConfig(optimizer="adamw", lr=1e-3, steps=2), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "report.json").is_file() and result.after
    metrics = evaluate(model, tokenizer, data, max_length=64)  # generation stays within the context too
    assert 0 <= metrics["forget/qa_accuracy"] < 1
    with pytest.warns(TruncationWarning):
        relearning_attack(model, tokenizer, data, k=1, steps=(0, 1))
    with pytest.warns(TruncationWarning):
        quantization_attack(model, tokenizer, data, schemes=("int8",))
