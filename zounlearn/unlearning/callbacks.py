"""The unlearning loop's callbacks, in the manner of transformers' TrainerCallback/TrainerControl.

After each optimizer step the loop (`loop._Run.train`) hands the `LoopState` to every callback's
`on_step_end`, in order; a callback may set flags on the `Control` (evaluate, checkpoint, stop),
which the loop then acts on, and sees each evaluation through `on_evaluate`:

- MetricsLog: metrics.jsonl, a record per step and per evaluation;
- Progress: the tqdm bar;
- EvaluationSchedule, CheckpointSchedule: evaluate before the first step, every eval_every
  steps and after the last; checkpoint every checkpoint_every steps;
- InterruptCheck: a signal received during the step stops the run after it, with a checkpoint;
- DivergenceGuard: DIVERGED_AFTER non-finite losses in a row, or a non-finite trained weight
  when anything is to be evaluated or written, raise Diverged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..errors import ZounlearnError
from .report import jsonable
from .signals import Interrupts

DIVERGED_AFTER = 3  # consecutive non-finite losses that end a run


class Diverged(ZounlearnError, RuntimeError):
    """The run's loss or weights stopped being finite; the message says when and what to do."""


@dataclass
class LoopState:
    """What the callbacks see: the steps completed and what the last one did."""

    total: int
    step: int = 0                          # steps completed
    loss: float = math.nan                 # of the last step, at the parameters before it
    phase: str | None = None               # the hybrid's "fo" or "zo"
    lr: float | None = None
    took: float = 0.0                      # seconds of the last step
    elapsed: float = 0.0                   # training seconds of the whole run, resumes included
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> metrics
    consistent: bool = True                # the model holds exactly the weights after `step` steps


@dataclass
class Control:
    """Flags the callbacks set for the loop to act on after a step (cleared before the next one)."""

    evaluate: bool = False
    checkpoint: bool = False
    stop: bool = False

    def new_step(self) -> None:
        self.evaluate = self.checkpoint = False


class Callback:
    """One concern of the loop. on_step_end may set flags on control; on_evaluate sees each evaluation."""

    def on_step_end(self, state: LoopState, control: Control) -> None:
        pass

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        pass


class MetricsLog(Callback):
    """metrics.jsonl, appended a line at a time (flushed: a crash loses at most the line being written)."""

    def __init__(self, path: Path | None, state: LoopState, batches_per_epoch: int) -> None:
        self.path, self.batches_per_epoch = path, batches_per_epoch
        if self.path is not None:  # what the state holds: a resume's records up to its checkpoint
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in state.records))

    def on_step_end(self, state: LoopState, control: Control) -> None:
        self._add(state, {"type": "train", "step": state.step,
                          "epoch": round(state.step / self.batches_per_epoch, 4), "loss": state.loss
                          if math.isfinite(state.loss) else None, "phase": state.phase, "lr": state.lr,
                          "elapsed": round(state.elapsed, 4)})

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        self._add(state, {"type": "eval", "step": state.step, "elapsed": round(state.elapsed, 4),
                          "metrics": jsonable(metrics)})

    def _add(self, state: LoopState, record: dict[str, Any]) -> None:
        state.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Progress(Callback):
    """A tqdm bar with the loss and, for the hybrid, the phase."""

    def __init__(self, state: LoopState, description: str, enabled: bool) -> None:
        self.bar = tqdm(total=state.total, initial=state.step, disable=not enabled, unit="step", dynamic_ncols=True,
                        desc=description)

    def on_step_end(self, state: LoopState, control: Control) -> None:
        self.bar.set_postfix({"loss": f"{state.loss:.4g}", **({"phase": state.phase} if state.phase else {})},
                             refresh=False)
        self.bar.update()


class EvaluationSchedule(Callback):
    """Evaluate before the first step, every `every` steps and after the last."""

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, state: LoopState) -> bool:
        return state.step in (0, state.total) or bool(self.every and state.step % self.every == 0)

    def on_step_end(self, state: LoopState, control: Control) -> None:
        control.evaluate = self.due(state)


class CheckpointSchedule(Callback):
    """A checkpoint every `every` steps (0: never), except after the last step (the run is then complete)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, state: LoopState, control: Control) -> None:
        control.checkpoint = bool(self.every and state.step % self.every == 0 and state.step < state.total)


class InterruptCheck(Callback):
    """A signal received during the step: checkpoint and stop (the evaluation due waits for the resume)."""

    def __init__(self, interrupts: Interrupts) -> None:
        self.interrupts = interrupts

    def on_step_end(self, state: LoopState, control: Control) -> None:
        if self.interrupts.received:
            control.stop = control.checkpoint = True
            control.evaluate = False


class DivergenceGuard(Callback):
    """Diverged after DIVERGED_AFTER non-finite losses in a row, or a non-finite weight before anything is
    evaluated or written (checked then only: it reads every trained weight)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params, self.streak = list(params), 0

    def on_step_end(self, state: LoopState, control: Control) -> None:
        self.streak = 0 if math.isfinite(state.loss) else self.streak + 1
        if self.streak >= DIVERGED_AFTER:
            raise Diverged(f"the run diverged: the loss was not finite for {self.streak} steps in a row (steps "
                           f"{state.step - self.streak + 1} to {state.step})")
        if (control.evaluate or control.checkpoint or state.step == state.total) and not self.weights_finite():
            raise Diverged(f"the run diverged: a trained weight is not finite after step {state.step}")

    def weights_finite(self) -> bool:
        with torch.no_grad():
            return bool(torch.stack([p.isfinite().all() for p in self.params]).all()) if self.params else True
