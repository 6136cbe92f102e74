"""Evaluation of an unlearned model on forget, retain and holdout, in our terms and the field's.

`evaluate` returns the keys of the metric registry (metrics.py), SPLIT = forget, retain, holdout;
docs/unlearning.md gives each formula with its source. In short:

- SPLIT/loss, SPLIT/perplexity, SPLIT/min_k: the split's `train` examples' mean answer-token
  negative log-likelihood (every scored token counts once), its exp, and their mean Min-k%.
- SPLIT/qa_accuracy: exact match of greedy answers to the `qa` questions after normalisation
  (strip, casefold, runs of whitespace to one space; punctuation kept).
- SPLIT_Q_A_ROUGE: mean ROUGE-L recall of those answers, by Google's rouge_score with
  use_stemmer=True, as TOFU and open-unlearning compute it.
- SPLIT_Q_A_Prob: mean over the questions of exp(-mean answer-token NLL), the length-normalised
  answer probability (open-unlearning's `probability`).
- SPLIT/choice_accuracy: the correct choice has the highest summed log-likelihood.
- forget_truth_ratio, retain_Truth_Ratio: from each `PerturbedQA`'s truth ratio
  TR = p(perturbed) / p(paraphrased), p the length-normalised probability, the perturbed
  answers' combined as a geometric mean; the forget split's mean of min(TR, 1/TR), the
  retain split's mean of max(0, 1 - TR) (open-unlearning's `truth_ratio` aggregators).
- model_utility: the harmonic mean of retain_Q_A_Prob, retain_Q_A_ROUGE and
  retain_Truth_Ratio: the 3 of TOFU's 9 numbers our data has (the other 6 need its real-author
  and world-fact sets).
- extraction_strength, exact_memorization: on the forget split's `train` examples, from
  teacher-forced greedy predictions of the answer tokens before the EOS (open-unlearning's).
- mia_min_k: the ROC AUC of Min-k% (k = 0.4, as MUSE and open-unlearning) telling forget
  from holdout `train` examples, by scikit-learn, holdout as the positive class and
  -Min-k% as the score: towards 1 the forget set still looks like training data.
- forget_quality: the two-sample KS test's p-value (scipy) between the per-item forget truth
  ratios of the model and of the retain model; privleak: MUSE's
  ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) x 100, AUC = mia_min_k of the model and
  of the retain model (0: like the retain model; negative: leaks; positive: over-unlearned).

A key is present when its split and examples are (no holdout: no holdout/*, mia_min_k,
privleak; no `PerturbedQA` questions: no truth ratios, forget_quality or model_utility) and,
for forget_quality and privleak, when there is a retain model: `retain_model=`, or the one
registered for these forget and holdout splits (`register_retain_model`; the embedded model
registers its retrain model). Greedy generation uses `model.generate` (no sampling, one
beam, KV cache) on left-padded prompts, up to the EOS or as many tokens as the batch's
longest answer. Every function that runs the model does so under no_grad in eval mode and
gives each module its train/eval mode back.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .batches import IGNORE, Batches, answer_log_likelihoods, evaluating, model_device, pad_id, tokenize_examples
from .data import Example, Split, UnlearningData
from .metrics import METRICS
from .perturbed import PerturbedQA

MIN_K = 0.4          # MUSE's and open-unlearning's Min-k% fraction
EPSILON = 1e-10      # open-unlearning's guard in the truth ratio and PrivLeak denominators


def normalize_answer(text: str) -> str:
    """Strip, casefold and collapse runs of whitespace into one space."""
    return " ".join(text.casefold().split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


_SCORER = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of prediction against reference, by rouge_score with use_stemmer=True (TOFU's call)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER.score(reference, prediction)["rougeL"].recall


def mia_auc(forget: Sequence[float], holdout: Sequence[float]) -> float:
    """The ROC AUC of Min-k% scores telling forget from holdout examples (open-unlearning's `mia_auc`:
    holdout the positive class, -Min-k% the score); NaN when a score is."""
    if not forget or not holdout:
        raise ValueError("the AUC needs at least one forget and one holdout score")
    scores = np.array([*forget, *holdout], dtype=np.float64)
    if np.isnan(scores).any():
        return math.nan  # a diverged model has no ordering to measure
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score([0] * len(forget) + [1] * len(holdout), -scores))


def min_k_percent(log_probs: torch.Tensor, k: float = MIN_K) -> float:
    """The mean of the lowest max(1, int(k n)) of n token log-probabilities (Shi et al. 2024)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if log_probs.numel() == 0:
        raise ValueError("Min-k% of an example without scored tokens is undefined")
    n = max(1, int(k * log_probs.numel()))
    return log_probs.double().sort().values[:n].mean().item()


