"""The unlearning loop: an objective, an optimizer by name, forget and retain batches, periodic
evaluation, checkpoints, metrics and a report.

    result = unlearn(model, tokenizer, data, LoopConfig(objective="npo", optimizer="hybrid",
                                                        lr=1e-4, steps=200), run_dir="runs/npo")

The loop steps on each split's texts and question/answer pairs (`trainable`). Step s
(from 0) takes forget batch s and, when the objective has a retain term, retain batch
s of their own seeded `Batches` (their own epochs: a small forget set cycles while the
retain set goes on), so the data of a step depends only on the seed and s. The model runs
in eval mode (dropout off: a zeroth-order difference needs both passes to see the same
network) unless `train_mode`. Examples are truncated to max_length, or to the model's
context (`batches.fit_to_context`: the prompt kept, the answer cut, one warning). The
objective is prepared (NPO's reference log-likelihoods, RMU's frozen activations) on the
model as passed in, before any step and before a checkpoint is loaded, so a resumed run
must be given the same starting model.

Everything is checked before the run directory is created or the model is changed: the
configuration, the optimizer's options, the data against the context, and on resume the
run's record and its newest checkpoint (checksums, step, fingerprints, fit).

The run directory (all files atomic, `report.json` written last):
    config.json          what was run and the fingerprints of what it depends on (`run_fingerprints`)
    metrics.jsonl        one record per step ("train") and per evaluation ("eval", step 0 = before)
    checkpoints/step-N/  the newest checkpoint (checkpoint.py), every `checkpoint_every` steps
    model/               the unlearned model and tokenizer (save_pretrained, safetensors)
    report.json, report.md, loss.png, metrics.png
A directory without report.json is an unfinished run: `resume=True` continues it from its
newest checkpoint, bit-identically, and refuses (one line, naming the difference) when the
configuration, the starting model, the data, the thread count, the device or the zounlearn
or torch version differ, or the checkpoint is incomplete or corrupt.

The steps are a short loop (`_Run.train`) over the callbacks of callbacks.py, in the manner
of transformers' TrainerCallback: each sees the `LoopState` after a step and may set flags on
a `Control` (evaluate, checkpoint, stop), which the loop then acts on: the metrics log, the
progress bar, the evaluation and checkpoint schedules, the interrupt check and the
divergence guard. The optimizer step itself is `_step`.

Micro-batches (gradient_accumulation_steps k): each step's forget and retain batches are split
into k micro-batches of consecutive rows at the batch's padded width (`Batch.split`; fewer
when a batch has fewer than k examples), and the objective returns each one's share of the
step's loss, its means divided by the whole batches' counts (objectives.StepCounts), so the
shares sum to the one-batch loss up to rounding. A first-order step backpropagates each
micro-batch in turn and updates once; a zeroth-order step's closure sums the shares, so every
query evaluates all of them under one perturbation. SophiaG's Hessian estimate comes from the
last micro-batch's forget rows. k = 1 is the unsplit step, bit for bit.

Interrupts (signals.py): SIGINT (Ctrl-C) and SIGTERM during an optimizer step stop the run
after that step; at any other moment (evaluations, the final save) they stop it at once.
Either way the loop writes a checkpoint of the last completed step (also with
checkpoint_every 0) before it raises `Interrupted` (a KeyboardInterrupt), so `resume=True`
continues; a second signal during a step stops at once, keeping the checkpoint before.

Divergence: a non-finite loss on callbacks.DIVERGED_AFTER consecutive steps, or a non-finite
trained weight when an evaluation, a checkpoint or the end is due, stops the run with
`Diverged` (nothing written after it: the last good checkpoint stays, no report, no model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..atomic import atomic_dir
from ..checks import check_bool, check_int
from ..errors import UsageError
from ..optim import HybridFOZO, gnb_loss
from ..optim import step as take_step
from ..optim.base import loss_value, precision
from ..optim.first_order import FirstOrderOptimizer
from ..optim.hybrid import takes_zeroth_order_step
from ..optim.registry import OPTIMIZERS, make_optimizer
from .activations import activation_checkpointing
from .batches import Batch, Batches, fit_to_context, model_device, model_mode, rng_devices
from .callbacks import (
    Callback,
    CheckpointSchedule,
    Control,
    Diverged,
    DivergenceGuard,
    EvaluationSchedule,
    InterruptCheck,
    LoopState,
    MetricsLog,
    Progress,
)
from .checkpoint import checkpoint_steps, load_weights, save_checkpoint
from .data import Example, Split, UnlearningData
from .evaluation import evaluate
from .objectives import Objective, StepCounts, make_objective
from .report import jsonable, write_report
from .rundir import METRICS, open_run_dir, run_fingerprints
from .signals import Interrupted, Interrupts

MODEL_DIR = "model"
CUSTOM = "custom"
LR_MAX = torch.finfo(torch.float32).max  # optimizers compute in float32: a larger rate overflows at the first step


@dataclass
class LoopConfig:
    """Everything that decides what a run computes (config.json holds it).

    optimizer: a name of `OPTIMIZERS`, or "custom" with `unlearn(..., optimizer_factory=...)`.
    steps, or else epochs over the forget set (1 by default). lr None: the optimizer's
    default (`zounlearn.optim.registry.OPTIMIZERS`). eval_every / checkpoint_every 0: only
    before and after / only at interrupts. max_length: truncation of each example in tokens
    (None: the model's context). gradient_accumulation_steps: micro-batches per step (module
    docstring), at most batch_size (and retain_batch_size).
    """

    objective: str = "npo"
    optimizer: str = "hybrid"
    lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    retain_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_length: int | None = None
    eval_every: int = 0
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    seed: int = 0
    train_mode: bool = False
    activation_checkpointing: bool = False  # first-order steps recompute each layer in backward (activations.py)
    objective_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "checkpoint_every", "seed"):
            check_int(name, getattr(self, name), 0)
        for name in ("steps", "retain_batch_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 2)
        for name in ("batch_size", "retain_batch_size"):
            size = getattr(self, name)
            if size is not None and self.gradient_accumulation_steps > size:
                raise UsageError(f"gradient_accumulation_steps {self.gradient_accumulation_steps} is more than "
                                 f"{name} {size}: a micro-batch would have no example; use at most {size}")
        check_bool("train_mode", self.train_mode)
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give steps or epochs, not both")
        if self.epochs is not None and not (_number(self.epochs) and 0 < self.epochs < math.inf):
            raise UsageError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.lr is not None and not (_number(self.lr) and 0 <= self.lr <= LR_MAX):
            raise UsageError(f"lr must be a number from 0 to {LR_MAX:.3g} (float32's largest), got {self.lr!r}")
        if not isinstance(self.objective, str) or not isinstance(self.optimizer, str):
            raise UsageError("objective and optimizer are names, e.g. objective='npo', optimizer='hybrid'")
        if self.optimizer.lower() not in OPTIMIZERS and self.optimizer != CUSTOM:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}, or "
                             f"{CUSTOM!r} with unlearn(..., optimizer_factory=...)")
        for name in ("objective_options", "optimizer_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise UsageError(f"{name} must be a mapping of option names to values, got {getattr(self, name)!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise UsageError(f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        self.objective_instance()  # unknown name or option: fail now

    def objective_instance(self) -> Objective:
        # objectives.py raises ValueError and TypeError for bad names and hyperparameters: bad input all the same.
        try:
            return make_objective(self.objective, **self.objective_options)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None

    def total_steps(self, forget_batches: int) -> int:
        return self.steps if self.steps is not None else math.ceil((self.epochs or 1) * forget_batches)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunResult:
    before: dict[str, float]  # empty when no evaluation before unlearning was recorded
    after: dict[str, float]
    steps: int
    seconds: float  # training time of this call, evaluations excluded
    run_dir: Path | None


def unlearn(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData, config: LoopConfig,
            run_dir: str | os.PathLike | None = None, *, resume: bool = False, progress: bool = True,
            save_model: bool = True, meta: Mapping[str, Any] | None = None,
            optimizer_factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
            eval_data: UnlearningData | None = None) -> RunResult:
    """Unlearn data.forget from model in place (see the module docstring); returns before/after metrics.

    meta: a description of the model and data (names, paths) recorded in config.json and the report.
    optimizer_factory: with config.optimizer "custom", builds any torch.optim optimizer from the
    parameter list, e.g. `lambda ps: torch.optim.RMSprop(ps, lr=1e-4)` (config.lr is then unused).
    eval_data: what the evaluations measure, when not `data` (a subset, say).
    """
    for name, flag in (("resume", resume), ("progress", progress), ("save_model", save_model)):
        check_bool(name, flag)
    if (config.optimizer == CUSTOM) != (optimizer_factory is not None):
        raise UsageError(f"pass optimizer_factory exactly when config.optimizer is {CUSTOM!r} (got optimizer "
                         f"{config.optimizer!r} and {'a' if optimizer_factory else 'no'} factory)")
    objective = config.objective_instance()
    if objective.needs_retain and not data.retain.train:
        raise UsageError(f"{objective.name} has a retain term but the retain set has no texts or question/answer "
                         f"pairs; give a retain set, or set its weight to 0")
    limit = fit_to_context(model, tokenizer, [data, eval_data or data], config.max_length)
    forget = Batches(trainable(data.forget), tokenizer, config.batch_size, seed=config.seed, max_length=limit)
    retain = Batches(trainable(data.retain), tokenizer, config.retain_batch_size or config.batch_size,
                     seed=config.seed + 1, max_length=limit) if objective.needs_retain else None
    total = config.total_steps(len(forget))
    try:  # objectives.py raises ValueError for a model that does not fit (RMU's layer): bad input
        params = objective.parameters(model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    optimizer = optimizer_factory(params) if optimizer_factory is not None else \
        make_optimizer(config.optimizer, params, lr=config.lr, seed=config.seed, total_steps=total, model=model,
                       **config.optimizer_options)
    fingerprints = run_fingerprints(model, data, eval_data)
    record = {"loop": dataclasses.asdict(config), "total_steps": total, "meta": dict(meta or {}),
              "fingerprints": fingerprints}
    directory, checkpoint = open_run_dir(run_dir, record, resume, model) if run_dir is not None else (None, None)

    run = _Run(model, tokenizer, objective, optimizer, params, forget, retain, config, total, directory, record,
               eval_data or data, limit)
    with Interrupts() as interrupts:
        try:
            objective.prepare(model, forget, retain)  # in the caller's mode and random stream, as ever
        except Interrupted as stop:
            raise run.stopped(stop) from None
        # A checkpoint that a signal calls for is written inside the forked stream, whose state it keeps.
        with torch.random.fork_rng(devices=rng_devices(model)), model_mode(model, config.train_mode), \
                activation_checkpointing(model, config.activation_checkpointing):
            try:
                torch.manual_seed(config.seed)
                if checkpoint is not None:
                    run.restore(*checkpoint)
                run.train(interrupts, progress)
                before, after = run.finish(save_model, optimizer_factory is not None)
            except Interrupted as stop:
                raise run.stopped(stop) from None
            except Diverged as diverged:
                raise Diverged(f"{diverged}; {run.kept()}; lower the learning rate and start a new run") from None
    return RunResult(before, after, total, run.seconds, directory)


def trainable(split: Split) -> tuple[Example, ...]:
    """What the loop steps on: the split's texts and question/answer pairs (train, then the qa not in it)."""
    seen = set(split.train)
    return split.train + tuple(e for e in split.qa if e not in seen)


