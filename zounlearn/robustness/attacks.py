"""Attacks that try to bring unlearned knowledge back, on any Hugging Face causal LM.

Every attack works on a copy (copy.deepcopy) and leaves the model passed in bit-identical;
each evaluates with `zounlearn.unlearning.evaluate` (eval_kwargs: its batch_size,
max_length, k).

Fine-tuning attacks (`relearning_attack`, `retain_finetune_attack`): AdamW on every
parameter of the copy (requires_grad is switched on: the attacker owns the weights), in
train mode, on the mean answer-token cross-entropy (`objectives.cross_entropy`) of batches
from `Batches` over k chosen examples, evaluated after each number of optimizer steps on
the `steps` grid (0: the model as given). The k examples are the first k of the pool's
indices shuffled by random.Random(seed); the pool is the split's question/answer pairs
(`qa`) when it has them, else its `train` examples. The same seed fixes the batches
(Batches' seed) and torch's random stream (dropout), which is forked so that the caller's
stream is left as it was.

Defaults, chosen for the embedded model (a 2-layer GPT-2, n_embd 64, trained with AdamW at
lr 3e-3 on 100 people; forget: 10 people, 50 questions) and meant to scale to other models
through lr:
- k = 10: a fifth of the 50 forget questions, leaving 40 held out;
- batch_size = 10 (= k): every step sees all k examples, so a step is an epoch;
- lr = 1e-4: the unlearning loop's example rate (the attacker gets the unlearner's step
  size), a thirtieth of the embedded model's training rate; over the whole default curve it
  leaves what the original embedded model knows as it was (1e-3 took its retain question
  accuracy from 0.98 to 0.79 by step 50, so recovery would be confounded with damage). For
  a 7B model use its fine-tuning rate, e.g. 1e-5. weight_decay = 0, as in the embedded
  model's training, so the weights move only toward the relearned data;
- steps = (0, 5, 10, 20, 50): the relearning curve from no step to 50 passes over k;
- the retain-only attack uses the same k, steps and lr, so the two curves differ only in
  what is fine-tuned on.

Held-out forget portion (`relearning_split`): when the pool is `qa`, the forget questions
not relearned, as both the forget split's `train` (forget/loss) and `qa`
(forget/qa_accuracy); its multiple-choice questions are those whose question was not
relearned; the holdout split's question/answer pairs become its `train` examples, so that
mia_min_k compares answers with answers. The forget split's texts are left out: each
may restate a relearned fact. When the pool is `train` (texts), the texts not relearned and
every multiple-choice question (never trained on). Retain is kept in both cases (utility).

Weight quantization (`quantization_attack`, see `quantize.py` and `bnb.py`) and Gaussian weight noise
(`noise_attack`, see `noise.py`). The default relative standard deviations, 0.01 to 0.3 of
each tensor's RMS, span the relative RMS error of the quantizers on the embedded model
(0.006 to 0.009 for int8, 0.09 to 0.16 for the 4-bit schemes) and beyond, so that noise
of a quantizer's size is a control for it; 3 draws each.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..checks import check_int, check_range
from ..errors import UsageError
from ..optim import AdamW
from ..unlearning.batches import Batches, fit_to_context, rng_devices
from ..unlearning.data import Example, Split, UnlearningData
from ..unlearning.evaluation import evaluate
from ..unlearning.objectives import cross_entropy
from ._checks import check_eval_kwargs
from .noise import add_weight_noise_
from .quantize import DEFAULT_SCHEMES, check_scheme, quantize_model
from .targets import target_weights

DEFAULT_K = 10
DEFAULT_STEPS = (0, 5, 10, 20, 50)
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 10
DEFAULT_RELATIVE_STDS = (0.01, 0.03, 0.1, 0.3)


def choose(n: int, k: int, seed: int) -> tuple[int, ...]:
    """The first k of range(n) shuffled by random.Random(seed), ascending."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(sorted(order[:k]))


@dataclass(frozen=True)
class RelearningSplit:
    """Which forget examples a relearning attack fine-tunes on, and the data it is evaluated on."""

    pool: Literal["qa", "train"]   # the forget tuple the examples come from
    used: tuple[int, ...]          # their indices in it, ascending
    examples: tuple[Example, ...]  # the examples at those indices
    heldout: UnlearningData        # forget: only what was not relearned (module docstring); retain kept


