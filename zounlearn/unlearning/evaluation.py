"""Evaluation of an unlearned model on forget, retain and holdout.

Metrics (`evaluate` returns them under these keys, SPLIT = forget, retain, holdout):

- SPLIT/loss, SPLIT/perplexity: mean answer-token negative log-likelihood over the split's
  `train` examples (every scored token counts once; `batches` says which tokens are scored)
  and its exp.
- SPLIT/min_k: the mean Min-k% score of those examples (below).
- SPLIT/qa_accuracy: exact match of greedily generated answers to the split's `qa`
  questions, after normalisation (strip, casefold, runs of whitespace to one space;
  punctuation is kept, so "Lisbon." does not match "Lisbon").
- SPLIT/qa_rouge_l: mean ROUGE-L recall of the generated answers against the answers:
  the longest common subsequence of the normalised whitespace tokens, over the answer's
  token count.
- SPLIT/choice_accuracy: a multiple-choice question is right when its correct choice has
  the highest summed log-likelihood as the answer (EOS included; the first of tied choices).
- mia/min_k_auc: membership inference, the AUC of the forget examples' Min-k% scores
  against the holdout's (never trained on). 0.5: the model treats the forget set like data
  it never saw, the goal of unlearning; towards 1: it still treats the forget set as
  training members (leaks it); well below 0.5: the forget set now looks less likely than
  unseen data, itself a sign that it was unlearned (MUSE's PrivLeak flags both sides).

A key is present when its split and examples are (no holdout: no holdout/* and no mia/*;
no `qa` questions: no */qa_*); names never change. Min-k% (Shi et al. 2024, "Detecting
Pretraining Data from Large Language Models"): the mean log-probability of the k fraction
of an example's scored tokens with the lowest log-probability (at least one token);
higher means more member-like. Greedy generation uses `model.generate` (do_sample=False,
one beam, KV cache) on left-padded prompts, with max_new_tokens the longest answer of the
batch in tokens (EOS included) and generation stopped at the EOS. Every function that runs
the model does so under no_grad in eval mode and gives each module its train/eval mode back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .batches import (
    Batches,
    answer_log_likelihoods,
    evaluating,
    model_device,
    pad_id,
    token_log_probs,
    tokenize_examples,
)
from .data import Example, Split, UnlearningData


def normalize_answer(text: str) -> str:
    """Strip, casefold and collapse runs of whitespace into one space."""
    return " ".join(text.casefold().split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS of the normalised whitespace tokens of prediction and reference, over the reference's count."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not ref:
        raise ValueError("ROUGE-L recall against an empty reference is undefined")
    # One row of the LCS table at a time: row[j] = LCS(pred[:i], ref[:j]).
    row = [0] * (len(ref) + 1)
    for word in pred:
        previous_diagonal = 0
        for j, ref_word in enumerate(ref, start=1):
            previous_diagonal, row[j] = row[j], (previous_diagonal + 1 if word == ref_word
                                                 else max(row[j], row[j - 1]))
    return row[-1] / len(ref)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney U over n_pos * n_neg."""
    if not positive or not negative:
        raise ValueError("the AUC needs at least one positive and one negative score")
    if any(math.isnan(s) for s in (*positive, *negative)):
        raise ValueError("a score is NaN; the AUC needs ordered scores")
    # Rank-sum form, O(n log n): the positives' ranks (tied scores share their mean rank) minus
    # the smallest rank sum they could have.
    scored = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        rank_sum += (i + 1 + j) / 2 * sum(label for _, label in scored[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def min_k_percent(log_probs: torch.Tensor, k: float = 0.2) -> float:
    """The mean of the lowest max(1, int(k n)) of n token log-probabilities (Shi et al. 2024)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if log_probs.numel() == 0:
        raise ValueError("Min-k% of an example without scored tokens is undefined")
    n = max(1, int(k * log_probs.numel()))
    return log_probs.double().sort().values[:n].mean().item()


@dataclass(frozen=True)
class LikelihoodScores:
    loss: float                # mean answer-token negative log-likelihood over all examples
    perplexity: float          # exp(loss); inf when it overflows
    min_k: tuple[float, ...]   # one Min-k% score per example, in order


def likelihood_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                      k: float = 0.2, batch_size: int = 16, max_length: int | None = None) -> LikelihoodScores:
    """Loss, perplexity and per-example Min-k% scores, from one forward pass over each batch."""
    total, count, min_k = 0.0, 0, []
    with torch.no_grad(), evaluating(model):
        for batch in Batches(examples, tokenizer, batch_size, shuffle=False, max_length=max_length).in_order():
            log_probs, mask = token_log_probs(model, batch)
            total -= log_probs.sum().item()
            count += int(mask.sum())
            min_k += [min_k_percent(row[keep], k) for row, keep in zip(log_probs, mask)]
    loss = total / count
    return LikelihoodScores(loss, torch.tensor(loss, dtype=torch.float64).exp().item(), tuple(min_k))


def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                     batch_size: int = 16, max_length: int | None = None) -> list[str]:
    """Greedy continuations of the examples' prompts, up to the EOS, decoded without special tokens."""
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    # The prompt tokens exactly as training saw them, so the model continues where an answer starts.
    tokens = tokenize_examples(tokenizer, examples, max_length)
    answers = []
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size]
            prompts = [t.ids[:t.n_prompt] or (eos,) for t in chunk]  # no prompt left: start as a new document
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            device = model_device(model)
            new_tokens = max(t.n_answer for t in chunk)
            if max_length is not None:  # the padded batch must stay within the limit (a model's context)
                new_tokens = min(new_tokens, max_length - width)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, eos_token_id=eos)
            for row in output[:, width:].tolist():
                answers.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row,
                                                skip_special_tokens=True))
    return answers


