"""Every zounlearn optimizer as a plain loop over tensors in pure PyTorch: the tests' oracles.

Each twin takes the same arguments as its fused namesake in zounlearn.optim, but shares none of
its code or bookkeeping: it subclasses torch.optim.Optimizer directly, keeps its own per-parameter
step counts and its own counts of directions and rounding streams used, materialises every
direction and rounding word with zounlearn.rng (the oracle of the random stream, itself checked
against Random123's known answers), and writes each update from the formulas of
docs/optimizers.md in float32 torch ops. Slow and memory-hungry by design.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from zounlearn import rng

Update = Callable[[dict[str, Any], dict[str, Any], torch.Tensor, torch.Tensor, int], torch.Tensor]


def _value(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _put(p: torch.Tensor, value: torch.Tensor, group: dict[str, Any], seed: int, stream: int, offset: int) -> None:
    """p <- value (float32), stochastically rounded into a half tensor when the group says so."""
    if group["rounding"] == "stochastic" and p.dtype != torch.float32:
        bits = rng.rounding_bits(seed, stream, offset, p.numel(), p.device)
        value = rng.round_stochastic(value.reshape(-1), bits, p.dtype).view_as(p)
    p.copy_(value)


class ZOLoop(torch.optim.Optimizer):
    """The ZO step as a loop: perturb, evaluate, restore and update tensor by tensor."""

    def __init__(self, params, update: Update, defaults: dict[str, Any], *, seed: int = 0, queries: int = 1,
                 mu: float = 1e-3, dist: str = "rademacher", estimator: str = "central",
                 rounding: str = "stochastic") -> None:
        super().__init__(params, {**defaults, "mu": mu, "rounding": rounding})
        self.update_rule, self.seed, self.queries, self.dist, self.estimator = update, seed, queries, dist, estimator
        self.drawn = 0  # directions drawn so far: the next step's first stream
        self.rounded = 0  # steps whose updates were rounded: the next one's stream is 2^63 + rounded
        self.last_projected_grads: list[float] = []

    @torch.no_grad()
    def step(self, closure):
        entries, offset = [], 0  # (group, param, global offset) of every trainable parameter, groups in order
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    entries.append((group, p, offset))
                    offset += p.numel()
        dist = "gaussian" if self.dist == "sphere" else self.dist
        q = self.queries
        streams = [self.drawn + j for j in range(q)]
        # z[j][i]: direction j of tensor i, scaled to unit norm over all tensors for "sphere"
        z = [[rng.sample(self.seed, s, off, p.numel(), dist, p.device).view_as(p) for _, p, off in entries]
             for s in streams]
        if self.dist == "sphere":
            z = [[t / math.sqrt(sum(float(u.double().square().sum()) for u in zj)) for t in zj] for zj in z]

        def shift(terms: list[tuple[int, float]]) -> None:  # theta_g += sum c mu_g z_j, one rounding per tensor
            for i, (group, p, _) in enumerate(entries):
                acc = p.float()
                for j, c in terms:
                    acc = acc + (c * group["mu"]) * z[j][i]
                p.copy_(acc)

        diffs, losses = [], []
        base = _value(closure()) if self.estimator == "forward" else None
        active = 0.0  # theta_g = theta_g0 + active * mu_g * z[last]
        for j in range(q):
            # As the fused step: the restore of query j-1 shares a pass with the perturbation of j.
            shift([(j - 1, -active), (j, 1.0)] if j else [(j, 1.0)])
            active = 1.0
            plus = _value(closure())
            losses.append(plus)
            if base is None:
                shift([(j, -2.0)])
                active = -1.0
                minus = _value(closure())
                losses.append(minus)
                diffs.append((plus - minus) / 2)
            else:
                diffs.append(plus - base)
        factor = offset if self.dist == "sphere" else 1.0
        for i, (group, p, off) in enumerate(entries):
            g_hat = sum(factor * d / group["mu"] * zj[i] for d, zj in zip(diffs, z)) / q
            theta = p.float() - (active * group["mu"]) * z[-1][i]  # the last restore, folded into the update
            state = self.state[p]
            state["t"] = state.get("t", 0) + 1
            _put(p, self.update_rule(group, state, theta, g_hat, state["t"]), group, self.seed,
                 rng.ROUNDING_STREAM_BASE + self.rounded, off)
        self.drawn += q
        self.rounded += 1
        self.last_projected_grads = [d / entries[0][0]["mu"] for d in diffs]
        return base if base is not None else sum(losses) / len(losses)


class FOLoop(torch.optim.Optimizer):
    """The first-order step as a loop over the tensors that have a gradient."""

    def __init__(self, params, update: Update, defaults: dict[str, Any], *, seed: int = 0,
                 rounding: str = "stochastic") -> None:
        super().__init__(params, {**defaults, "rounding": rounding})
        self.update_rule, self.seed, self.rounded = update, seed, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
                loss.backward()
        offset, updated = 0, False  # the rounding words' indices: every parameter laid end to end
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["t"] = state.get("t", 0) + 1
                    _put(p, self.update_rule(group, state, p.float(), p.grad.float(), state["t"]), group, self.seed,
                         rng.ROUNDING_STREAM_BASE + self.rounded, offset)
                    updated = True
                offset += p.numel()
        self.rounded += updated
        return loss


# The update formulas: (group, per-parameter state, theta, g, the parameter's step t) -> new theta.

def _buffer(state: dict[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
    return state.setdefault(key, torch.zeros_like(like))


def sgd_update(group, state, theta, g, t):
    """torch.optim.SGD, dampening 0: d = g + wd theta, b = momentum b + d, theta -= lr b."""
    g = g + group["weight_decay"] * theta
    if group["momentum"]:
        buf = _buffer(state, "momentum_buffer", theta)
        buf.mul_(group["momentum"]).add_(g)
        g = buf
    return theta - group["lr"] * g


def sign_update(group, state, theta, g, t):
    return theta - group["lr"] * (torch.sign(g) + group["weight_decay"] * theta)


def adamw_update(group, state, theta, g, t):
    """AdamW: decoupled decay, then the bias-corrected step at the parameter's own t."""
    b1, b2 = group["betas"]
    m, v = _buffer(state, "exp_avg", theta), _buffer(state, "exp_avg_sq", theta)
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def adazo_update(group, state, theta, g, t):
    b1, b2 = group["betas"]
    m, v = _buffer(state, "exp_avg", theta), _buffer(state, "exp_avg_sq", theta)
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * m * m)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m / (v.sqrt() + group["eps"])