def relearning_split(data: UnlearningData, k: int = DEFAULT_K, seed: int = 0) -> RelearningSplit:
    """The k forget examples to relearn and the held-out data (see the module docstring)."""
    pool: Literal["qa", "train"] = "qa" if data.forget.qa else "train"
    examples = getattr(data.forget, pool)
    if len(examples) < 2:
        raise UsageError(f"relearning needs at least 2 forget {pool} examples (some to relearn, some held out); "
                         f"the forget split has {len(examples)}")
    check_int("k", k, 1, len(examples) - 1)
    check_int("seed", seed, 0)
    used = choose(len(examples), k, seed)
    chosen = frozenset(used)
    rest = tuple(e for i, e in enumerate(examples) if i not in chosen)
    holdout = data.holdout
    if pool == "qa":
        asked = {examples[i].prompt for i in used}
        forget = Split(data.forget.name, train=rest, qa=rest,
                       choice=tuple(e for e in data.forget.choice if e.prompt not in asked))
        if holdout is not None and holdout.qa:
            holdout = Split(holdout.name, train=holdout.qa, qa=holdout.qa, choice=holdout.choice)
    else:
        forget = Split(data.forget.name, train=rest, qa=(), choice=data.forget.choice)
    return RelearningSplit(pool, used, tuple(examples[i] for i in used), UnlearningData(forget, data.retain, holdout))


def relearning_attack(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
                      k: int = DEFAULT_K, steps: Sequence[int] = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                      batch_size: int = DEFAULT_BATCH_SIZE, weight_decay: float = 0.0, seed: int = 0,
                      max_length: int | None = None, eval_kwargs: Mapping[str, Any] | None = None,
                      whole: bool = True) -> dict[str, Any]:
    """Fine-tune a copy on k forget examples; after each n on the steps grid, evaluate it on the
    held-out forget portion (`relearning_split`) and, unless whole=False, on the whole data.

    Returns {"pool", "used" (indices into the pool), "steps", "heldout" and "whole" (evaluate's
    metrics per n), "settings"}. max_length applies to fine-tuning and, unless eval_kwargs
    sets its own, to evaluation.
    """
    split = relearning_split(data, k, seed)
    curve = _fine_tune_curve(model, tokenizer, split.examples, steps, lr, batch_size, weight_decay, seed,
                             max_length, eval_kwargs,
                             {"heldout": split.heldout, **({"whole": data} if whole else {})})
    return {"pool": split.pool, "used": list(split.used), **curve,
            "settings": _settings(k, lr, batch_size, weight_decay, seed, max_length)}


def retain_finetune_attack(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
                           k: int = DEFAULT_K, steps: Sequence[int] = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                           batch_size: int = DEFAULT_BATCH_SIZE, weight_decay: float = 0.0, seed: int = 0,
                           max_length: int | None = None, eval_kwargs: Mapping[str, Any] | None = None
                           ) -> dict[str, Any]:
    """Fine-tune a copy on k retain examples only (no forget example); evaluate the whole data
    after each n on the steps grid. Returns {"pool", "used", "steps", "whole", "settings"}."""
    pool: Literal["qa", "train"] = "qa" if data.retain.qa else "train"
    examples = getattr(data.retain, pool)
    if not examples:
        raise UsageError("the retain split is empty; retain-only fine-tuning needs retain texts or questions")
    check_int("k", k, 1, len(examples))
    check_int("seed", seed, 0)
    used = choose(len(examples), k, seed)
    curve = _fine_tune_curve(model, tokenizer, tuple(examples[i] for i in used), steps, lr, batch_size,
                             weight_decay, seed, max_length, eval_kwargs, {"whole": data})
    return {"pool": pool, "used": list(used), **curve,
            "settings": _settings(k, lr, batch_size, weight_decay, seed, max_length)}


def _settings(k: int, lr: float, batch_size: int, weight_decay: float, seed: int, max_length: int | None
              ) -> dict[str, Any]:
    return {"k": k, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
            "max_length": max_length}


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = list(steps)
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in steps) \
            or any(a >= b for a, b in itertools.pairwise(steps)):
        raise UsageError(f"steps must be a non-empty, strictly increasing list of step counts >= 0 "
                         f"(e.g. (0, 5, 10, 20, 50)), got {steps}")
    return steps


