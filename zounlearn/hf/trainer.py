"""Every zounlearn optimizer inside an unmodified transformers Trainer, through the Trainer's own hooks.

    from zounlearn.hf import Trainer                       # instead of transformers.Trainer
    trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0),
                      train_dataset=data, optimizers=(AdaZO(model.parameters(), lr=1e-5), None))
    trainer.train()

or `Trainer(..., optimizer_name="hybrid", optimizer_options={"zo_lr": 1e-5})`, built by
create_optimizer; and for a Trainer subclass of one's own (open-unlearning's GradDiff or NPO,
which override compute_loss): `class GradDiffZO(TrainerMixin, GradDiff): pass`.

How a step runs (the Trainer's loop is not copied or forked):
- first-order steps (torch's optimizers, ours, the hybrid's first-order blocks) run as the
  Trainer runs any optimizer: its training_step backpropagates every micro-batch, it clips to
  max_grad_norm and calls optimizer.step(), which uses the summed gradients (`StepAdapter`);
  SophiaG refreshes its Hessian estimate from `hessian_loss` on the step's last micro-batch.
- zeroth-order steps (ours, the hybrid's zeroth-order blocks): training_step keeps the step's
  micro-batches and, at the last one, steps the optimizer on a closure that sums their losses,
  each computed and scaled as the Trainer's training_step does (compute_loss, then / the
  accumulation steps unless normalised by num_items_in_batch). The optimizer perturbs once per
  direction and calls the closure, so every micro-batch of a step sees the same perturbation of
  the same seed: accumulation is exact, the estimate that of one batch of all of them. The
  losses run in eval mode (dropout off: both sides of a difference must see one network), under
  no_grad; with several processes their mean over processes is taken, so that every replica
  takes the same step. Micro-batches 1 to k-1 return a loss of 0 and the last the step's, so
  the logged loss is the step's (the mean of its perturbed losses, as the optimizer returns it).
- an optimizer that updates inside backward (the hybrid presets' first-order phase, in_backward=True)
  keeps its gradients under the Trainer, which backpropagates every micro-batch and clips before
  it steps: the Trainer's semantics, at the normal path's gradient memory.
- max_grad_norm (TrainingArguments, 1.0 by default) is honoured for first-order steps, refused
  for zeroth-order optimizers (a ZO step has no gradient: pass max_grad_norm=0); the hybrid
  clips its first-order steps, and warns that its zeroth-order steps have nothing to clip.
  The grad_norm the Trainer logs for a zeroth-order step is 0: there are no gradients.
- the Trainer's LR scheduler, logging, evaluation, callbacks and checkpoints work as they are:
  optimizer.pt holds our state dict (with the ZO optimizers' seed and count of directions
  drawn), so resume_from_checkpoint continues bit-identically.
DeepSpeed and FSDP shard the parameters, which the ZO perturbation lays end to end: refused.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import torch
import transformers

from ..errors import UsageError
from ..optim import HybridFOZO, SophiaG, ZeroOrderOptimizer, gnb_loss
from ..optim.base import loss_value
from ..optim.base import step as take_step
from ..optim.first_order import FirstOrderOptimizer
from ..optim.registry import OPTIMIZERS, check_optimizer_options, make_optimizer
from ..unlearning.batches import model_mode
from .stepping import StepAdapter, find_adapter, takes_zeroth_order_step


class TrainerMixin:
    """Put first in a transformers.Trainer subclass's bases; see the module docstring.

    optimizer_name / optimizer_options: build the optimizer in create_optimizer from
    zounlearn.optim.registry (`make_optimizer`), with lr = args.learning_rate, seed = args.seed,
    the Trainer's weight-decay groups (args.weight_decay on all but biases and norms) and, for the
    hybrid, total_steps = the run's max_steps (its schedule ends on a zeroth-order block).
    """

    def __init__(self, *args: Any, optimizer_name: str | None = None,
                 optimizer_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = dict(optimizer_options or {})
        if optimizer_name is None and options:
            raise UsageError("optimizer_options without optimizer_name: name the zounlearn optimizer they are for, "
                             "e.g. optimizer_name='adazo'")
        if optimizer_name is not None:
            if "weight_decay" in options:
                raise UsageError("weight_decay comes from TrainingArguments.weight_decay (the Trainer's decay "
                                 "groups); leave it out of optimizer_options")
            check_optimizer_options(optimizer_name, options)
            if kwargs.get("optimizers", (None, None))[0] is not None:
                raise UsageError("pass either optimizers=(optimizer, scheduler) or optimizer_name, not both")
        super().__init__(*args, **kwargs)
        self.optimizer_name, self.optimizer_options = optimizer_name, options
        self._micro_batches: list[tuple[Any, Any]] = []  # the zeroth-order step's, until its last

    # ---- the Trainer's hooks

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        self._micro_batches = []  # a run stopped inside a step leaves none to the next train()
        if self.optimizer is None and self.optimizer_name is not None:
            self.optimizer = self._build_optimizer(self.model if model is None else model)
        adapter = find_adapter(self.optimizer)
        if adapter is None:
            optimizer = super().create_optimizer(model)
            self._check_optimizer(optimizer)
            self.optimizer = StepAdapter(optimizer)
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        adapter = find_adapter(self.optimizer)
        if adapter is None:
            raise UsageError("the optimizer did not go through create_optimizer; train with trainer.train()")
        if not takes_zeroth_order_step(adapter.optimizer):
            if isinstance(adapter.optimizer, SophiaG):
                adapter.hessian_closure = functools.partial(self.hessian_loss, model, inputs)
            with _keeping_gradients(adapter.optimizer):
                return super().training_step(model, inputs, num_items_in_batch)
        self._micro_batches.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro_batches, self._micro_batches = self._micro_batches, []
        loss = take_step(adapter.optimizer, lambda: self._summed_loss(model, micro_batches))
        adapter.taken = True
        return torch.tensor(loss, device=self.args.device)

    def hessian_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """SophiaG's Hessian-estimate loss: `gnb_loss` on the logits of the real tokens of a
        micro-batch (its "forget" batch when the inputs nest one, as open-unlearning's do).
        Override it for other inputs."""
        batch = self._prepare_inputs(inputs.get("forget", inputs))
        mask = batch.get("attention_mask")
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        return gnb_loss(logits[mask.bool()] if mask is not None else logits)

    # ---- zeroth-order steps

    def _summed_loss(self, model: torch.nn.Module, micro_batches: list[tuple[Any, Any]]) -> float:
        """The step's loss: the sum of its micro-batches' losses, each as training_step scales it
        (in float64, in order), averaged over processes."""
        total = 0.0
        with model_mode(model, False):
            for inputs, num_items_in_batch in micro_batches:
                total += loss_value(self._micro_batch_loss(model, inputs, num_items_in_batch))
        if self.accelerator.num_processes > 1:
            total = float(self.accelerator.reduce(torch.tensor(total, dtype=torch.float64, device=self.args.device),
                                                  "mean"))
        return total

    def _micro_batch_loss(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
                          ) -> torch.Tensor:
        """The loss transformers' training_step backpropagates for this micro-batch (its rule, restated)."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    # ---- building and checking the optimizer

    def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        name, args = self.optimizer_name, self.args
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if OPTIMIZERS[name.lower()].cls is HybridFOZO:  # every preset (the name was checked in __init__)
            if args.weight_decay:
                raise UsageError(f"TrainingArguments.weight_decay={args.weight_decay}: the hybrid's phases take no "
                                 f"per-group weight decay; set zo_weight_decay in optimizer_options and "
                                 f"weight_decay=0")
            params: list[Any] = [p for _, p in trainable]
        else:
            decay = set(self.get_decay_parameter_names(model))
            params = [group for group in (
                {"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
                {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}) if group["params"]]
        total_steps = getattr(self.state, "max_steps", 0) or None
        return make_optimizer(name, params, lr=args.learning_rate, seed=args.seed, total_steps=total_steps,
                              **self.optimizer_options)

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse what cannot run, before the first step."""
        zeroth_order = isinstance(optimizer, (ZeroOrderOptimizer, HybridFOZO))
        name, clip = type(optimizer).__name__, self.args.max_grad_norm
        if zeroth_order and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise UsageError(f"{name} perturbs the parameters laid end to end, and DeepSpeed / FSDP shard them; "
                             f"train it without DeepSpeed and FSDP (data parallel works)")
        if isinstance(optimizer, ZeroOrderOptimizer) and clip and clip > 0:
            raise UsageError(f"TrainingArguments.max_grad_norm={clip} clips gradients, and {name} takes none (a "
                             f"zeroth-order step has only a scalar projected gradient); pass max_grad_norm=0")
        if isinstance(optimizer, HybridFOZO) and clip and clip > 0:
            warnings.warn(f"max_grad_norm={clip} clips HybridFOZO's first-order steps only; its zeroth-order steps "
                          f"have no gradient to clip (the Trainer logs their grad_norm as 0)", UserWarning,
                          stacklevel=3)


def _keeping_gradients(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """The Trainer backpropagates itself and clips afterwards: an optimizer (or a hybrid's first-order
    phase) that updates inside backward keeps its gradients instead, for the step() that follows."""
    fo = optimizer.fo if isinstance(optimizer, HybridFOZO) else optimizer
    if isinstance(fo, FirstOrderOptimizer) and fo.updates_in_backward:
        return fo.accumulate()
    return contextlib.nullcontext()


class Trainer(TrainerMixin, transformers.Trainer):
    """transformers.Trainer with zounlearn's optimizers (see the module docstring)."""


__all__ = ["Trainer", "TrainerMixin"]