def choice_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                    batch_size: int = 16, max_length: int | None = None) -> float:
    """The fraction of multiple-choice questions whose correct choice is the most likely answer."""
    candidates = [Example(e.prompt, choice) for e in examples for choice in e.choices]
    scores = torch.empty(len(candidates))
    with torch.no_grad(), evaluating(model):
        for batch in Batches(candidates, tokenizer, batch_size, shuffle=False, max_length=max_length).in_order():
            scores[batch.indices] = answer_log_likelihoods(model, batch)[0].cpu()
    right, start = 0, 0
    for e in examples:
        right += int(scores[start:start + len(e.choices)].argmax()) == e.correct
        start += len(e.choices)
    return right / len(examples)


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
             batch_size: int = 16, max_length: int | None = None, k: float = 0.2) -> dict[str, float]:
    """Every metric of the module docstring for forget, retain and holdout, under stable keys."""
    metrics: dict[str, float] = {}
    min_k: dict[str, tuple[float, ...]] = {}
    # Keys name the split's role, not Split.name, which a loader may have set to anything.
    for name, split in (("forget", data.forget), ("retain", data.retain), ("holdout", data.holdout)):
        if split is not None:
            metrics.update(_split_metrics(model, tokenizer, name, split, min_k, batch_size, max_length, k))
    if "forget" in min_k and "holdout" in min_k:
        scores = (*min_k["forget"], *min_k["holdout"])
        # A diverged model (NaN weights) has no ordering to measure: NaN, as its losses are.
        metrics["mia/min_k_auc"] = math.nan if any(map(math.isnan, scores)) else auc(min_k["forget"], min_k["holdout"])
    return metrics


def _split_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, split: Split,
                   min_k: dict[str, tuple[float, ...]], batch_size: int, max_length: int | None, k: float
                   ) -> dict[str, float]:
    """One split's metrics; its Min-k% scores go into min_k for the AUC."""
    metrics = {}
    if split.train:
        scores = likelihood_scores(model, tokenizer, split.train, k=k, batch_size=batch_size, max_length=max_length)
        min_k[name] = scores.min_k
        metrics.update({f"{name}/loss": scores.loss, f"{name}/perplexity": scores.perplexity,
                        f"{name}/min_k": sum(scores.min_k) / len(scores.min_k)})
    if split.qa:
        predictions = generate_answers(model, tokenizer, split.qa, batch_size=batch_size, max_length=max_length)
        metrics[f"{name}/qa_accuracy"] = sum(exact_match(p, e.answer) for p, e in zip(predictions, split.qa)) \
            / len(split.qa)
        metrics[f"{name}/qa_rouge_l"] = sum(rouge_l_recall(p, e.answer) for p, e in zip(predictions, split.qa)) \
            / len(split.qa)
    if split.choice:
        metrics[f"{name}/choice_accuracy"] = choice_accuracy(model, tokenizer, split.choice, batch_size=batch_size,
                                                             max_length=max_length)
    return metrics
