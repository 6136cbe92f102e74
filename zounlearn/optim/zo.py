"""Zeroth-order optimizers: forward passes only, directions regenerated, never stored.

One step with q queries (central difference, the default):

    for j in 0 .. q-1:  theta += mu z_j            (fused with the restore of query j-1)
                        L+ = closure(); theta -= 2 mu z_j; L- = closure()
                        g_j = (L+ - L-) / (2 mu)
    one pass:           theta += mu z_{q-1}, then the update with g_hat = (1/q) sum_j g_j z_j

2q + 1 passes over the parameters (3 for q = 1; MeZO's own loop makes 4 and materialises z).
The forward estimator evaluates L(theta) once, then g_j = (L(theta + mu z_j) - L(theta)) / mu:
q + 1 passes and q + 1 losses. z_j is z(seed, stream, e) of ZO-RNG v1 (docs/rng.md) with one
stream per direction drawn, counted in the state dict, so a resumed run draws the same z.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..ops import flat_offsets
from ..ops.reference import CHUNK
from ..ops.validation import MAX_TERMS, as_int64, check_perturb_args, check_state_args
from .base import Closure, CountedOptimizer, Hyper, ParamsT, Rule, check_betas, check_range, loss_value

DIRECTIONS = ("rademacher", "gaussian", "sphere")
ESTIMATORS = ("central", "forward")


@dataclass
class _Plan:
    """The parameters one step touches: trainable ones, laid end to end across all groups."""

    groups: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]
    params: list[torch.Tensor]
    offsets: list[int]
    numel: int


class ZeroOrderOptimizer(CountedOptimizer):
    """Base of the ZO optimizers. Subclasses name their rule and hyperparameters.

    seed: the generator's key; with the count of directions drawn (state dict) it fixes every z.
    queries: q directions per step (1 to 8). mu: perturbation scale. dist: "rademacher",
    "gaussian" or "sphere" (Gaussian scaled to unit norm over all trainable parameters, with
    the gradient estimate multiplied by their number d so that E[g_hat] ~ grad; costs one extra
    generation pass per query to get the norm: no parameter traffic, a 4 MiB scratch buffer).
    estimator: "central" or "forward". Parameters with requires_grad=False are never touched.
    After a step: last_loss and last_projected_grads (the g_j).
    """

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        seed: int = 0,
        queries: int = 1,
        mu: float = 1e-3,
        dist: str = "rademacher",
        estimator: str = "central",
        backend: str | None = None,
    ) -> None:
        if isinstance(queries, bool) or not isinstance(queries, int) or not 1 <= queries <= MAX_TERMS:
            raise ValueError(f"queries must be an int from 1 to {MAX_TERMS}, got {queries!r}")
        check_range("mu", mu, 0.0, open_low=True)
        if dist not in DIRECTIONS:
            raise ValueError(f"dist must be one of {DIRECTIONS}, got {dist!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.seed = as_int64(seed, "seed")
        self.queries, self.mu, self.dist, self.estimator = queries, float(mu), dist, estimator
        self.draws = 0
        self.last_loss: float | None = None
        self.last_projected_grads: list[float] = []
        super().__init__(params, defaults, backend=backend)

    # What a subclass defines.
    def _rule(self, group: dict[str, Any]) -> Rule | None:
        """The group's update rule; None: theta -= lr (g_hat + wd theta) by perturb_ alone."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any], step: int) -> Hyper:
        raise NotImplementedError

    # State dict.
    def _counters(self) -> dict[str, int]:
        return {"steps": self.steps, "draws": self.draws, "seed": self.seed}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self.steps, self.draws, self.seed = counters["steps"], counters["draws"], counters["seed"]

    def _plan(self) -> _Plan:
        groups, params = [], []
        for group in self.param_groups:
            trainable = [p for p in group["params"] if p.requires_grad]
            offsets = flat_offsets(trainable, start=sum(p.numel() for p in params))
            groups.append((group, trainable, offsets))
            params += trainable
        offsets = flat_offsets(params)
        # Checked once per step here; the passes then call the backend's kernels directly.
        check_perturb_args(params, offsets, [0.0], [0], "rademacher")
        return _Plan(groups, params, offsets, sum(p.numel() for p in params))

    def _perturb(self, plan: _Plan, coefs: list[float], streams: list[int]) -> None:
        kernels = self._kernels(plan.params[0].device)
        kernels.perturb_(plan.params, plan.offsets, 1.0, coefs, streams, self.seed, self._kernel_dist)

    @property
    def _kernel_dist(self) -> str:
        return "gaussian" if self.dist == "sphere" else self.dist

    def _norm(self, plan: _Plan, stream: int) -> float:
        """||z|| over all trainable elements, sampled chunk by chunk into one scratch buffer."""
        kernels = self._kernels(plan.params[0].device)
        scratch = torch.zeros(min(plan.numel, CHUNK), device=plan.params[0].device)  # alpha = 0 times garbage could be NaN
        total = 0.0
        for start in range(0, plan.numel, CHUNK):
            part = scratch[: min(CHUNK, plan.numel - start)]
            kernels.perturb_([part], [start], 0.0, [1.0], [stream], self.seed, "gaussian")
            total += float(torch.dot(part, part))
        return math.sqrt(total)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One ZO step; returns the loss estimate (central: mean of the 2q losses; forward: L(theta)).

        A non-finite loss skips the step: the perturbation is undone, no update is applied,
        counters and state stay as they were, and a RuntimeWarning says so. Any exception
        (or KeyboardInterrupt) from the closure also undoes the perturbation before it propagates.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__} needs a closure that returns the loss: step(lambda: loss_fn(model))")
        plan = self._plan()
        if plan.numel == 0:
            self.last_loss, self.last_projected_grads = loss_value(closure()), []
            return self.last_loss
        for group, params, _ in plan.groups:
            rule = self._rule(group)
            if rule is not None:  # state loaded from a state dict may not fit
                check_state_args(params, None, self._rule_states(rule, params, 0), self._rule_states(rule, params, 1),
                                 None, rule)
        q, mu = self.queries, self.mu
        streams = [self.draws + j for j in range(q)]
        scales = [1.0 / self._norm(plan, s) for s in streams] if self.dist == "sphere" else [1.0] * q
        grads: list[float] = []
        losses: list[float] = []
        active, active_stream = 0.0, 0  # theta is now theta_0 + active * z(active_stream)
        try:
            base = None
            if self.estimator == "forward":
                base = loss_value(closure())
                losses.append(base)
                if not math.isfinite(base):
                    return self._skip(base)
            for j, stream in enumerate(streams):
                shift = mu * scales[j]
                if j == 0:
                    self._perturb(plan, [shift], [stream])
                else:  # restore query j-1 and perturb along z_j in one pass
                    self._perturb(plan, [-active, shift], [active_stream, stream])
                active, active_stream = shift, stream
                plus = loss_value(closure())
                losses.append(plus)
                if not math.isfinite(plus):
                    return self._undo_and_skip(plan, active, stream, plus)
                if base is None:
                    self._perturb(plan, [-2.0 * shift], [stream])
                    active = -shift
                    minus = loss_value(closure())
                    losses.append(minus)
                    if not math.isfinite(minus):
                        return self._undo_and_skip(plan, active, stream, minus)
                    grads.append((plus - minus) / (2.0 * mu))
                else:
                    grads.append((plus - base) / mu)
        except BaseException:
            if active:
                self._perturb(plan, [-active], [active_stream])
            raise
        factor = plan.numel if self.dist == "sphere" else 1.0
        coefs = [factor * g * s / q for g, s in zip(grads, scales)]
        for group, params, offsets in plan.groups:
            self._update(group, params, offsets, coefs, streams, -active)
        self.draws += q
        self.steps += 1
        self.last_loss = base if base is not None else sum(losses) / len(losses)
        self.last_projected_grads = grads
        return self.last_loss

    def _update(self, group, params, offsets, coefs, streams, restore) -> None:
        if not params:
            return
        kernels = self._kernels(params[0].device)
        rule = self._rule(group)
        if rule is None:
            # theta <- (1 - lr wd)(theta + r z_last) - lr sum_j c_j z_j: one perturb_ pass.
            lr, wd = group["lr"], group["weight_decay"]
            alpha = 1.0 - lr * wd
            terms = [-lr * c for c in coefs]
            terms[-1] += alpha * restore
            kernels.perturb_(params, offsets, alpha, terms, streams, self.seed, self._kernel_dist)
            return
        hyper = list(self._hyper(group, self.steps + 1))
        m, v = self._rule_states(rule, params, 0), self._rule_states(rule, params, 1)
        kernels.zo_update_(params, m, v, offsets, coefs, streams, self.seed, self._kernel_dist, restore, int(rule), hyper)

    def _undo_and_skip(self, plan: _Plan, active: float, stream: int, loss: float) -> float:
        self._perturb(plan, [-active], [stream])
        return self._skip(loss)

    def _skip(self, loss: float) -> float:
        warnings.warn(
            f"{type(self).__name__}: the closure returned a non-finite loss ({loss}); the step was skipped "
            "(parameters restored, no update, step counter and state unchanged)",
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
        return Rule.SGD if group["momentum"] else None

    def _hyper(self, group, step):
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


class _ZOAdaptive(ZeroOrderOptimizer):
    rule: ClassVar[Rule]

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **zo: Any) -> None:
        check_range("lr", lr, 0.0)
        check_betas(betas)
        check_range("eps", eps, 0.0, open_low=True)
        check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, **zo)

    def _rule(self, group):
        return self.rule

    def _hyper(self, group, step):
        b1, b2 = group["betas"]
        return Hyper.make(group["lr"], weight_decay=group["weight_decay"], beta1=b1, beta2=b2, eps=group["eps"], step=step)


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