def extraction_strength(hits: torch.Tensor) -> float:
    """1 - k/n for the smallest k whose suffix of greedy predictions all match (open-unlearning's loop, which
    ends at k = n - 1 when none does, giving 1/n); 0 without tokens."""
    n = hits.numel()
    if n == 0:
        return 0.0
    misses = (~hits.bool()).nonzero()
    k = 0 if misses.numel() == 0 else min(int(misses.max()) + 1, n - 1)
    return 1 - k / n


# ---------------------------------------------------------------------------------------
# Scoring examples


@dataclass(frozen=True)
class TokenScores:
    """One example's scored (answer) tokens, EOS included, in order."""

    log_probs: torch.Tensor  # (n,) float32: log p(token | the tokens before it)
    hits: torch.Tensor       # (n,) bool: the greedy (argmax) prediction is the token

    @property
    def avg_loss(self) -> float:
        return -self.log_probs.double().mean().item()

    def before_eos(self) -> slice:
        """open-unlearning's token-wise metrics drop the last answer position (the EOS); one token stays."""
        return slice(0, max(1, self.log_probs.numel() - 1))


def score_examples(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                   batch_size: int = 16, max_length: int | None = None) -> list[TokenScores]:
    """Each example's answer-token log-probabilities and greedy hits, one forward pass per batch."""
    scores: list[TokenScores | None] = [None] * len(examples)
    if not examples:
        return []
    with torch.no_grad(), evaluating(model):
        for batch in Batches(examples, tokenizer, batch_size, shuffle=False, max_length=max_length).in_order():
            batch = batch.to(model_device(model))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            logits, targets = logits[:, :-1].float(), batch.labels[:, 1:]
            # float32 before the softmax, as batches.token_log_probs: the same numbers the objectives see.
            log_probs = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                         reduction="none").view_as(targets)
            hits = logits.argmax(-1) == targets
            for row, index in enumerate(batch.indices.tolist()):
                keep = targets[row] != IGNORE
                scores[index] = TokenScores(log_probs[row, keep].cpu(), hits[row, keep].cpu())
    return scores  # type: ignore[return-value]


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


