"""Weight-space diagnostics of an unlearned model against the model it started from.

- `weight_distance`: how far unlearning moved the weights, ||theta_u - theta_o||_2 over every
  parameter, relative to ||theta_o||_2, and per transformer block. A small distance is a
  warning sign: the knowledge may sit close by, within reach of a few fine-tuning steps.
- `mode_connectivity`: the metrics along the straight line theta(t) = (1 - t) theta_o +
  t theta_u. Without a loss barrier between the two (linear mode connectivity), the
  unlearned model lies in the same basin as the original one. The same between two unlearned
  solutions (AdamW's and another optimizer's, as "Downgrade to Upgrade" measures): a barrier
  says they sit in different basins. losses_only=True measures only the split losses (three
  likelihood passes instead of a whole evaluation), which is all the loss barriers need.

Barrier height of a curve f over t (endpoints t = 0 and t = 1 on the grid):
max_t [f(t) - ((1 - t) f(0) + t f(1))] for a loss (how far it rises above the straight
line), max_t [((1 - t) f(0) + t f(1)) - f(t)] for an accuracy (how far it dips below it).
The endpoints count, so a height is never negative: 0 means no barrier on the grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UsageError
from ..unlearning.data import UnlearningData
from ..unlearning.evaluation import evaluate, score_examples
from ..unlearning.objectives import transformer_blocks
from ._checks import check_eval_kwargs

# Metric name endings whose barrier is reported: losses rise, accuracies dip.
LOSS_METRICS = ("/loss",)
ACCURACY_METRICS = ("/qa_accuracy", "/choice_accuracy")


def _matched_parameters(original: torch.nn.Module, unlearned: torch.nn.Module
                        ) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, original parameter, unlearned parameter) for every parameter, after checking that the models match."""
    theirs = dict(unlearned.named_parameters())
    ours = dict(original.named_parameters())
    if ours.keys() != theirs.keys():
        missing = sorted(ours.keys() ^ theirs.keys())
        raise UsageError(f"the two models have different parameters (e.g. {missing[0]!r} is in only one); "
                         f"compare an unlearned model with the model it was unlearned from")
    for name, p in ours.items():
        if p.shape != theirs[name].shape:
            raise UsageError(f"parameter {name!r} has shape {tuple(p.shape)} in the original model and "
                             f"{tuple(theirs[name].shape)} in the unlearned one; compare models of one architecture")
    return [(name, p, theirs[name]) for name, p in ours.items()]


def weight_distance(original: torch.nn.Module, unlearned: torch.nn.Module) -> dict[str, Any]:
    """L2 distances between the two models' parameters (float64 sums).

    Returns {"total": ||theta_u - theta_o||, "relative": total / ||theta_o||, "per_layer":
    {"0": distance within block 0, ..., "other": embeddings, final norm, LM head}}; block
    keys are the block's index as a string (JSON keys), and the squares of the per-layer
    values add up to the square of the total.
    """
    pairs = _matched_parameters(original, unlearned)
    block_of = {id(p): str(i) for i, block in enumerate(transformer_blocks(original)) for p in block.parameters()}
    squares: dict[str, float] = {str(i): 0.0 for i in range(len(transformer_blocks(original)))}
    squares["other"] = 0.0
    norm = 0.0
    with torch.no_grad():
        for _, p, q in pairs:
            a, b = p.double(), q.to(p.device).double()
            squares[block_of.get(id(p), "other")] += (b - a).square().sum().item()
            norm += a.square().sum().item()
    total = math.sqrt(sum(squares.values()))
    relative = total / math.sqrt(norm) if norm > 0 else (0.0 if total == 0 else math.inf)
    return {"total": total, "relative": relative,
            "per_layer": {key: math.sqrt(value) for key, value in squares.items()}}


def interpolate(original: torch.nn.Module, unlearned: torch.nn.Module, t: float) -> torch.nn.Module:
    """A copy of the original model with parameters (1 - t) theta_o + t theta_u (computed in float32).

    t = 0 and t = 1 give the two models' parameters exactly; t outside [0, 1] extrapolates.
    Buffers are the original model's.
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise UsageError(f"t must be a finite number (0: the original model, 1: the unlearned one), got {t!r}")
    pairs = _matched_parameters(original, unlearned)
    mixed = copy.deepcopy(original)
    parameters = dict(mixed.named_parameters())
    with torch.no_grad():
        for name, p, q in pairs:
            parameters[name].copy_((1 - t) * p.float() + t * q.to(p.device).float())
    return mixed


def barrier_height(ts: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """The barrier of a curve (module docstring): a loss's rise above, or an accuracy's dip below, the line."""
    ts, values = [float(t) for t in ts], [float(v) for v in values]
    if len(ts) != len(values):
        raise UsageError(f"{len(ts)} values of t but {len(values)} metric values; give one value per t")
    if 0.0 not in ts or 1.0 not in ts:
        raise UsageError(f"the barrier needs the endpoints t = 0 and t = 1 on the grid, got {ts}")
    start, end = values[ts.index(0.0)], values[ts.index(1.0)]
    sign = -1.0 if higher_is_better else 1.0
    return max(sign * (v - ((1 - t) * start + t * end)) for t, v in zip(ts, values))


def split_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, *,
                 batch_size: int = 16, max_length: int | None = None, **_: Any) -> dict[str, float]:
    """SPLIT/loss of `evaluate` (the mean answer-token NLL of each split's train examples), alone."""
    losses = {}
    for name, split in (("forget", data.forget), ("retain", data.retain), ("holdout", data.holdout)):
        if split is not None and split.train:
            scores = score_examples(model, tokenizer, split.train, batch_size=batch_size, max_length=max_length)
            losses[f"{name}/loss"] = -sum(s.log_probs.double().sum().item() for s in scores) \
                / sum(s.log_probs.numel() for s in scores)
    return losses


def mode_connectivity(original: torch.nn.Module, unlearned: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      data: UnlearningData, ts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                      losses_only: bool = False, **eval_kwargs: Any) -> dict[str, Any]:
    """`evaluate` (losses_only: `split_losses`) at each t of the grid on the interpolated model, and the
    barrier heights; `original` and `unlearned` may be any two models of one architecture.

    eval_kwargs go to `evaluate` (batch_size, max_length, k, retain_model). Returns {"t": [...],
    "metrics": [the metrics per t], "barrier": {metric: height}} with a barrier for the forget
    and retain losses and accuracies that were measured.
    """
    check_eval_kwargs(eval_kwargs)
    measure = split_losses if losses_only else evaluate
    ts = list(ts)
    if not ts or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in ts):
        raise UsageError(f"ts must be finite numbers including 0 and 1, got {ts}")
    if len(set(ts)) != len(ts) or 0 not in ts or 1 not in ts:
        raise UsageError(f"ts must hold distinct values including the endpoints 0 and 1, got {ts}")
    _matched_parameters(original, unlearned)
    metrics = []
    for t in ts:
        model = interpolate(original, unlearned, t)
        metrics.append(measure(model, tokenizer, data, **eval_kwargs))
        del model  # one interpolated copy in memory at a time
    barrier = {}
    for key in metrics[0]:
        if key.split("/")[0] not in ("forget", "retain"):
            continue
        if key.endswith(LOSS_METRICS) or key.endswith(ACCURACY_METRICS):
            barrier[key] = barrier_height(ts, [m[key] for m in metrics],
                                          higher_is_better=key.endswith(ACCURACY_METRICS))
    return {"t": [float(t) for t in ts], "metrics": metrics, "barrier": barrier}

