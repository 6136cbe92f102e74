"""Zeroth-order optimizers: forward passes only, directions regenerated, never stored.

One step with q queries (central difference, the default), each group g perturbed by its mu_g:

    for j in 0 .. q-1:  theta_g += mu_g z_j        (fused with the restore of query j-1)
                        L+ = closure(); theta_g -= 2 mu_g z_j; L- = closure()
                        d_j = (L+ - L-) / 2
    one pass per group: theta_g += mu_g z_{q-1}, then the update with g_hat = (1/q) sum_j (d_j / mu_g) z_j

2q + 1 passes over the parameters (3 for q = 1; MeZO's own loop makes 4 and materialises z).
E[(d_j / mu_g) z_j] restricted to group g is its gradient, whatever the other groups' mu. The
forward estimator evaluates L(theta) once, then d_j = L(theta + mu z_j) - L(theta): q + 1 passes
and q + 1 losses. z_j is z(seed, stream, e) of ZO-RNG (docs/rng.md) with one stream per
direction drawn, counted in the state dict, so a resumed run draws the same z.

perturbation="exact" (with model=) never writes theta during the queries: the closure reads
theta + mu z through the model's modules (exact.py), and the one update pass is the step's only
rounding, so a step at lr = 0 leaves every parameter bit-identical in any dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import check_betas, check_choice, check_int, check_range
from ..errors import UsageError
from ..ops import flat_offsets
from ..ops.library import ops
from ..ops.rules import Hyper, Rule
from ..ops.validation import MAX_TERMS, check_params
from . import exact
from .base import Closure, FusedOptimizer, ParamsT, hyper_adam, loss_value

DIRECTIONS = ("rademacher", "gaussian", "sphere")
ESTIMATORS = ("central", "forward")
PERTURBATIONS = ("auto", "exact", "in_place")
NORM_CHUNK = 1 << 20  # the sphere's norm is sampled in chunks of this many elements (4 MiB of scratch)


@dataclass
class _Plan:
    """The parameters one step touches: trainable ones, laid end to end across all groups."""

    groups: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]  # (group, params, offsets), non-empty
    segments: list[tuple[float, list[torch.Tensor], list[int]]]  # (mu, params, offsets): one pass each
    numel: int
    slots: list[exact.Slot] | None  # where the model reads each parameter, in the exact mode


class ZeroOrderOptimizer(FusedOptimizer):
    """Base of the ZO optimizers. Subclasses name their rule and hyperparameters.

    seed: the generator's key; with the count of directions drawn (state dict) it fixes every z.
    mu: the perturbation scale, a param-group key like lr. queries: q directions per step (1 to 8),
    dist: "rademacher", "gaussian" or "sphere" (Gaussian scaled to unit norm over all trainable
    parameters, with the gradient estimate multiplied by their number d so that E[g_hat] ~ grad;
    costs one extra generation pass per query to get the norm: no parameter traffic, a 4 MiB
    scratch buffer), and estimator ("central" or "forward") are the optimizer's, not a group's:
    one step perturbs every group along the same directions. Parameters with requires_grad=False
    are never touched. After a step: last_loss and last_projected_grads (d_j / mu of the first
    group that has trainable parameters: the projected gradients when all groups share one mu).

    perturbation: "in_place" (theta += mu z, -= 2 mu z, the restore fused with the update: each
    pass rounds, which in half precision moves the weights by rounding alone), "exact" (the
    closure reads theta + mu z through `model`'s modules and theta is written once per step, by the
    update: exact.py), or "auto" (exact when a model is given and a trainable parameter is bfloat16
    or float16, else in place). seed and rounding: FusedOptimizer's.
    """

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        queries: int = 1,
        mu: float = 1e-3,
        dist: str = "rademacher",
        estimator: str = "central",
        perturbation: str = "auto",
        model: torch.nn.Module | None = None,
        **fused: Any,
    ) -> None:
        check_int("queries", queries, 1, MAX_TERMS)
        check_range("mu", mu, 0.0, open_low=True)
        check_choice("dist", dist, DIRECTIONS)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("perturbation", perturbation, PERTURBATIONS)
        if perturbation == "exact" and model is None:
            raise UsageError("perturbation='exact' needs the model whose modules read the parameters: "
                             f"{type(self).__name__}(params, ..., model=model)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.queries, self.dist, self.estimator = queries, dist, estimator
        self.perturbation, self.model = perturbation, model
        self.draws = 0
        self.last_loss: float | None = None
        self.last_projected_grads: list[float] = []
        super().__init__(params, {**defaults, "mu": float(mu)}, **fused)
        if model is not None:  # every parameter must be one the model reads: checked before any step
            exact.module_slots(model, [p for g in self.param_groups for p in g["params"] if p.requires_grad])

    # What a subclass defines.
    def _rule(self, group: dict[str, Any]) -> Rule:
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any], step: int) -> Hyper:
        raise NotImplementedError

    # State dict.
    def _counters(self) -> dict[str, Any]:
        return {**super()._counters(), "draws": self.draws}

    def _set_counters(self, counters: dict[str, Any]) -> None:
        super()._set_counters(counters)
        self.draws = counters["draws"]

    @property
    def exact(self) -> bool:
        """Whether steps perturb copies (the exact mode) rather than the parameters in place."""
        if self.perturbation != "auto":
            return self.perturbation == "exact"
        return self.model is not None and any(
            p.dtype != torch.float32 for g in self.param_groups for p in g["params"] if p.requires_grad)

    def _plan(self) -> _Plan:
        """The step's parameters and layout, every tensor and state checked before any write."""
        groups, segments, numel = [], {}, 0
        for group in self.param_groups:
            check_range("mu", group["mu"], 0.0, open_low=True)
            self._rounding(group)
            trainable = [p for p in group["params"] if p.requires_grad]
            if not trainable:
                continue
            offsets = flat_offsets(trainable, start=numel)
            numel += sum(p.numel() for p in trainable)
            self._checked(self._rule(group), trainable, group, check_tensors=False)
            groups.append((group, trainable, offsets))
            params, offs = segments.setdefault(group["mu"], ([], []))
            params += trainable
            offs += offsets
        # Once across the groups: one device, no memory shared; the offsets are ours.
        params = [p for _, ps, _ in groups for p in ps]
        check_params(params)
        slots = exact.module_slots(self.model, params) if self.exact else None
        return _Plan(groups, [(mu, ps, offs) for mu, (ps, offs) in segments.items()], numel, slots)

    @property
    def _kernel_dist(self) -> str:
        return "gaussian" if self.dist == "sphere" else self.dist

    def _shift(self, plan: _Plan, terms: list[tuple[float, int]]) -> None:
        """theta_g += sum (c mu_g) z(stream) over the terms (c, stream), one pass per distinct mu."""
        for mu, params, offsets in plan.segments:
            ops.perturb_(params, offsets, [c * mu for c, _ in terms], [s for _, s in terms], self.seed,
                         self._kernel_dist, 1.0)
            self._check_float16(params, "an in-place perturbation")

    def _loss_at(self, plan: _Plan, closure: Closure, terms: list[tuple[float, int]]) -> float:
        """The closure's loss at theta + sum_k (c_k mu_g) z_k: in place, theta is moved there by
        _shift beforehand; in the exact mode the model reads it through the perturbed slots."""
        if plan.slots is None or not terms:  # in place, or at theta itself
            return loss_value(closure())
        names = {id(p): f"{type(self).__name__} group {g}, tensor {i} (shape {tuple(p.shape)})"
                 for g, (_, ps, _) in enumerate(plan.groups) for i, p in enumerate(ps)}
        offsets = {id(p): off for _, ps, offs in plan.groups for p, off in zip(ps, offs)}
        mus = {id(p): group["mu"] for group, ps, _ in plan.groups for p in ps}
        with exact.perturbed(plan.slots, names, offsets, mus, terms, self.seed, self._kernel_dist):
            loss = loss_value(closure())
        if not math.isfinite(loss) and math.isfinite(loss_value(closure())):
            raise UsageError(f"{type(self).__name__}: the loss is finite at theta but not at the perturbed point, "
                             "where every Parameter object holds NaN in the exact mode: the closure reads a "
                             "parameter directly instead of through the model's modules; compute the loss with the "
                             "model, or use perturbation='in_place'")
        return loss

    def _norms(self, plan: _Plan, streams: list[int]) -> list[float]:
        """||z(stream)|| over all trainable elements for each stream, sampled chunk by chunk into one
        scratch buffer and summed on the device: one host sync per stream."""
        device = plan.groups[0][1][0].device
        scratch = torch.zeros(min(plan.numel, NORM_CHUNK), device=device)  # alpha = 0 times garbage could be NaN
        norms = []
        for stream in streams:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, plan.numel, NORM_CHUNK):
                part = scratch[: min(NORM_CHUNK, plan.numel - start)]
                ops.perturb_([part], [start], [1.0], [stream], self.seed, "gaussian", 0.0)
                total += torch.dot(part, part)
            norms.append(math.sqrt(float(total)))
        return norms

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One ZO step; returns the loss estimate (central: mean of the 2q losses; forward: L(theta)).

        A non-finite loss skips the step: the perturbation is undone, no update is applied,
        counters and state stay as they were, and a RuntimeWarning says so. Any exception
        (or KeyboardInterrupt) from the closure also undoes the perturbation before it propagates.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__} needs a closure that returns the loss: "
                             "step(lambda: loss_fn(model))")
        plan = self._plan()
        if plan.numel == 0:
            self.last_loss, self.last_projected_grads = loss_value(closure()), []
            return self.last_loss
        q = self.queries
        streams = [self.draws + j for j in range(q)]
        scales = [1.0 / n for n in self._norms(plan, streams)] if self.dist == "sphere" else [1.0] * q
        diffs: list[float] = []  # d_j
        losses: list[float] = []
        in_place = plan.slots is None
        active, active_stream = 0.0, 0  # in place, theta_g is now theta_g0 + active * mu_g * z(active_stream)
        try:
            base = None
            if self.estimator == "forward":
                base = self._loss_at(plan, closure, [])
                losses.append(base)
                if not math.isfinite(base):
                    return self._skip(base)
            for j, stream in enumerate(streams):
                if in_place:  # restores query j-1 and perturbs along z_j in one pass
                    self._shift(plan, [(scales[j], stream)] if j == 0 else
                                [(-active, active_stream), (scales[j], stream)])
                    active, active_stream = scales[j], stream
                plus = self._loss_at(plan, closure, [(scales[j], stream)])
                losses.append(plus)
                if not math.isfinite(plus):
                    return self._undo_and_skip(plan, active, stream, plus)
                if base is None:
                    if in_place:
                        self._shift(plan, [(-2.0 * scales[j], stream)])
                        active = -scales[j]
                    minus = self._loss_at(plan, closure, [(-scales[j], stream)])
                    losses.append(minus)
                    if not math.isfinite(minus):
                        return self._undo_and_skip(plan, active, stream, minus)
                    diffs.append((plus - minus) / 2.0)
                else:
                    diffs.append(plus - base)
        except BaseException:
            if active:
                self._shift(plan, [(-active, active_stream)])
            raise
        factor = plan.numel if self.dist == "sphere" else 1.0
        for group, params, offsets in plan.groups:
            mu = group["mu"]
            coefs = [factor * d / mu * s / q for d, s in zip(diffs, scales)]
            self._update(group, params, offsets, coefs, streams, -active * mu)
        self.draws += q
        self.roundings += 1
        self._check_float16([p for _, ps, _ in plan.groups for p in ps], "the update")
        self.last_loss = base if base is not None else sum(losses) / len(losses)
        self.last_projected_grads = [d / plan.groups[0][0]["mu"] for d in diffs]
        return self.last_loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], offsets: list[int], coefs: list[float],
                streams: list[int], restore: float) -> None:
        rule = self._rule(group)
        for step, indices in self._count_steps(params).items():
            hyper = self._hyper(group, step)
            for ps, offs in self._passes(group, [params[i] for i in indices], [offsets[i] for i in indices]):
                with self._pass_moments(rule, ps, group) as (m, v):
                    ops.zo_update_(ps, m, v, offs, coefs, streams, self.seed, self._kernel_dist, restore, rule.value,
                                   *self._rounding(group), *hyper)

    def _undo_and_skip(self, plan: _Plan, active: float, stream: int, loss: float) -> float:
        if active:
            self._shift(plan, [(-active, stream)])
        return self._skip(loss)

    def _skip(self, loss: float) -> float:
        warnings.warn(
            f"{type(self).__name__}: the closure returned a non-finite loss ({loss}); the step was skipped "
            "(parameters restored, no update, step counts and state unchanged)",
            RuntimeWarning,
            stacklevel=3,
        )
        self.last_loss, self.last_projected_grads = loss, []
        return loss


