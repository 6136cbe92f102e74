"""The unlearning loop: an objective, an optimizer by name, forget and retain batches, periodic
evaluation, checkpoints, metrics and a report.

    result = unlearn(model, tokenizer, data, LoopConfig(objective="npo", optimizer="hybrid",
                                                        lr=1e-4, steps=200), run_dir="runs/npo")

The loop steps on each split's texts and question/answer pairs (`trainable`). Step s
(from 0) takes forget batch s and, when the objective has a retain term, retain batch
s of their own seeded `Batches` (their own epochs: a small forget set cycles while the
retain set goes on), so the data of a step depends only on the seed and s. The model runs
in eval mode (dropout off: a zeroth-order difference needs both passes to see the same
network) unless `train_mode`. The objective is prepared (NPO's reference log-likelihoods,
RMU's frozen activations) on the model as passed in, before any step and before a
checkpoint is loaded, so a resumed run must be given the same starting model (checked by
a fingerprint).

The run directory (all files atomic, `report.json` written last):
    config.json          what was run; a resume must match it
    metrics.jsonl        one record per step ("train") and per evaluation ("eval", step 0 = before)
    checkpoints/step-N/  the newest checkpoint (checkpoint.py), every `checkpoint_every` steps
    model/               the unlearned model and tokenizer (save_pretrained, safetensors)
    report.json, report.md, loss.png, metrics.png
A directory without report.json is an unfinished run: `resume=True` continues it from its
newest checkpoint, bit-identically. Ctrl-C stops at the end of the current step, writes a
checkpoint and raises KeyboardInterrupt; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..atomic import atomic_dir, write_json, write_text
from ..checks import check_int
from ..optim import gnb_loss
from ..optim import step as take_step
from ..optim.registry import OPTIMIZERS, make_optimizer
from .activations import activation_checkpointing
from .batches import Batch, Batches, model_device, model_mode, rng_devices
from .checkpoint import checkpoint_steps, load_checkpoint, save_checkpoint
from .data import Example, Split, UnlearningData
from .evaluation import evaluate
from .objectives import Objective, make_objective
from .report import jsonable, read_metrics, write_report

CONFIG, METRICS, REPORT, MODEL_DIR = "config.json", "metrics.jsonl", "report.json", "model"
CUSTOM = "custom"


@dataclass
class LoopConfig:
    """Everything that decides what a run computes (config.json holds it).

    optimizer: a name of `OPTIMIZERS`, or "custom" with `unlearn(..., optimizer_factory=...)`.
    steps, or else epochs over the forget set (1 by default). lr None: the optimizer's
    default (`zounlearn.optim.registry.OPTIMIZERS`). eval_every / checkpoint_every 0: only
    before and after / only at interrupts. max_length: truncation of each example in tokens.
    """

    objective: str = "npo"
    optimizer: str = "hybrid"
    lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    retain_batch_size: int | None = None
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
        for name in ("batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "checkpoint_every", "seed"):
            check_int(name, getattr(self, name), 0)
        for name in ("steps", "retain_batch_size", "max_length"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and 0 < self.epochs < math.inf):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 <= self.lr < math.inf):
            raise ValueError(f"lr must be a number >= 0, got {self.lr!r}")
        if not isinstance(self.objective, str) or not isinstance(self.optimizer, str):
            raise ValueError("objective and optimizer are names, e.g. objective='npo', optimizer='hybrid'")
        if self.optimizer.lower() not in OPTIMIZERS and self.optimizer != CUSTOM:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}, or "
                             f"{CUSTOM!r} with unlearn(..., optimizer_factory=...)")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        make_objective(self.objective, **self.objective_options)  # unknown name or option: fail now

    def total_steps(self, forget_batches: int) -> int:
        return self.steps if self.steps is not None else math.ceil((self.epochs or 1) * forget_batches)


@dataclass
class RunResult:
    before: dict[str, float]
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
    if (config.optimizer == CUSTOM) != (optimizer_factory is not None):
        raise ValueError(f"pass optimizer_factory exactly when config.optimizer is {CUSTOM!r} (got optimizer "
                         f"{config.optimizer!r} and {'a' if optimizer_factory else 'no'} factory)")
    objective = make_objective(config.objective, **config.objective_options)
    if objective.needs_retain and not data.retain.train:
        raise ValueError(f"{objective.name} has a retain term but the retain set has no texts or question/answer "
                         f"pairs; give a retain set, or set its weight to 0")
    forget = Batches(trainable(data.forget), tokenizer, config.batch_size, seed=config.seed,
                     max_length=config.max_length)
    retain = Batches(trainable(data.retain), tokenizer, config.retain_batch_size or config.batch_size,
                     seed=config.seed + 1, max_length=config.max_length) if objective.needs_retain else None
    total = config.total_steps(len(forget))
    params = objective.parameters(model)
    optimizer = optimizer_factory(params) if optimizer_factory is not None else \
        make_optimizer(config.optimizer, params, lr=config.lr, seed=config.seed, total_steps=total,
                       **config.optimizer_options)
    record = {"loop": dataclasses.asdict(config), "total_steps": total, "meta": dict(meta or {}),
              "model_fingerprint": fingerprint(model)}
    directory = _open_run_dir(run_dir, record, resume) if run_dir is not None else None

    objective.prepare(model, forget, retain)
    start, history = 0, []
    cuda = rng_devices(model)
    with torch.random.fork_rng(devices=cuda), model_mode(model, config.train_mode), \
            activation_checkpointing(model, config.activation_checkpointing):
        torch.manual_seed(config.seed)
        if directory is not None and resume and checkpoint_steps(directory):
            start, state = load_checkpoint(directory, model)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if cuda:
                torch.cuda.set_rng_state(state["rng_cuda"], cuda[0])
            history = [r for r in read_metrics(directory / METRICS) if r["step"] <= start]
        log = _MetricsLog(directory, history)
        evaluate_now = lambda: evaluate(model, tokenizer, eval_data or data, batch_size=config.eval_batch_size,  # noqa: E731
                                        max_length=config.max_length)
        if start == 0:
            log.eval(0, evaluate_now(), 0.0)
        seconds = _train(model, objective, optimizer, forget, retain, config, start, total, log, evaluate_now,
                         directory, progress)
        if log.last_eval_step != total:
            log.eval(total, evaluate_now(), log.elapsed)
    before, after = log.evals[0], log.evals[-1]
    if directory is not None:
        if save_model:
            _save_model(model, tokenizer, directory / MODEL_DIR)
        summary = {"steps": total, "train_seconds": round(log.elapsed, 2),
                   "steps_per_second": round(total / log.elapsed, 3) if log.elapsed else None,
                   "optimizer": type(optimizer).__name__,
                   "optimizer_grade": OPTIMIZERS[config.optimizer.lower()].grade if config.optimizer != CUSTOM
                   else CUSTOM,
                   "trainable_parameters": sum(p.numel() for p in params)}
        write_report(directory, config=record, before=before, after=after, history=log.records, summary=summary)
    return RunResult(before, after, total, seconds, directory)


def trainable(split: Split) -> tuple[Example, ...]:
    """What the loop steps on: the split's texts and question/answer pairs (train, then the qa not in it)."""
    seen = set(split.train)
    return split.train + tuple(e for e in split.qa if e not in seen)