# --- the run


class _Run:
    """One call of `unlearn` once everything is checked: the steps, the evaluations, the checkpoints, the end."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, objective: Objective,
                 optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], forget: Batches,
                 retain: Batches | None, config: LoopConfig, total: int, directory: Path | None,
                 record: dict[str, Any], eval_data: UnlearningData, limit: int | None) -> None:
        self.model, self.tokenizer, self.objective, self.optimizer = model, tokenizer, objective, optimizer
        self.forget, self.retain, self.config, self.directory = forget, retain, config, directory
        self.record, self.eval_data, self.limit = record, eval_data, limit
        self.state = LoopState(total=total)
        self.guard = DivergenceGuard(params)
        self.schedule = EvaluationSchedule(config.eval_every)
        self.seconds = 0.0
        self.callbacks: list[Callback] = []

    def restore(self, step: int, saved: dict[str, Any]) -> None:
        """A verified checkpoint into the optimizer, the random streams and, last, the model."""
        self.state.consistent = False
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng_cpu"])
        cuda = rng_devices(self.model)
        if cuda:
            torch.cuda.set_rng_state(saved["rng_cuda"], cuda[0])
        load_weights(self.directory, step, self.model)
        self.state.step, self.state.elapsed, self.state.records = step, saved["elapsed"], list(saved["metrics"])
        self.state.evals = {r["step"]: r["metrics"] for r in self.state.records if r["type"] == "eval"}
        self.state.consistent = True

    def train(self, interrupts: Interrupts, progress: bool) -> None:
        state, control = self.state, Control()
        log = MetricsLog(self.directory / METRICS if self.directory else None, state, len(self.forget))
        bar = Progress(state, f"{self.config.objective} / {self.config.optimizer}", progress)
        # The order matters: the schedules set flags, the interrupt check may clear one, the guard reads them.
        self.callbacks = [log, bar, self.schedule, CheckpointSchedule(self.config.checkpoint_every),
                          InterruptCheck(interrupts), self.guard]
        with bar.bar:
            if self.schedule.due(state) and state.step not in state.evals:  # before; or one a stop cut short
                self.evaluate()
            for step in range(state.step, state.total):
                control.new_step()
                forget, retain = self.forget.batch(step), self.retain.batch(step) if self.retain else None
                counts = StepCounts.of(forget, retain)
                micro = _micro_batches(forget, retain, self.config.gradient_accumulation_steps)
                shares = [functools.partial(self.objective, self.model, f, r, counts) for f, r in micro]
                with interrupts.deferred():
                    state.consistent = False
                    tick = time.perf_counter()
                    loss = _step(self.optimizer, shares, functools.partial(_gnb, self.model, micro[-1][0]))
                    self._advance(loss, time.perf_counter() - tick)
                for callback in self.callbacks:
                    callback.on_step_end(state, control)
                if control.evaluate:
                    self.evaluate()
                if control.checkpoint:
                    self.checkpoint()
                if control.stop:
                    raise Interrupted(signum=interrupts.received[0])

    def _advance(self, loss: float, took: float) -> None:
        state = self.state
        state.step, state.loss, state.took = state.step + 1, loss, took
        state.phase = getattr(self.optimizer, "last_phase", None)
        state.lr = self.optimizer.param_groups[0].get("lr")
        state.elapsed += took
        self.seconds += took
        state.consistent = True

    def evaluate(self) -> None:
        metrics = evaluate(self.model, self.tokenizer, self.eval_data, batch_size=self.config.eval_batch_size,
                           max_length=self.limit)
        self.state.evals[self.state.step] = metrics
        for callback in self.callbacks:
            callback.on_evaluate(self.state, metrics)

    def checkpoint(self) -> None:
        if self.directory is None:
            return
        saved = {"optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(), "step": self.state.step,
                 "elapsed": self.state.elapsed, "metrics": self.state.records}
        cuda = rng_devices(self.model)
        if cuda:
            saved["rng_cuda"] = torch.cuda.get_rng_state(cuda[0])
        save_checkpoint(self.directory, self.state.step, self.model, saved, fingerprints=self.record["fingerprints"])

    def finish(self, save_model: bool, custom: bool) -> tuple[dict[str, float], dict[str, float]]:
        """The before/after metrics; with a run directory, the model and the report (written last)."""
        state = self.state
        before, after = state.evals.get(0, {}), state.evals[state.total]
        if self.directory is not None:
            if save_model:
                _save_model(self.model, self.tokenizer, self.directory / MODEL_DIR)
            summary = {"steps": state.total, "train_seconds": round(state.elapsed, 2),
                       "steps_per_second": round(state.total / state.elapsed, 3) if state.elapsed else None,
                       "optimizer": type(self.optimizer).__name__,
                       "optimizer_grade": CUSTOM if custom else OPTIMIZERS[self.config.optimizer.lower()].grade,
                       "trainable_parameters": sum(p.numel() for p in self.guard.params),
                       "precision": precision(self.optimizer)}
            write_report(self.directory, config=jsonable(self.record), before=before, after=after,
                         history=state.records, summary=summary)
        return before, after

    def kept(self) -> str:
        steps = checkpoint_steps(self.directory) if self.directory is not None else []
        return f"its newest checkpoint, step {steps[-1]}, is kept" if steps else "no checkpoint was written"

    def stopped(self, stop: Interrupted) -> Interrupted:
        """After a signal: a checkpoint of the last completed step when there is none, and what to tell the user."""
        state, name = self.state, signal.Signals(stop.signum).name
        if self.directory is None:
            return Interrupted(f"{name} after step {state.step}; without a run directory nothing was kept", stop.signum)
        steps = checkpoint_steps(self.directory)
        if state.consistent and state.step > 0 and (not steps or steps[-1] != state.step):
            if not self.guard.weights_finite():
                return Interrupted(f"{name} after step {state.step}, whose weights are not finite: no checkpoint "
                                   f"written", stop.signum)
            print(f"\nwriting a checkpoint of step {state.step} (a further signal abandons it)", file=sys.stderr,
                  flush=True)
            self.checkpoint()
            steps = [state.step]
        kept = f"resume continues from step {steps[-1]}" if steps else "resume starts again from step 0"
        return Interrupted(f"{name} after step {state.step}; {kept}", stop.signum)


def _micro_batches(forget: Batch, retain: Batch | None, k: int) -> list[tuple[Batch, Batch | None]]:
    """The step's (forget, retain) pairs of micro-batches: as many as the smaller batch allows, up to k."""
    n = min(k, len(forget), len(retain) if retain is not None else k)
    return list(zip(forget.split(n), retain.split(n) if retain is not None else [None] * n))


