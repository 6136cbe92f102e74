"""Every call that zounlearn.bench, scripts/gpu_check and tests/test_gpu_paths.py make to the fused
ops and optimizers, and every choice of backend, in one place:

    with calls.use("triton"):                       # zounlearn.ops.backends.use, or None: the default
        calls.perturb_(params, [mu], seed)
        calls.zo_update_(params, [g], seed, [0], offsets, rule=Rule.ADAZO, m=m, v=v, lr=1e-4, beta1=0.9)
        opt = calls.optimizer(ZOSGD, params, lr=1e-6)  # build *and* step it inside the block

The update ops take the rules' scalars as keywords: lr, weight_decay, decoupled, beta1, beta2,
eps, step, bits, rho (those of zounlearn.ops.rules.Hyper.make), and rounding= as the ops do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..ops import backends, flat_offsets, perturb, update
from ..ops.rules import RULES, ZO_RULES, Hyper, Rule

GRAD_RULES = tuple(RULES)
_CURRENT: list[str | None] = [None]  # the backend of the innermost use() block


@contextlib.contextmanager
def use(backend: str | None) -> Iterator[None]:
    """Run the calls below (ops and optimizer steps) on `backend`; None: the default choice."""
    previous = _CURRENT[0]
    _CURRENT[0] = backend
    try:
        if backend is None:
            yield
        else:
            with backends.use(backend):
                yield
    finally:
        _CURRENT[0] = previous


def current() -> str | None:
    return _CURRENT[0]


def runnable(device_type: str) -> list[str]:
    """The compiled backends (not the reference) that can run on device_type tensors here."""
    return [name for name, why in backends.status().items()
            if why is None and name != "reference" and backends.runs_on(name, device_type)]


def unavailable() -> dict[str, str]:
    """Backend name -> why it cannot run here."""
    return {name: why for name, why in backends.status().items() if why is not None}


def describe() -> dict[str, str]:
    """Backend name -> "available" (with what it was built for) or why it cannot run here."""
    return {name: (f"available {backends.build_info(name)}".strip() if why is None else why)
            for name, why in backends.status().items()}


def perturb_(params: Sequence[torch.Tensor], coefs: Sequence[float], seed: int, *,
             streams: Sequence[int] | None = None, offsets: Sequence[int] | None = None, alpha: float = 1.0,
             dist: str = "rademacher") -> None:
    perturb.perturb_(list(params), list(coefs), seed, streams=streams, offsets=offsets, alpha=alpha, dist=dist)


def sample(shape: int | Sequence[int], seed: int, stream: int = 0, *, offset: int = 0, dist: str = "rademacher",
           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    return perturb.sample(shape, seed, stream, offset=offset, dist=dist, dtype=dtype, device=device)


def zo_update_(params: Sequence[torch.Tensor], coefs: Sequence[float], seed: int, streams: Sequence[int],
               offsets: Sequence[int], *, rule: Rule, m: Sequence[torch.Tensor] = (),
               v: Sequence[torch.Tensor] = (), restore: float = 0.0, dist: str = "rademacher",
               rounding: str = "nearest", **scalars: Any) -> None:
    update.zo_update_(params, coefs, seed, streams, offsets, rule=rule, hyper=_hyper(scalars), m=m, v=v,
                      restore=restore, dist=dist, rounding=rounding)


def grad_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, rule: Rule,
                 m: Sequence[torch.Tensor] = (), v: Sequence[torch.Tensor] = (),
                 scales: torch.Tensor | None = None, rounding: str = "nearest", **scalars: Any) -> None:
    update.grad_update_(params, grads, rule=rule, hyper=_hyper(scalars), m=m, v=v, scales=scales, rounding=rounding)


def optimizer(cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer; it runs on the backend of the use() block its steps are taken in."""
    return cls(params, **kwargs)


def _hyper(scalars: dict[str, Any]) -> Hyper:
    return Hyper.make(scalars.pop("lr"), **scalars)


__all__ = ["GRAD_RULES", "RULES", "Rule", "ZO_RULES", "current", "describe", "flat_offsets", "grad_update_",
           "optimizer", "perturb_", "runnable", "sample", "unavailable", "use", "zo_update_"]