def _train(model: torch.nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, forget: Batches,
           retain: Batches | None, config: LoopConfig, start: int, total: int, log: _MetricsLog,
           evaluate_now: Any, directory: Path | None, progress: bool) -> float:
    seconds = 0.0
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{config.objective} / {config.optimizer}")
    with bar, _graceful_interrupt() as interrupted:
        for step in range(start, total):
            forget_batch = forget.batch(step)
            retain_batch = retain.batch(step) if retain is not None else None
            tick = time.perf_counter()
            loss = _step(optimizer, model, objective, forget_batch, retain_batch)
            took = time.perf_counter() - tick
            seconds += took
            phase = getattr(optimizer, "last_phase", None)
            log.train(step + 1, (step + 1) / len(forget), loss, phase, optimizer.param_groups[0].get("lr"), took)
            bar.set_postfix({"loss": f"{loss:.4g}", **({"phase": phase} if phase else {})}, refresh=False)
            bar.update()
            if config.eval_every and (step + 1) % config.eval_every == 0:
                log.eval(step + 1, evaluate_now(), log.elapsed)
            stop = interrupted()
            if directory is not None and (stop or (config.checkpoint_every and (step + 1) % config.checkpoint_every
                                                   == 0 and step + 1 < total)):
                _checkpoint(directory, step + 1, model, optimizer)
            if stop:
                raise KeyboardInterrupt(f"stopped after step {step + 1}; resume=True continues from there")
    return seconds


