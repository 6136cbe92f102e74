"""The evaluation metrics against hand-worked cases (normalisation, ROUGE-L, AUC with ties,
Min-k%), the model-based ones against hand computations on a tiny GPT-2, greedy generation
on a model trained on a few facts, and `evaluate`'s keys, ranges and modes."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from tiny import DATA, hand_log_likelihoods, hand_token_log_probs, tiny_gpt2, tokenizer

from zounlearn.unlearning import Example, Split
from zounlearn.unlearning.batches import Batches
from zounlearn.unlearning.evaluation import (
    auc,
    choice_accuracy,
    evaluate,
    exact_match,
    generate_answers,
    likelihood_scores,
    min_k_percent,
    normalize_answer,
    rouge_l_recall,
)
from zounlearn.unlearning.objectives import cross_entropy

TAUGHT = DATA.forget.qa + DATA.retain.qa[:5]  # the questions the trained model is taught
# A small data set with every part: forget (all of it), part of retain, the holdout person.
SMALL = dataclasses.replace(DATA, retain=Split("retain", train=DATA.retain.train[:10], qa=DATA.retain.qa[:5],
                                               choice=DATA.retain.choice[:5]))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A tiny GPT-2 that knows the answers to TAUGHT (Adam on their answer tokens)."""
    model = tiny_gpt2(seed=1)
    batch = Batches(TAUGHT, tokenizer(), len(TAUGHT), shuffle=False).batch(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        optimizer.step()
    return model


# --- hand-worked cases


def test_normalisation_and_exact_match():
    assert normalize_answer("  Copperleaf \t  Press\n") == "copperleaf press"
    assert exact_match(" lisbon", "Lisbon") and exact_match("STRASSE", "straße")  # casefold, not lower
    assert exact_match("copperleaf\npress", "Copperleaf Press")
    assert not exact_match("Lisbon.", "Lisbon") and not exact_match("Lis bon", "Lisbon")
    assert not exact_match("", "Lisbon")


def test_rouge_l_recall_by_hand():
    assert rouge_l_recall("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l_recall("d c b a", "a b c d") == pytest.approx(1 / 4)
    assert rouge_l_recall("b a x c", "a b c") == pytest.approx(2 / 3)
    assert rouge_l_recall("The  CAT", "the cat") == 1.0
    assert rouge_l_recall("", "the cat") == 0.0
    assert rouge_l_recall("the cat and more words", "cat") == 1.0  # recall: extra words cost nothing
    with pytest.raises(ValueError, match="empty reference"):
        rouge_l_recall("anything", "  ")


def test_auc_counts_ties_half():
    # Pairs (positive > negative): 1 beats 0; 2 ties 2 twice (2 halves) and beats 0; 3 beats all: 6 of 9.
    assert auc([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)
    assert auc([1, 1], [1, 1, 1]) == 0.5
    assert auc([5], [1, 2]) == 1.0 and auc([0], [1, 2]) == 0.0
    rng = random.Random(0)
    pos, neg = [rng.randint(0, 5) for _ in range(40)], [rng.randint(0, 5) for _ in range(30)]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert auc(pos, neg) == pytest.approx(pairs / (40 * 30))
    with pytest.raises(ValueError, match="at least one"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([float("nan")], [1.0])


def test_min_k_percent_by_hand():
    log_probs = torch.tensor([-1.0, -5.0, -2.0, -0.5, -3.0])
    assert min_k_percent(log_probs, 0.4) == pytest.approx(-4.0)   # the 2 lowest: -5, -3
    assert min_k_percent(log_probs, 0.2) == pytest.approx(-5.0)   # 1 of 5
    assert min_k_percent(log_probs, 0.1) == pytest.approx(-5.0)   # int(0.5) = 0, at least one
    assert min_k_percent(log_probs, 1.0) == pytest.approx(-2.3)   # all: the mean
    with pytest.raises(ValueError, match="k must be"):
        min_k_percent(log_probs, 0.0)


# --- the model-based metrics against hand computations


def test_likelihood_scores_by_hand():
    model, examples = tiny_gpt2(), DATA.forget.train[:6]
    scores = likelihood_scores(model, tokenizer(), examples, k=0.3, batch_size=4)
    hand = hand_token_log_probs(model, Batches(examples, tokenizer(), 6, shuffle=False).batch(0))
    loss = -sum(map(sum, hand)) / sum(map(len, hand))
    assert scores.loss == pytest.approx(loss, rel=1e-5)
    assert scores.perplexity == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    expected = [sum(sorted(row)[:max(1, int(0.3 * len(row)))]) / max(1, int(0.3 * len(row))) for row in hand]
    assert scores.min_k == pytest.approx(expected, rel=1e-5)


def test_choice_accuracy_by_hand(trained):
    questions = DATA.forget.choice + DATA.retain.choice[:5]
    right = 0
    for q in questions:
        candidates = Batches([Example(q.prompt, c) for c in q.choices], tokenizer(), 4, shuffle=False).batch(0)
        scores = [ll for ll, _ in hand_log_likelihoods(trained, candidates)]
        right += scores.index(max(scores)) == q.correct
    assert choice_accuracy(trained, tokenizer(), questions, batch_size=3) == pytest.approx(right / len(questions))
    assert right >= 7  # it was taught these facts


def test_greedy_generation_recalls_taught_answers_in_any_batch(trained):
    batched = generate_answers(trained, tokenizer(), TAUGHT, batch_size=len(TAUGHT))
    assert sum(exact_match(p, e.answer) for p, e in zip(batched, TAUGHT)) >= 9
    assert all(p.startswith(" ") for p in batched)  # the joined text's space, which normalisation strips
    # The shortest and the longest prompts alone (no padding) give what the left-padded batch gave.
    lengths = [len(tokenizer()(e.prompt)["input_ids"]) for e in TAUGHT]
    ends = [lengths.index(min(lengths)), lengths.index(max(lengths))]
    assert min(lengths) < max(lengths)
    assert generate_answers(trained, tokenizer(), [TAUGHT[i] for i in ends], batch_size=1) == [batched[i] for i in ends]


# --- evaluate


def test_evaluate_returns_every_key_in_range_and_keeps_modes(trained):
    seen = []
    hook = trained.register_forward_hook(lambda module, *_: seen.append((torch.is_grad_enabled(), module.training)))
    trained.train()
    trained.transformer.h[0].eval()
    metrics = evaluate(trained, tokenizer(), SMALL, batch_size=8)
    hook.remove()
    per_split = ["loss", "perplexity", "min_k", "qa_accuracy", "qa_rouge_l", "choice_accuracy"]
    assert set(metrics) == {f"{s}/{m}" for s in ("forget", "retain", "holdout") for m in per_split} | {"mia/min_k_auc"}
    for key, value in metrics.items():
        name = key.split("/")[1]
        low, high = {"loss": (0, float("inf")), "perplexity": (1, float("inf")), "min_k": (-float("inf"), 0)
                     }.get(name, (0, 1))
        assert low <= value <= high, key
    assert metrics["forget/qa_accuracy"] >= 0.8 and metrics["retain/qa_accuracy"] >= 0.8
    assert metrics["forget/perplexity"] == pytest.approx(torch.tensor(metrics["forget/loss"]).exp().item())
    assert seen and all(s == (False, False) for s in seen)  # no_grad, eval mode
    assert trained.training and not trained.transformer.h[0].training and trained.transformer.h[1].training


def test_evaluate_without_holdout_or_questions():
    model = tiny_gpt2()
    data = dataclasses.replace(SMALL, retain=Split("retain", train=SMALL.retain.train), holdout=None)
    metrics = evaluate(model, tokenizer(), data)
    assert set(metrics) == {"forget/loss", "forget/perplexity", "forget/min_k", "forget/qa_accuracy",
                            "forget/qa_rouge_l", "forget/choice_accuracy", "retain/loss", "retain/perplexity",
                            "retain/min_k"}


def test_a_diverged_model_evaluates_to_nan_instead_of_failing():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    metrics = evaluate(model, tokenizer(), SMALL, batch_size=8)
    assert math.isnan(metrics["mia/min_k_auc"]) and math.isnan(metrics["forget/loss"])