def signum_update(group, state, theta, g, t):
    m = _buffer(state, "exp_avg", theta)
    m.mul_(group["beta"]).add_((1 - group["beta"]) * g)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * torch.sign(m)


def compressed_adam_update(group, state, theta, g, t):
    b1, b2 = group["betas"]
    m, v = _buffer(state, "exp_avg", theta), _buffer(state, "exp_avg_sq", theta)
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    u = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + group["eps"])
    levels = 2 ** (group["bits"] - 1) - 1
    scale = u.abs().max() if u.numel() else u.new_zeros(())
    if levels == 0:
        quantized = torch.sign(u)
    elif scale > 0:
        quantized = torch.round(u / scale * levels) / levels * scale
    else:
        quantized = torch.zeros_like(u)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * quantized


def sophia_update(group, state, theta, g, t):
    b1 = group["betas"][0]
    m, h = _buffer(state, "exp_avg", theta), _buffer(state, "hessian", theta)
    m.mul_(b1).add_((1 - b1) * g)
    ratio = (m.abs() / (group["rho"] * h + group["eps"])).clamp(max=1.0)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * torch.sign(m) * ratio


def ZOSGD(params, lr=1e-6, *, momentum=0.0, weight_decay=0.0, **zo):
    return ZOLoop(params, sgd_update, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, **zo)