def _step(optimizer: torch.optim.Optimizer, shares: list[Callable[[], torch.Tensor]],
          hessian_closure: Callable[[], torch.Tensor]) -> float:
    """One step of any optimizer on the sum of the micro-batches' shares of the loss (module docstring);
    returns the loss at the parameters before it."""
    *earlier, last = shares
    if takes_zeroth_order_step(optimizer):
        def closure() -> torch.Tensor:  # under one perturbation per call: each query sees every micro-batch
            total = shares[0]()
            for share in shares[1:]:
                total = total + share()
            return total
    else:
        inner = optimizer.fo if isinstance(optimizer, HybridFOZO) else optimizer
        if isinstance(inner, FirstOrderOptimizer):
            # It may update inside backward: accumulate() keeps the earlier micro-batches' gradients for the
            # step's own backward, which then adds the last one's and updates once.
            optimizer.zero_grad(set_to_none=True)
            with inner.accumulate():
                before = _backward_each(earlier)

            def closure() -> torch.Tensor:
                return _plus(last(), before)
        else:
            def closure() -> torch.Tensor:  # torch's step sets the gradients to None before it calls the closure
                return _plus(last(), _backward_each(earlier))
    closure.hessian_closure = hessian_closure  # type: ignore[attr-defined]  # what SophiaG refreshes its estimate from
    return take_step(optimizer, closure)


def _backward_each(shares: list[Callable[[], torch.Tensor]]) -> float | None:
    """Backpropagate each share in turn (their gradients add up in .grad); the sum of their values (None: none)."""
    if not shares:
        return None
    total = 0.0
    with torch.enable_grad():
        for share in shares:
            loss = share()
            loss.backward()
            total += loss_value(loss)
    return total


def _plus(loss: torch.Tensor, before: float | None) -> torch.Tensor:
    """The step's loss: the last share plus the earlier ones' values, which carry no gradient (already
    backpropagated); a non-finite earlier share makes it non-finite, so the optimizer skips the whole step."""
    return loss if before is None else loss + before


def _gnb(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Sophia's Hessian-estimate loss on the real tokens of a forget batch."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return gnb_loss(logits[batch.attention_mask.bool()])


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, final: Path) -> None:
    with atomic_dir(final) as work:
        model.save_pretrained(work)  # safetensors
        tokenizer.save_pretrained(work)