class ZOSGD(ZeroOrderOptimizer):
    """MeZO: theta -= lr (g_hat + wd theta); with momentum, torch.optim.SGD's buffer (dampening 0).

    >>> opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3, seed=0)
    >>> loss = opt.step(lambda: loss_fn(model(x), y))   # forward passes only
    """

    state_keys = ("momentum_buffer", "")

    def __init__(self, params: ParamsT, lr: float = 1e-6, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 **zo: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, **zo)

    def _rule(self, group):
        return Rule.SGD if group["momentum"] else Rule.DESCENT

    def _hyper(self, group, step):
        if not group["momentum"]:  # theta - lr (g + wd theta) = (1 - lr wd) theta - lr g
            return Hyper.make(group["lr"], weight_decay=group["weight_decay"])
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], decoupled=False, beta1=group["momentum"])


class ZOSignSGD(ZeroOrderOptimizer):
    """theta -= lr (sign(g_hat) + wd theta), sign taken element by element."""

    def __init__(self, params: ParamsT, lr: float = 1e-6, *, weight_decay: float = 0.0, **zo: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, **zo)

    def _rule(self, group):
        return Rule.SIGN

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"])


class ZOSignAdam(ZeroOrderOptimizer):
    """Signum on the ZO estimate: m = b1 m + (1 - b1) g_hat; theta -= lr (sign(m) + wd theta)
    (decoupled). Its m can be SignAdam's in the hybrid (shared_state.py)."""

    def __init__(self, params: ParamsT, lr: float = 1e-6, *, beta: float = 0.9, weight_decay: float = 0.0,
                 **zo: Any) -> None:
        check_range("lr", lr, 0.0)
        check_range("beta", beta, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, **zo)

    def _rule(self, group):
        return Rule.SIGN_ADAM

    def _hyper(self, group, step):
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=group["beta"])


class _ZOAdaptive(ZeroOrderOptimizer):
    rule: ClassVar[Rule]

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **zo: Any) -> None:
        check_range("lr", lr, 0.0)
        betas = check_betas(betas)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, **zo)

    def _rule(self, group):
        return self.rule

    def _hyper(self, group, step):
        return hyper_adam(group, step)


class ZOAdam(_ZOAdaptive):
    """Adam on g_hat with bias correction and decoupled weight decay (AdamW); float32 m, v."""

    rule = Rule.ADAM


class AdaZO(_ZOAdaptive):
    """R-AdaZO: m = b1 m + (1-b1) g_hat; v = b2 v + (1-b2) m^2; theta -= lr m / (sqrt(v) + eps).

    No bias correction; decoupled weight decay. v tracks the first moment's square, which
    reduces the variance of the ZO estimate (Shu et al., "Refining Adaptive Zeroth-Order
    Optimization at Ease", 2025).
    """

    rule = Rule.ADAZO