def _fine_tune_curve(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                     steps: Sequence[int], lr: float, batch_size: int, weight_decay: float, seed: int,
                     max_length: int | None, eval_kwargs: Mapping[str, Any] | None,
                     evaluations: Mapping[str, UnlearningData]) -> dict[str, Any]:
    """AdamW on a copy over `examples`; {"steps": grid, name: [metrics at each n] for each evaluation}."""
    steps = _check_steps(steps)
    check_range("lr", lr, 0.0, open_low=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_int("batch_size", batch_size, 1)
    eval_kwargs = {"max_length": max_length, **check_eval_kwargs(eval_kwargs)}
    # Examples longer than the model's context are truncated to it (one warning), for fine-tuning and evaluation.
    max_length = fit_to_context(model, tokenizer, [*examples, *evaluations.values()], max_length)
    eval_kwargs["max_length"] = fit_to_context(model, tokenizer, list(evaluations.values()), eval_kwargs["max_length"],
                                               warn=False)
    batches = Batches(examples, tokenizer, batch_size, seed=seed, max_length=max_length)  # tokenizes: checks first
    curves: dict[str, list[dict[str, float]]] = {name: [] for name in evaluations}

    def record(tuned: torch.nn.Module) -> None:
        for name, evaluation_data in evaluations.items():
            curves[name].append(evaluate(tuned, tokenizer, evaluation_data, **eval_kwargs))

    _fine_tune(model, batches, steps, lr, weight_decay, seed, record)
    return {"steps": steps, **curves}


def _fine_tune(model: torch.nn.Module, batches: Batches, steps: Sequence[int], lr: float, weight_decay: float,
               seed: int, at_step: Callable[[torch.nn.Module], None]) -> None:
    """Fine-tune a copy of the model; call at_step(copy) once it has taken each number of steps on the grid."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
        p.grad = None
    with torch.random.fork_rng(devices=rng_devices(tuned)):
        torch.manual_seed(seed)
        # In half precision, our fused AdamW: its updates are rounded stochastically (torch's to nearest,
        # which loses what is below half a unit); float32 keeps torch's, bit for bit as before.
        half = any(p.dtype != torch.float32 for p in tuned.parameters())
        optimizer = (AdamW if half else torch.optim.AdamW)(tuned.parameters(), lr=lr, weight_decay=weight_decay)
        taken = 0
        for target in steps:
            tuned.train()
            while taken < target:
                optimizer.zero_grad(set_to_none=True)
                cross_entropy(tuned, batches.batch(taken)).backward()
                optimizer.step()
                taken += 1
            at_step(tuned)  # evaluate switches to eval mode and back


def quantization_attack(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
                        schemes: Sequence[str] = DEFAULT_SCHEMES,
                        eval_kwargs: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """{scheme: evaluate's metrics on the quantized copy} (`quantize.quantize_model`); by default every
    scheme of ours and bnb-fp4, the seed paper's load_in_4bit."""
    schemes = list(schemes)
    if not schemes:
        raise UsageError(f"schemes is empty; name at least one of {', '.join(DEFAULT_SCHEMES)}")
    for scheme in schemes:
        check_scheme(scheme)
    eval_kwargs = _fitted(model, tokenizer, data, check_eval_kwargs(eval_kwargs))
    return {scheme: evaluate(quantize_model(model, scheme), tokenizer, data, **eval_kwargs) for scheme in schemes}


def noise_attack(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
                 relative_stds: Sequence[float] = DEFAULT_RELATIVE_STDS, draws: int = 3, seed: int = 0,
                 eval_kwargs: Mapping[str, Any] | None = None) -> dict[float, dict[str, dict[str, float]]]:
    """{relative std: {"mean": metrics averaged over the draws, "std": their population standard deviation}}.

    Draw d uses torch.Generator().manual_seed(random.Random(f"{seed}:{d}").getrandbits(63))
    at every std, so the stds differ only in the noise's size (common random numbers).
    """
    relative_stds = list(relative_stds)
    if not relative_stds:
        raise UsageError("relative_stds is empty; give at least one relative standard deviation, e.g. (0.1,)")
    for std in relative_stds:
        check_range("relative_stds entry", std, 0.0)
    check_int("draws", draws, 1)
    check_int("seed", seed, 0)
    eval_kwargs = _fitted(model, tokenizer, data, check_eval_kwargs(eval_kwargs))
    clean = [t.weight for t in target_weights(model)]
    noisy = copy.deepcopy(model)  # one copy, its target weights reset from the model before each draw
    noisy_weights = [t.weight for t in target_weights(noisy)]
    results = {}
    for std in relative_stds:
        runs = []
        for draw in range(draws):
            with torch.no_grad():
                for w, w0 in zip(noisy_weights, clean):
                    w.copy_(w0)
            generator = torch.Generator().manual_seed(random.Random(f"{seed}:{draw}").getrandbits(63))
            add_weight_noise_(noisy, std, generator)
            runs.append(evaluate(noisy, tokenizer, data, **eval_kwargs))
        results[float(std)] = _mean_and_std(runs)
    return results


def _fitted(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData,
            eval_kwargs: dict[str, Any]) -> dict[str, Any]:
    """eval_kwargs with max_length fitted to the model's context (`fit_to_context`: one warning if it truncates)."""
    return {**eval_kwargs, "max_length": fit_to_context(model, tokenizer, data, eval_kwargs.get("max_length"))}


def _mean_and_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: the mean over the runs and the population standard deviation (0 for one run)."""
    mean = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    std = {key: math.sqrt(sum((r[key] - mean[key]) ** 2 for r in runs) / len(runs)) for key in runs[0]}
    return {"mean": mean, "std": std}