def _step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, objective: Objective, forget: Batch,
          retain: Batch | None) -> float:
    """One step of any optimizer; returns the loss at the parameters before it."""

    def closure() -> torch.Tensor:
        return objective(model, forget, retain)

    closure.hessian_closure = lambda: _gnb(model, forget)  # what SophiaG refreshes its estimate from
    return take_step(optimizer, closure)


def _gnb(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sophia's Hessian-estimate loss on the real tokens of a forget batch."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return gnb_loss(logits[batch.attention_mask.bool()])


def _checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(), "step": step}
    cuda = rng_devices(model)
    if cuda:
        state["rng_cuda"] = torch.cuda.get_rng_state(cuda[0])
    save_checkpoint(directory, step, model, state)


class _MetricsLog:
    """metrics.jsonl, appended a line at a time (flushed: a crash loses at most the line being written)."""

    def __init__(self, directory: Path | None, history: list[dict[str, Any]]) -> None:
        self.records = list(history)
        self.evals = [r["metrics"] for r in history if r["type"] == "eval"]
        self.last_eval_step = max((r["step"] for r in history if r["type"] == "eval"), default=-1)
        self.elapsed = max((r["elapsed"] for r in history), default=0.0)
        self.path = directory / METRICS if directory is not None else None
        if self.path is not None:  # rewrite what a resume keeps, dropping the steps after its checkpoint
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))

    def train(self, step: int, epoch: float, loss: float, phase: str | None, lr: float | None, took: float) -> None:
        self.elapsed += took
        self._add({"type": "train", "step": step, "epoch": round(epoch, 4),
                   "loss": loss if math.isfinite(loss) else None, "phase": phase, "lr": lr,
                   "elapsed": round(self.elapsed, 4)})

    def eval(self, step: int, metrics: dict[str, float], elapsed: float) -> None:
        self.evals.append(metrics)
        self.last_eval_step = step
        self._add({"type": "eval", "step": step, "elapsed": round(elapsed, 4), "metrics": jsonable(metrics)})

    def _add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _open_run_dir(run_dir: str | os.PathLike, record: dict[str, Any], resume: bool) -> Path:
    """Create a fresh run directory, or check that a resumed one ran this same configuration."""
    directory = Path(run_dir)
    saved = directory / CONFIG
    if resume:
        if not saved.is_file():
            raise ValueError(f"cannot resume: {saved} does not exist; start the run without resume")
        previous = json.loads(saved.read_text())
        if previous != json.loads(json.dumps(record)):
            changed = sorted(k for k in record if previous.get(k) != json.loads(json.dumps(record[k])))
            raise ValueError(f"cannot resume {directory}: it ran another configuration (differs in "
                             f"{', '.join(changed)}); resume with the same settings and starting model")
        if (directory / REPORT).exists():
            raise ValueError(f"{directory} holds a finished run (report.json); choose a new run directory")
        return directory
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"the run directory {directory} exists and is not empty; choose a new one, or pass resume "
                         f"to continue the run in it")
    directory.mkdir(parents=True, exist_ok=True)
    write_json(saved, record)
    return directory


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of the parameters (names, shapes, dtypes and float64 sums): resume's sanity check."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = p.double().sum().item() if p.numel() else 0.0
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total!r};".encode())
    return digest.hexdigest()[:16]


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, final: Path) -> None:
    with atomic_dir(final) as work:
        model.save_pretrained(work)  # safetensors
        tokenizer.save_pretrained(work)


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[Any]:
    """The first Ctrl-C sets a flag the loop checks after each step; the second one raises at once.
    Left alone off the main thread and where SIGINT is ignored (a background job)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again to stop now)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)