def ZOSignSGD(params, lr=1e-6, *, weight_decay=0.0, **zo):
    return ZOLoop(params, sign_update, {"lr": lr, "weight_decay": weight_decay}, **zo)


def ZOAdam(params, lr=1e-4, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **zo):
    return ZOLoop(params, adamw_update, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, **zo)


def AdaZO(params, lr=1e-4, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **zo):
    return ZOLoop(params, adazo_update, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, **zo)


def ZOSignAdam(params, lr=1e-6, *, beta=0.9, weight_decay=0.0, **zo):
    return ZOLoop(params, signum_update, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, **zo)


def SignSGD(params, lr=1e-4, *, weight_decay=0.0, **fused):
    return FOLoop(params, sign_update, {"lr": lr, "weight_decay": weight_decay}, **fused)


def SignAdam(params, lr=1e-4, *, beta=0.9, weight_decay=0.0, **fused):
    return FOLoop(params, signum_update, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, **fused)


def CompressedAdam(params, lr=1e-4, *, bits=4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **fused):
    return FOLoop(params, compressed_adam_update,
                  {"lr": lr, "bits": bits, "betas": betas, "eps": eps, "weight_decay": weight_decay}, **fused)


def AdamW(params, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **fused):
    return FOLoop(params, adamw_update, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                  **fused)


def SGD(params, lr=1e-3, *, momentum=0.0, weight_decay=0.0, **fused):
    return FOLoop(params, sgd_update, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, **fused)


class SophiaG(FOLoop):
    """The update every step; after every update_period-th step, h = b2 h + (1 - b2) B g_s^2."""

    def __init__(self, params, lr=1e-4, *, betas=(0.965, 0.99), rho=0.04, eps=1e-15, weight_decay=0.1,
                 update_period=10, hessian_batch_size=1, **fused):
        super().__init__(params, sophia_update,
                         {"lr": lr, "betas": betas, "rho": rho, "eps": eps, "weight_decay": weight_decay}, **fused)
        self.update_period, self.hessian_batch_size, self.taken = update_period, hessian_batch_size, 0

    @torch.no_grad()
    def step(self, closure=None, hessian_closure=None):
        loss = super().step(closure)
        self.taken += 1
        if hessian_closure is not None and self.taken % self.update_period == 0:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                hessian_closure().backward()
            for group in self.param_groups:
                b2 = group["betas"][1]
                for p in group["params"]:
                    if p.grad is not None:
                        h = _buffer(self.state[p], "hessian", p.float())
                        h.mul_(b2).add_((1 - b2) * self.hessian_batch_size * p.grad.float() ** 2)
            self.zero_grad(set_to_none=True)
        return loss


class HybridFOZO:
    """The hybrid's schedule from its definition: step t (from 0) is zeroth-order iff it falls in
    the last zo_block of its cycle counted back from total_steps - 1 (or, without total_steps,
    iff t mod (block + zo_block) >= block); each phase steps its own inner twin."""

    def __init__(self, fo: torch.optim.Optimizer, zo: ZOLoop, *, block: int, zo_block: int | None = None,
                 total_steps: int | None = None) -> None:
        self.fo, self.zo, self.block = fo, zo, block
        self.zo_block = block if zo_block is None else zo_block
        self.total_steps, self.t = total_steps, 0

    def is_zo(self, t: int) -> bool:
        cycle = self.block + self.zo_block
        if self.total_steps is None:
            return t % cycle >= self.block
        return (self.total_steps - 1 - t) % cycle < self.zo_block

    def step(self, closure):
        zo = self.is_zo(self.t)
        self.t += 1
        if zo:
            return self.zo.step(closure)
        loss = self.fo.step(closure)
        self.fo.zero_grad(set_to_none=True)
        return loss