def truth_ratios(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[PerturbedQA], *,
                 batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """TR = p(perturbed) / (p(paraphrased) + 1e-10) per question, p = exp(-mean answer-token NLL), the perturbed
    answers' mean NLL taken before the exp (a geometric mean of their probabilities), as open-unlearning."""
    scores = score_examples(model, tokenizer, _alternatives(questions), batch_size=batch_size, max_length=max_length)
    return _ratios(questions, scores)


def _alternatives(questions: Sequence[PerturbedQA]) -> list[Example]:
    return [Example(q.prompt, a) for q in questions for a in (q.paraphrased, *q.perturbed)]


def _ratios(questions: Sequence[PerturbedQA], scores: Sequence[TokenScores]) -> list[float]:
    out, start = [], 0
    for q in questions:
        paraphrased, *perturbed = scores[start:start + 1 + len(q.perturbed)]
        start += 1 + len(q.perturbed)
        p_perturbed = math.exp(-sum(s.avg_loss for s in perturbed) / len(perturbed))
        out.append(p_perturbed / (math.exp(-paraphrased.avg_loss) + EPSILON))
    return out


def forget_truth_ratio(ratios: Sequence[float]) -> float:
    """open-unlearning's `closer_to_1_better`: mean of min(TR, 1/TR); 1 when the model cannot tell the two apart."""
    return float(np.mean(np.minimum(ratios, 1 / (np.asarray(ratios) + EPSILON))))


def retain_truth_ratio(ratios: Sequence[float]) -> float:
    """open-unlearning's `true_better`: mean of max(0, 1 - TR); high when the paraphrase beats the perturbations."""
    return float(np.mean(np.maximum(0, 1 - np.asarray(ratios))))


def forget_quality(ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """TOFU's forget quality: the KS two-sample test's p-value of the two models' per-item forget truth ratios."""
    if any(map(math.isnan, (*ratios, *retain_ratios))):
        return math.nan
    from scipy.stats import ks_2samp
    return float(ks_2samp(ratios, retain_ratios).pvalue)


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE's PrivLeak, as open-unlearning computes it: ((1 - AUC) - (1 - AUC_r)) / (1 - AUC_r + 1e-10) x 100."""
    return ((1 - auc) - (1 - retain_auc)) / (1 - retain_auc + EPSILON) * 100


def model_utility(values: Sequence[float]) -> float:
    """The harmonic mean (scipy's hmean, as open-unlearning's hm_aggregate); 0 when a value is 0."""
    if any(map(math.isnan, values)):
        return math.nan
    if min(values) <= 0:
        return 0.0
    from scipy.stats import hmean
    return float(hmean(values))


# ---------------------------------------------------------------------------------------
# The retain (gold-standard) model


@dataclass(frozen=True)
class Reference:
    """What the metrics compare with, computed once from the retain model on given forget and holdout splits."""

    truth_ratios: tuple[float, ...] | None  # per forget PerturbedQA, in order
    auc: float | None                       # mia_min_k


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class RetainReference:
    """A retain model (trained without the forget set) and its numbers on each data it was asked about.

    `model` is the model, or a function that returns it (called once, when first needed: a model
    that must be built is built only if a metric needs it). The model must share the evaluated
    model's tokenizer.
    """

    def __init__(self, model: torch.nn.Module | Callable[[], torch.nn.Module]) -> None:
        if not (isinstance(model, torch.nn.Module) or callable(model)):
            raise TypeError(f"retain_model must be a model or a function returning one, got {type(model).__name__}")
        self._model, self._memo = model, {}

    @property
    def model(self) -> torch.nn.Module:
        if not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
        return self._model

    def reference(self, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *, batch_size: int,
                  max_length: int | None, k: float) -> Reference:
        key = _fingerprint(data.forget, data.holdout, max_length, k)
        if key not in self._memo:
            questions = _perturbed(data.forget)
            ratios = tuple(truth_ratios(self.model, tokenizer, questions, batch_size=batch_size,
                                        max_length=max_length)) if questions else None
            auc = None
            if data.holdout is not None and data.forget.train and data.holdout.train:
                auc = mia_auc(*(_min_k(self.model, tokenizer, split.train, batch_size, max_length, k)
                                for split in (data.forget, data.holdout)))
            self._memo[key] = Reference(ratios, auc)
        return self._memo[key]


_REGISTERED: dict[str, RetainReference] = {}


def register_retain_model(data: UnlearningData,
                          model: torch.nn.Module | Callable[[], torch.nn.Module] | RetainReference) -> None:
    """Make `model` (or what the function returns, when first needed) the retain model that `evaluate` compares
    with whenever it is given no retain_model and evaluates data with these forget and holdout splits."""
    _REGISTERED[_fingerprint(data.forget, data.holdout)] = \
        model if isinstance(model, RetainReference) else RetainReference(model)


def registered_retain_model(data: UnlearningData) -> RetainReference | None:
    """The retain model registered for data's forget and holdout splits, if any."""
    return _REGISTERED.get(_fingerprint(data.forget, data.holdout))


# ---------------------------------------------------------------------------------------
# evaluate


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
             batch_size: int = 16, max_length: int | None = None, k: float = MIN_K,
             retain_model: torch.nn.Module | RetainReference | None = None,
             metrics: Collection[str] | None = None) -> dict[str, float]:
    """Every metric of the module docstring for forget, retain and holdout, under the registry's keys.

    retain_model: the gold standard for forget_quality and privleak (a model sharing this
    tokenizer, or a RetainReference, which computes its numbers once per data); None: the one
    registered for this data, if any. metrics: only these registry keys (and only the passes
    they need); None: all.
    """
    wanted = _wanted(metrics)
    if retain_model is not None and not isinstance(retain_model, RetainReference):
        retain_model = RetainReference(retain_model)
    reference = retain_model or registered_retain_model(data)
    out: dict[str, float] = {}
    min_k: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    # Keys name the split's role, not Split.name, which a loader may have set to anything.
    for name, split in (("forget", data.forget), ("retain", data.retain), ("holdout", data.holdout)):
        if split is not None:
            out.update(_split_metrics(model, tokenizer, name, split, wanted, min_k, ratios, batch_size, max_length,
                                      k))
    if "retain" in ratios and all(key in out for key in ("retain_Q_A_Prob", "retain_Q_A_ROUGE")):
        out["model_utility"] = model_utility([out["retain_Q_A_Prob"], out["retain_Q_A_ROUGE"],
                                              out["retain_Truth_Ratio"]])
    if "forget" in min_k and "holdout" in min_k and "mia_min_k" in wanted:
        out["mia_min_k"] = mia_auc(min_k["forget"], min_k["holdout"])
    needed = ("forget" in ratios and "forget_quality" in wanted) or ("mia_min_k" in out and "privleak" in wanted)
    if reference is not None and needed:
        gold = reference.reference(tokenizer, data, batch_size=batch_size, max_length=max_length, k=k)
        if "forget" in ratios and gold.truth_ratios is not None and "forget_quality" in wanted:
            out["forget_quality"] = forget_quality(ratios["forget"], gold.truth_ratios)
        if "mia_min_k" in out and gold.auc is not None and "privleak" in wanted:
            out["privleak"] = privleak(out["mia_min_k"], gold.auc)
    return out if metrics is None else {key: value for key, value in out.items() if key in metrics}


# What each derived metric is computed from: asking for it computes these too.
_NEEDS = {"model_utility": ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"),
          "forget_quality": ("forget_truth_ratio",), "privleak": ("mia_min_k",),
          "mia_min_k": ("forget/min_k", "holdout/min_k")}


def _wanted(metrics: Collection[str] | None) -> set[str]:
    if metrics is None:
        return set(METRICS)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; evaluate reports {', '.join(METRICS)}")
    wanted, todo = set(), list(metrics)
    while todo:
        key = todo.pop()
        if key not in wanted:
            wanted.add(key)
            todo += _NEEDS.get(key, ())
    return wanted


def _perturbed(split: Split) -> list[PerturbedQA]:
    return [q for q in split.qa if isinstance(q, PerturbedQA)]


def _min_k(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
           batch_size: int, max_length: int | None, k: float) -> list[float]:
    scores = score_examples(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    return [min_k_percent(s.log_probs[s.before_eos()], k) for s in scores]


def _split_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, split: Split,
                   wanted: set[str], min_k: dict[str, list[float]], ratios: dict[str, list[float]], batch_size: int,
                   max_length: int | None, k: float) -> dict[str, float]:
    """One split's wanted metrics; its Min-k% scores go into min_k and its truth ratios into ratios."""
    metrics = {}
    options = {"batch_size": batch_size, "max_length": max_length}
    on_train = {f"{name}/loss", f"{name}/perplexity", f"{name}/min_k"} | \
        ({"extraction_strength", "exact_memorization"} if name == "forget" else set())
    if split.train and on_train & wanted:
        scores = score_examples(model, tokenizer, split.train, **options)
        loss = -sum(s.log_probs.double().sum().item() for s in scores) / sum(s.log_probs.numel() for s in scores)
        min_k[name] = [min_k_percent(s.log_probs[s.before_eos()], k) for s in scores]
        metrics.update({f"{name}/loss": loss, f"{name}/min_k": float(np.mean(min_k[name])),
                        f"{name}/perplexity": torch.tensor(loss, dtype=torch.float64).exp().item()})
        if name == "forget":
            metrics["extraction_strength"] = float(np.mean([extraction_strength(s.hits[s.before_eos()])
                                                            for s in scores]))
            metrics["exact_memorization"] = float(np.mean([s.hits[s.before_eos()].double().mean().item()
                                                           for s in scores]))
    if split.qa and {f"{name}/qa_accuracy", f"{name}_Q_A_ROUGE"} & wanted:
        predictions = generate_answers(model, tokenizer, split.qa, **options)
        metrics[f"{name}/qa_accuracy"] = float(np.mean([exact_match(p, e.answer)
                                                        for p, e in zip(predictions, split.qa)]))
        metrics[f"{name}_Q_A_ROUGE"] = float(np.mean([rouge_l_recall(p, e.answer)
                                                      for p, e in zip(predictions, split.qa)]))
    truth = "forget_truth_ratio" if name == "forget" else "retain_Truth_Ratio" if name == "retain" else None
    questions = _perturbed(split) if truth in wanted else []
    if split.qa and (f"{name}_Q_A_Prob" in wanted or questions):
        # The answers and the alternatives in one pass.
        scores = score_examples(model, tokenizer, [*split.qa, *_alternatives(questions)], **options)
        metrics[f"{name}_Q_A_Prob"] = float(np.mean([math.exp(-s.avg_loss) for s in scores[:len(split.qa)]]))
        if questions:
            ratios[name] = _ratios(questions, scores[len(split.qa):])
            metrics[truth] = (forget_truth_ratio if name == "forget" else retain_truth_ratio)(ratios[name])
    if split.choice and f"{name}/choice_accuracy" in wanted:
        metrics[f"{name}/choice_accuracy"] = choice_accuracy(model, tokenizer, split.choice, **options)
    return metrics
