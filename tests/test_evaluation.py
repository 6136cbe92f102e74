"""The evaluation metrics: each formula on hand-made numbers (ROUGE as rouge_score computes it, the
AUC by pair counting, Min-k%, extraction strength against open-unlearning's loop, the truth ratio
and its aggregates, forget quality, PrivLeak, model utility), the model-based ones against hand
computations on a tiny GPT-2, greedy generation on a model trained on a few facts, the retain
model's role (passed, registered, or absent), and `evaluate`'s keys, ranges and modes. Every key
evaluate returns is in the metric registry, and every registered key is returned by some call."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from tiny import DATA, hand_log_likelihoods, hand_token_log_probs, tiny_gpt2, tokenizer

from zounlearn.unlearning import Example, PerturbedQA, Split
from zounlearn.unlearning.batches import Batches
from zounlearn.unlearning.data import DataError
from zounlearn.unlearning.evaluation import (
    RetainReference,
    choice_accuracy,
    evaluate,
    exact_match,
    extraction_strength,
    forget_quality,
    forget_truth_ratio,
    generate_answers,
    mia_auc,
    min_k_percent,
    model_utility,
    normalize_answer,
    privleak,
    register_retain_model,
    retain_truth_ratio,
    rouge_l_recall,
    score_examples,
    truth_ratios,
)
from zounlearn.unlearning.metrics import METRICS, is_fraction
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


def test_rouge_l_recall_is_rouge_scores_with_the_stemmer():
    # The cases the hand-written version got wrong: rouge_score drops punctuation, lowercases and stems.
    assert rouge_l_recall("He was born in Lisbon.", "He was born in Lisbon") == 1.0
    assert rouge_l_recall("Lisbon, Portugal", "lisbon portugal") == 1.0
    assert rouge_l_recall("playing violins", "plays the violin") == pytest.approx(2 / 3)  # play, violin of 3
    # The LCS over the reference's tokens, in order: recall, so extra words cost nothing.
    assert rouge_l_recall("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l_recall("d c b a", "a b c d") == pytest.approx(1 / 4)
    assert rouge_l_recall("the cat and more words", "cat") == 1.0
    assert rouge_l_recall("", "the cat") == 0.0


def test_mia_auc_counts_pairs_with_ties_half():
    # Holdout above forget in score (-Min-k%): forget Min-k% above holdout's. Pairs (forget > holdout):
    # 1 beats 0; 2 ties 2 twice (2 halves) and beats 0; 3 beats all: 6 of 9.
    assert mia_auc([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)
    assert mia_auc([1, 1], [1, 1, 1]) == 0.5
    assert mia_auc([5], [1, 2]) == 1.0 and mia_auc([0], [1, 2]) == 0.0  # 1: the forget set looks like members
    rng = random.Random(0)
    forget, holdout = [rng.randint(0, 5) for _ in range(40)], [rng.randint(0, 5) for _ in range(30)]
    pairs = sum((f > h) + 0.5 * (f == h) for f in forget for h in holdout)
    assert mia_auc(forget, holdout) == pytest.approx(pairs / (40 * 30))
    assert math.isnan(mia_auc([float("nan")], [1.0]))
    with pytest.raises(ValueError, match="at least one"):
        mia_auc([], [1.0])


def test_min_k_percent_by_hand():
    log_probs = torch.tensor([-1.0, -5.0, -2.0, -0.5, -3.0])
    assert min_k_percent(log_probs) == pytest.approx(-4.0)        # k = 0.4: the 2 lowest, -5 and -3
    assert min_k_percent(log_probs, 0.2) == pytest.approx(-5.0)   # 1 of 5
    assert min_k_percent(log_probs, 0.1) == pytest.approx(-5.0)   # int(0.5) = 0, at least one
    assert min_k_percent(log_probs, 1.0) == pytest.approx(-2.3)   # all: the mean
    with pytest.raises(ValueError, match="k must be"):
        min_k_percent(log_probs, 0.0)


def _open_unlearning_es(hits: list[bool]) -> float:
    """open-unlearning's extraction-strength loop, transcribed: the first k whose suffix matches, else n - 1."""
    n = len(hits)
    if n == 0:
        return 0.0
    for k in range(n):
        if all(hits[k:]):
            break
    return 1 - k / n


