"""Base of the fused first-order optimizers: one grad_update_ pass per param group and step count.

step() uses the gradients in p.grad; step(closure) first sets them to None, calls the closure
with grad enabled and calls backward() on the loss it returns. As in torch.optim, a parameter
without a gradient is skipped (its state and step count stay as they are), and each parameter's
bias correction uses its own step count. A non-finite loss from the closure skips the update
(as the ZO optimizers do); without a closure the update always runs, like torch.optim's.

Updates inside backward (`update_in_backward()`, docs/memory.md): each parameter gets its fused
update as soon as autograd has accumulated its gradient (a post-accumulate-grad hook), and the
gradient is freed at once, so a step holds one gradient tensor instead of the model's. The math
is the normal path's, parameter by parameter, so parameters and states are bit-identical to it.
The hooks update only inside step(closure); inside `accumulate()` they keep the gradient
(micro-batches: the last one goes through step(closure), which updates with the sum); any other
backward through the parameters raises before anything is written, so neither per-micro-batch
stepping nor a clip of gradients that are already gone can happen silently. Data parallel is
refused (a rank would update from its own gradient before the all-reduce; docs/memory.md).

Per-tensor update clipping (AdaLomo's, legal inside backward because it needs no global norm):
a param group's `update_clip` c scales the tensor's step by min(1, c / RMS(u)), u the rule's
update direction (Adam's m_hat / (sqrt(v_hat) + eps), momentum SGD's buffer), for AdamW, SGD
and CompressedAdam; the sign rules and SophiaG bound every element of u by 1 already.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from ..checks import check_range
from ..errors import UsageError
from ..ops.library import ops
from ..ops.rules import Hyper, Rule, float32
from .base import Closure, FusedOptimizer, backward

# A gradient handler of the hooks: (group, param, grad) -> None; the hook frees the gradient after it.
GradHandler = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], None]
_KEEP = "keep"  # the hooks' mode inside accumulate(): leave the gradient in p.grad
CLIPPED_RULES = (Rule.ADAM, Rule.SGD, Rule.ADAM_MOMENTS)  # the rules whose update update_clip bounds
_RMS_CHUNK = 1 << 20  # RMS(u) is computed this many elements at a time (a few MiB of scratch)


class FirstOrderOptimizer(FusedOptimizer):
    """Subclasses name their `rule` and `_hyper(group, step)`; the rule's m and v live in
    state[p][state_keys[0]] and state[p][state_keys[1]]. Every group has `update_clip` (None: off)."""

    rule: ClassVar[Rule]

    def __init__(self, params: Any, defaults: dict[str, Any], **fused: Any) -> None:
        self._hooks: dict[torch.Tensor, Any] = {}  # param -> its hook's handle, while updating in backward
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._on_grad: GradHandler | str | None = None  # what the hooks do now; None: refuse
        self._accumulated = False  # gradients kept by accumulate() for the next step
        super().__init__(params, {**defaults, "update_clip": None}, **fused)

    def _hyper(self, group: dict[str, Any], step: int) -> Hyper:
        raise NotImplementedError

    def _rule(self, group: dict[str, Any]) -> Rule:
        return self.rule

    # Updates inside backward.
    @property
    def updates_in_backward(self) -> bool:
        return bool(self._hooks)

    def update_in_backward(self, enabled: bool = True) -> FirstOrderOptimizer:
        """Apply each parameter's update inside backward and free its gradient at once (see the
        module docstring); enabled=False removes the hooks. Returns the optimizer."""
        if not enabled:
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
            return self
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise UsageError(f"{type(self).__name__}: updates inside backward under data parallel are not supported: "
                             f"each rank would update from its own gradient before the all-reduce (docs/memory.md)")
        self._hook_groups(self.param_groups)
        return self

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_hooks", None):
            self._hook_groups(self.param_groups[-1:])

    def _hook_groups(self, groups: list[dict[str, Any]]) -> None:
        ref = weakref.ref(self)  # the hooks must not keep a dropped optimizer alive
        for group in groups:
            self._check_clip(group)
            for p in group["params"]:
                if p.requires_grad and p not in self._hooks:
                    self._group_of[p] = group
                    self._hooks[p] = p.register_post_accumulate_grad_hook(lambda q, ref=ref: _grad_ready(ref, q))

    def _grad_ready(self, p: torch.Tensor) -> None:
        """The hook: p.grad holds p's whole gradient for this backward."""
        handler = self._on_grad
        if handler == _KEEP:
            return
        if handler is None:
            raise RuntimeError(
                f"{type(self).__name__} updates its parameters inside backward (update_in_backward()), so a backward "
                f"must come from its step(closure); to accumulate micro-batches run their backward inside "
                f"`with optimizer.accumulate():` and the last one through step(closure). Global gradient-norm "
                f"clipping cannot run inside backward: use the group's update_clip (per tensor) or "
                f"update_in_backward(False) (docs/memory.md). Nothing was updated")
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
        handler(self._group_of[p], p, grad)
        p.grad = None

    @contextlib.contextmanager
    def _gradients_to(self, handler: GradHandler | str) -> Iterator[None]:
        """Inside: the hooks hand each gradient to handler (or keep it, _KEEP); no-op without hooks."""
        previous, self._on_grad = self._on_grad, handler
        try:
            yield
        finally:
            self._on_grad = previous

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside add to p.grad as usual, and the next step(closure) adds its own
        gradient to theirs instead of starting from zero: gradient accumulation over micro-batches.
        Inside backward, the update then happens in the last micro-batch's backward only; the
        micro-batches before it hold the whole gradient (the normal path's memory)."""
        with self._gradients_to(_KEEP):
            yield
        self._accumulated = True

    def _update_one(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, offset: int,
                    updated: list[torch.Tensor]) -> None:
        """The normal path's update, for one parameter (offset: its rounding words'); appends p to updated."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        self._apply(group, [p], [grad], [offset], self._hyper(group, state["step"]))
        updated.append(p)

    # The step.
    def _with_grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """(group, params, grads) of each group's parameters that have a gradient, checked before any write."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            self._check_clip(group)
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            self._checked(self.rule, params, group, grads, self._scales(params))
            self._rounding(group)
            out.append((group, params, grads))
        return out

    def _check_before_backward(self) -> None:
        """Inside backward each parameter is updated when its gradient arrives: check every group's
        options and the state that exists (loaded from a state dict, say) before the first one is."""
        for group in self.param_groups:
            self._check_clip(group)
            self._rounding(group)
            params = [p for p in group["params"] if p.requires_grad]
            keys = list(filter(None, self._used_keys(self.rule)))
            kept = [p for p in params
                    if all(name in self.state.get(p, {}) for k in keys for name, _ in self._entries(p, k, group))]
            if kept:
                self._checked(self.rule, kept, group, None, self._scales(kept))

    def _check_clip(self, group: dict[str, Any]) -> None:
        clip = group.get("update_clip")
        if clip is None:
            return
        if self.rule not in CLIPPED_RULES:
            raise UsageError(f"{type(self).__name__} takes no update_clip: its update bounds every element by lr "
                             f"already; update_clip is for AdamW, SGD and CompressedAdam")
        check_range("update_clip", clip, 0.0, open_low=True)

    def _scales(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The per-tensor scales the rule needs (compressed Adam's), else None."""
        return None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | float | None:  # type: ignore[override]
        return self._step(closure)[0]

    def _step(self, closure: Closure | None) -> tuple[Any, bool]:
        """(the closure's loss or None, whether the update ran)."""
        loss, layout, updated = None, self._layout(), []
        kept, self._accumulated = self._accumulated, False
        if closure is not None:
            if self._hooks:
                self._check_before_backward()
            with self._gradients_to(lambda group, p, grad: self._update_one(group, p, grad, layout[p], updated)):
                loss, finite = backward(closure, self, type(self).__name__, zero_grad=not kept)
            if not finite:
                if kept:  # the accumulated step is skipped as a whole
                    self.zero_grad(set_to_none=True)
                return loss, False
        # Normal path; inside backward, the parameters whose gradient came only from accumulate().
        groups = self._with_grads()
        for group, params, grads in groups:
            for step, indices in self._count_steps(params).items():
                ps = [params[i] for i in indices]
                self._apply(group, ps, [grads[i] for i in indices], [layout[p] for p in ps], self._hyper(group, step))
            if self._hooks:
                for p in params:
                    p.grad = None
        updated += [p for _, params, _ in groups for p in params]
        self.roundings += bool(updated)  # one rounding stream per step, in backward or not
        self._check_float16(updated, "the update")
        return loss, True

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
               offsets: list[int], hyper: Hyper) -> None:
        clip = group.get("update_clip") is not None  # its RMS is per tensor: one pass per tensor
        for ps, gs, offs in self._passes(group, params, grads, offsets, one_by_one=clip):
            with self._pass_moments(self.rule, ps, group) as (m, v):
                self._apply_rule(group, ps, gs, offs, self._clipped(group, ps[0], gs[0], m, v, hyper) if clip
                                 else hyper, m, v)

    def _apply_rule(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                    offsets: list[int], hyper: Hyper, m: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        ops.grad_update_(params, grads, m, v, None, offsets, self.seed, self.rule.value, *self._rounding(group),
                         *hyper)

    def _clipped(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, m: list[torch.Tensor],
                 v: list[torch.Tensor], hyper: Hyper) -> Hyper:
        """hyper with the tensor's lr scaled by min(1, update_clip / RMS(u)), u the update direction this
        step will take (computed from p's state m and v before the update, in float32, chunk by chunk)."""
        flat = lambda t: t.reshape(-1)  # noqa: E731
        theta, g = flat(p), flat(grad)
        total = 0.0
        for start in range(0, p.numel(), _RMS_CHUNK):
            part = slice(start, start + _RMS_CHUNK)
            gc = g[part].float()
            mc = flat(m[0])[part].float()  # lean state: computed in float32 as the rules do
            if self.rule is Rule.SGD:  # torch.optim.SGD's buffer: b = momentum b + g + wd theta
                u = mc * hyper.beta1 + gc + theta[part].float() * hyper.weight_decay
            else:
                mc = mc * hyper.beta1 + gc * hyper.one_minus_beta1
                vc = flat(v[0])[part].float() * hyper.beta2 + gc * gc * hyper.one_minus_beta2
                u = (mc / hyper.bias_correction1) / (vc.sqrt() / hyper.sqrt_bias_correction2 + hyper.eps)
            total += float(torch.dot(u, u))
        rms = math.sqrt(total / max(p.numel(), 1))
        clip = group["update_clip"]
        return hyper if rms <= clip else hyper._replace(lr=float32(hyper.lr * clip / rms))


def _grad_ready(ref: weakref.ref, p: torch.Tensor) -> None:
    optimizer = ref()
    if optimizer is not None and p in optimizer._hooks:
        optimizer._grad_ready(p)


__all__ = ["CLIPPED_RULES", "FirstOrderOptimizer"]
