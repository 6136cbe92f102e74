"""Every optimizer as a plain loop over tensors in pure PyTorch: the tests' oracles.

Each class takes the same arguments and keeps the same state as its fused namesake in
zounlearn.optim, but its step is written from the formulas (docs/optimizers.md): directions
materialised per tensor with zounlearn.rng.sample, updates in float32 torch ops, no fused op.
Slow and memory-hungry by design; never use them for training.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import optim, rng
from .base import loss_value


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x)


class _ZOLoop:
    """The ZO step as a loop: perturb, evaluate, restore and update tensor by tensor."""

    @torch.no_grad()
    def step(self, closure):
        entries, offset = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    entries.append((group, p, offset))
                    offset += p.numel()
        dist = "gaussian" if self.dist == "sphere" else self.dist
        q, mu = self.queries, self.mu
        streams = [self.draws + j for j in range(q)]
        # z[j][i]: direction j of tensor i, scaled to unit norm over all tensors for "sphere"
        z = [[rng.sample(self.seed, s, off, p.numel(), dist, p.device).view_as(p) for _, p, off in entries]
             for s in streams]
        if self.dist == "sphere":
            z = [[t / math.sqrt(sum(float(u.double().square().sum()) for u in zj)) for t in zj] for zj in z]

        def shift(terms: list[tuple[int, float]]) -> None:  # theta += sum c z_j, one rounding per tensor
            for i, (_, p, _) in enumerate(entries):
                acc = p.float()
                for j, c in terms:
                    acc = acc + c * z[j][i]
                p.copy_(acc)

        grads, losses = [], []
        base = loss_value(closure()) if self.estimator == "forward" else None
        active = 0.0  # the coefficient of the last direction still added to theta
        for j in range(q):
            # As the fused step: the restore of query j-1 shares a pass with the perturbation of j.
            shift([(j - 1, -active), (j, mu)] if j else [(j, mu)])
            active = mu
            plus = loss_value(closure())
            losses.append(plus)
            if base is None:
                shift([(j, -2 * mu)])
                active = -mu
                minus = loss_value(closure())
                losses.append(minus)
                grads.append((plus - minus) / (2 * mu))
            else:
                grads.append((plus - base) / mu)
        factor = offset if self.dist == "sphere" else 1.0
        for i, (group, p, _) in enumerate(entries):
            g_hat = sum(factor * g * zj[i] for g, zj in zip(grads, z)) / q
            theta = p.float() - active * z[-1][i]  # the last restore, folded into the update
            p.copy_(self._update(group, self.state[p], theta, g_hat))
        self.draws += q
        self.steps += 1
        self.last_projected_grads = grads
        return base if base is not None else sum(losses) / len(losses)


class ZOSGD(_ZOLoop, optim.ZOSGD):
    def _update(self, group, state, theta, g):
        g = g + group["weight_decay"] * theta
        if group["momentum"]:
            buf = state.setdefault("momentum_buffer", torch.zeros_like(theta))
            buf.mul_(group["momentum"]).add_(g)
            g = buf
        return theta - group["lr"] * g


class ZOSignSGD(_ZOLoop, optim.ZOSignSGD):
    def _update(self, group, state, theta, g):
        return theta - group["lr"] * (_sign(g) + group["weight_decay"] * theta)


def _adam(group: dict[str, Any], state: dict, theta: torch.Tensor, g: torch.Tensor, step: int) -> torch.Tensor:
    """AdamW: decoupled decay, then the bias-corrected step."""
    b1, b2 = group["betas"]
    m = state.setdefault("exp_avg", torch.zeros_like(theta))
    v = state.setdefault("exp_avg_sq", torch.zeros_like(theta))
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


class ZOAdam(_ZOLoop, optim.ZOAdam):
    def _update(self, group, state, theta, g):
        return _adam(group, state, theta, g, self.steps + 1)


class AdaZO(_ZOLoop, optim.AdaZO):
    def _update(self, group, state, theta, g):
        b1, b2 = group["betas"]
        m = state.setdefault("exp_avg", torch.zeros_like(theta))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(theta))
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * m * m)
        return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m / (v.sqrt() + group["eps"])


class _FOLoop:
    """The first-order step as a loop over the tensors that have a gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
                loss.backward()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(self._update(group, self.state[p], p.float(), p.grad.float(), self.steps + 1))
        self.steps += 1
        return loss


class SignSGD(_FOLoop, optim.SignSGD):
    def _update(self, group, state, theta, g, step):
        return theta - group["lr"] * (_sign(g) + group["weight_decay"] * theta)


class SignAdam(_FOLoop, optim.SignAdam):
    def _update(self, group, state, theta, g, step):
        m = state.setdefault("exp_avg", torch.zeros_like(theta))
        m.mul_(group["beta"]).add_((1 - group["beta"]) * g)
        return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * _sign(m)


class CompressedAdam(_FOLoop, optim.CompressedAdam):
    def _update(self, group, state, theta, g, step):
        b1, b2 = group["betas"]
        m = state.setdefault("exp_avg", torch.zeros_like(theta))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(theta))
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        u = (m / (1 - b1**step)) / (v.sqrt() / math.sqrt(1 - b2**step) + group["eps"])
        levels = 2 ** (group["bits"] - 1) - 1
        scale = u.abs().max() if u.numel() else u.new_zeros(())
        if levels == 0:
            quantized = _sign(u)
        elif scale > 0:
            quantized = torch.round(u / scale * levels) / levels * scale
        else:
            quantized = torch.zeros_like(u)
        return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * quantized


class SophiaG(_FOLoop, optim.SophiaG):
    def _update(self, group, state, theta, g, step):
        b1 = group["betas"][0]
        m = state.setdefault("exp_avg", torch.zeros_like(theta))
        h = state.setdefault("hessian", torch.zeros_like(theta))
        m.mul_(b1).add_((1 - b1) * g)
        ratio = (m.abs() / (group["rho"] * h + group["eps"])).clamp(max=1.0)
        return theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * _sign(m) * ratio

    @torch.no_grad()
    def step(self, closure=None, hessian_closure=None):
        loss = _FOLoop.step(self, closure)
        if hessian_closure is not None and self.steps % self.update_period == 0:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                hessian_closure().backward()
            for group in self.param_groups:
                b2 = group["betas"][1]
                for p in group["params"]:
                    if p.grad is not None:
                        h = self.state[p].setdefault("hessian", torch.zeros_like(p, dtype=torch.float32))
                        h.mul_(b2).add_((1 - b2) * self.hessian_batch_size * p.grad.float() ** 2)
            self.zero_grad(set_to_none=True)
        return loss


def mezo_perturb(params: list[torch.nn.Parameter], seed: int, scale: float) -> None:
    """MeZO's zo_perturb_parameters: reseed torch's generator, draw each z whole, add out of place."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z


@torch.no_grad()
def mezo_step(params: list[torch.nn.Parameter], closure, *, lr: float, mu: float, seed: int,
              weight_decay: float = 0.0) -> float:
    """One step of MeZO's own loop (Malladi et al., 2023, Algorithm 1 and its code): four passes,
    each regenerating z from torch.manual_seed. The baseline of benchmarks/test_optim_bench.py."""
    mezo_perturb(params, seed, mu)
    plus = loss_value(closure())
    mezo_perturb(params, seed, -2 * mu)
    minus = loss_value(closure())
    mezo_perturb(params, seed, mu)
    g = (plus - minus) / (2 * mu)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (g * z + weight_decay * p.data)
    return (plus + minus) / 2