def test_extraction_strength_by_hand_and_against_the_reference_loop():
    assert extraction_strength(torch.tensor([True, True, True])) == 1.0
    assert extraction_strength(torch.tensor([False, True, True])) == pytest.approx(2 / 3)  # one token of prefix
    assert extraction_strength(torch.tensor([True, True, False])) == pytest.approx(1 / 3)  # no suffix: 1/n
    assert extraction_strength(torch.tensor([False])) == 1.0  # open-unlearning's floor, 1/n with n = 1
    assert extraction_strength(torch.tensor([], dtype=torch.bool)) == 0.0
    rng = random.Random(1)
    for _ in range(200):
        hits = [rng.random() < 0.7 for _ in range(rng.randint(1, 9))]
        assert extraction_strength(torch.tensor(hits)) == pytest.approx(_open_unlearning_es(hits))


def test_truth_ratio_aggregates_forget_quality_privleak_and_utility_by_hand():
    ratios = [0.5, 2.0, 1.0, 0.25]
    assert forget_truth_ratio(ratios) == pytest.approx((0.5 + 0.5 + 1.0 + 0.25) / 4, rel=1e-8)
    assert retain_truth_ratio(ratios) == pytest.approx((0.5 + 0 + 0 + 0.75) / 4)
    # Completely separated samples of 3 and 3: the exact two-sided KS p-value is 2 / C(6, 3) = 0.1.
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert forget_quality(ratios, ratios) == 1.0
    assert math.isnan(forget_quality([math.nan, 1.0], [1.0, 2.0]))
    # AUC 0.9 against a retain model's 0.5: (0.1 - 0.5) / 0.5 = -80 %: the forget set still looks like members.
    assert privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert privleak(0.6, 0.6) == 0.0 and privleak(0.2, 0.6) == pytest.approx(100.0)  # over-unlearned
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert model_utility([0.5, 0.0, 1.0]) == 0.0


# --- the model-based metrics against hand computations


def test_score_examples_by_hand():
    model, examples = tiny_gpt2(), DATA.forget.train[:6]
    scores = score_examples(model, tokenizer(), examples, batch_size=4)
    batch = Batches(examples, tokenizer(), 6, shuffle=False).batch(0)
    hand = hand_token_log_probs(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for row, (score, expected) in enumerate(zip(scores, hand)):
        assert score.log_probs.tolist() == pytest.approx(expected, rel=1e-5)
        scored = [t for t in range(1, batch.labels.shape[1]) if batch.labels[row, t] != -100]
        greedy = [int(logits[row, t - 1].argmax()) == int(batch.labels[row, t]) for t in scored]
        assert score.hits.tolist() == greedy
        assert score.avg_loss == pytest.approx(-sum(expected) / len(expected), rel=1e-5)


def test_truth_ratio_by_hand():
    model = tiny_gpt2()
    questions = [PerturbedQA("Where was Adela born?", "Lisbon", paraphrased="Adela was born in Lisbon.",
                             perturbed=("Adela was born in Oslo.", "Adela was born in Lima.")),
                 DATA.forget.qa[0]]
    ratios = truth_ratios(model, tokenizer(), questions, batch_size=3)

    def avg_nll(prompt: str, answer: str) -> float:
        ll, n = hand_log_likelihoods(model, Batches([Example(prompt, answer)], tokenizer(), 1).batch(0))[0]
        return -ll / n

    for q, ratio in zip(questions, ratios):
        # The perturbed answers' mean NLL before the exp: a geometric mean of their probabilities.
        perturbed = math.exp(-sum(avg_nll(q.prompt, p) for p in q.perturbed) / len(q.perturbed))
        assert ratio == pytest.approx(perturbed / (math.exp(-avg_nll(q.prompt, q.paraphrased)) + 1e-10), rel=1e-5)


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


def test_perturbed_questions_are_checked():
    with pytest.raises(DataError, match="paraphrased answer and at least one perturbed"):
        PerturbedQA("Where?", "Lisbon", paraphrased="in Lisbon", perturbed=())
    with pytest.raises(DataError, match="needs a question"):
        PerturbedQA("", "Lisbon", paraphrased="in Lisbon", perturbed=("in Oslo",))
    assert PerturbedQA("Where?", "Lisbon", paraphrased="in Lisbon", perturbed=["in Oslo"]).perturbed == ("in Oslo",)


# --- evaluate


def test_evaluate_by_hand_on_the_forget_split(trained):
    metrics = evaluate(trained, tokenizer(), SMALL, batch_size=8)
    scores = score_examples(trained, tokenizer(), SMALL.forget.train)
    assert metrics["forget/loss"] == pytest.approx(-sum(s.log_probs.sum().item() for s in scores)
                                                   / sum(s.log_probs.numel() for s in scores), rel=1e-6)
    # open-unlearning's token-wise metrics leave out the last answer position (the EOS).
    assert metrics["forget/min_k"] == pytest.approx(
        sum(min_k_percent(s.log_probs[:-1], 0.4) for s in scores) / len(scores), rel=1e-6)
    assert metrics["exact_memorization"] == pytest.approx(
        sum(s.hits[:-1].float().mean().item() for s in scores) / len(scores), rel=1e-6)
    assert metrics["extraction_strength"] == pytest.approx(
        sum(_open_unlearning_es(s.hits[:-1].tolist()) for s in scores) / len(scores), rel=1e-6)
    answers = generate_answers(trained, tokenizer(), SMALL.forget.qa)
    assert metrics["forget_Q_A_ROUGE"] == pytest.approx(
        sum(rouge_l_recall(a, q.answer) for a, q in zip(answers, SMALL.forget.qa)) / len(answers))
    probabilities = [math.exp(-s.avg_loss) for s in score_examples(trained, tokenizer(), SMALL.forget.qa)]
    assert metrics["forget_Q_A_Prob"] == pytest.approx(sum(probabilities) / len(probabilities), rel=1e-6)
    assert metrics["forget_truth_ratio"] == pytest.approx(
        forget_truth_ratio(truth_ratios(trained, tokenizer(), SMALL.forget.qa)), rel=1e-6)
    assert metrics["model_utility"] == pytest.approx(model_utility(
        [metrics["retain_Q_A_Prob"], metrics["retain_Q_A_ROUGE"], metrics["retain_Truth_Ratio"]]))
    holdout = score_examples(trained, tokenizer(), SMALL.holdout.train)
    assert metrics["mia_min_k"] == pytest.approx(mia_auc(
        [min_k_percent(s.log_probs[:-1]) for s in scores], [min_k_percent(s.log_probs[:-1]) for s in holdout]))


def test_evaluate_returns_registered_keys_in_range_and_keeps_modes(trained):
    seen = []
    hook = trained.register_forward_hook(lambda module, *_: seen.append((torch.is_grad_enabled(), module.training)))
    trained.train()
    trained.transformer.h[0].eval()
    retain_model = tiny_gpt2(seed=2)
    metrics = evaluate(trained, tokenizer(), SMALL, batch_size=8, retain_model=retain_model)
    hook.remove()
    assert set(metrics) == set(METRICS)  # every registered key, and no other, on data that has every part
    for key, value in metrics.items():
        name = key.split("/")[-1]
        low, high = {"loss": (0, math.inf), "perplexity": (1, math.inf), "min_k": (-math.inf, 0),
                     "privleak": (-100, math.inf)}.get(name, (0, 1))
        assert low <= value <= high, key
        assert is_fraction(key) == ((low, high) == (0, 1)), key
    assert metrics["forget/qa_accuracy"] >= 0.8 and metrics["retain/qa_accuracy"] >= 0.8
    assert metrics["forget/perplexity"] == pytest.approx(torch.tensor(metrics["forget/loss"]).exp().item())
    assert seen and all(s == (False, False) for s in seen)  # no_grad, eval mode, the retain model's passes too
    assert trained.training and not trained.transformer.h[0].training and trained.transformer.h[1].training


def test_the_retain_model_against_itself_is_perfect():
    model = tiny_gpt2()
    metrics = evaluate(model, tokenizer(), SMALL, retain_model=model)
    assert metrics["forget_quality"] == 1.0 and metrics["privleak"] == 0.0


def test_a_registered_retain_model_is_used_for_its_data_only_and_loaded_once(trained):
    data = dataclasses.replace(SMALL, forget=dataclasses.replace(SMALL.forget, name="registered"))
    retain_model, loads = tiny_gpt2(seed=4), []
    register_retain_model(data, lambda: loads.append(1) or retain_model)
    assert loads == []  # nothing is loaded before a metric needs it
    registered = evaluate(trained, tokenizer(), data)
    assert registered == evaluate(trained, tokenizer(), data, retain_model=retain_model)
    assert "forget_quality" in registered and "privleak" in registered and loads == [1]
    evaluate(trained, tokenizer(), data)
    assert loads == [1]  # and its numbers are reused
    other = dataclasses.replace(data, holdout=Split("holdout", train=SMALL.holdout.train[:3]))
    assert "privleak" not in evaluate(trained, tokenizer(), other)


def test_a_retain_reference_computes_its_numbers_once_per_data(trained, monkeypatch):
    import zounlearn.unlearning.evaluation as evaluation

    reference, calls = RetainReference(tiny_gpt2(seed=5)), []
    real = evaluation.truth_ratios
    monkeypatch.setattr(evaluation, "truth_ratios", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    for _ in range(3):
        evaluate(trained, tokenizer(), SMALL, retain_model=reference)
    assert calls.count(reference.model) == 1


def test_evaluate_without_holdout_questions_or_retain_model():
    model = tiny_gpt2()
    data = dataclasses.replace(SMALL, retain=Split("retain", train=SMALL.retain.train), holdout=None)
    metrics = evaluate(model, tokenizer(), data)
    assert set(metrics) == {"forget/loss", "forget/perplexity", "forget/min_k", "extraction_strength",
                            "exact_memorization", "forget/qa_accuracy", "forget_Q_A_ROUGE", "forget_Q_A_Prob",
                            "forget_truth_ratio", "forget/choice_accuracy", "retain/loss", "retain/perplexity",
                            "retain/min_k"}
    # Plain questions (no paraphrased and perturbed answers): no truth ratio, forget quality or utility.
    plain = dataclasses.replace(SMALL, forget=dataclasses.replace(
        SMALL.forget, qa=tuple(Example(q.prompt, q.answer) for q in SMALL.forget.qa)))
    metrics = evaluate(model, tokenizer(), plain, retain_model=model)
    assert "forget_truth_ratio" not in metrics and "forget_quality" not in metrics
    assert "forget_Q_A_Prob" in metrics and "model_utility" in metrics


def test_a_diverged_model_evaluates_to_nan_instead_of_failing():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    metrics = evaluate(model, tokenizer(), SMALL, batch_size=8, retain_model=tiny_gpt2())
    for key in ("mia_min_k", "forget/loss", "forget_quality", "privleak", "model_utility"):
        assert math.isnan(metrics[key]), key


def test_evaluate_computes_only_the_metrics_asked_for(trained):
    everything = evaluate(trained, tokenizer(), SMALL, retain_model=trained)
    calls = []
    hook = trained.register_forward_hook(lambda *args: calls.append(1))
    assert evaluate(trained, tokenizer(), SMALL, metrics=["forget/loss"]) == {"forget/loss": everything["forget/loss"]}
    one_pass = len(calls)  # the forget texts' one batch: no generation, no other split
    calls.clear()
    asked = ["model_utility", "forget_quality", "privleak"]
    some = evaluate(trained, tokenizer(), SMALL, retain_model=trained, metrics=asked)
    hook.remove()
    assert some == {key: everything[key] for key in asked}  # the same numbers, through what they need only
    assert one_pass == 1 and len(calls) > one_pass
    with pytest.raises(ValueError, match="unknown metric 'forget/rouge'"):
        evaluate(trained, tokenizer(), SMALL, metrics=["forget/rouge"])
