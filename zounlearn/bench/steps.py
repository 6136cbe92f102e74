"""One ZO-SGD step (zounlearn.optim.ZOSGD: 3 fused passes) against MeZO's own loop
(zounlearn.optim.mezo.mezo_step: 4 passes, each torch.manual_seed + torch.normal + an
out-of-place add), on the same parameters with the same closure.

With a constant closure only the optimizer's work on the parameters is timed; with a model's
loss the whole step (two forward passes) is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..optim import ZOSGD
from ..optim.mezo import mezo_step
from . import calls
from .timing import Timing, time_call

LR, MU, SEED = 1e-7, 1e-3, 7
MEZO = "MeZO loop"


def constant_loss() -> float:
    return 1.0


def zo_sgd(params: Sequence[torch.Tensor], closure: Callable[[], object], dist: str) -> Callable[[], object]:
    """A ZOSGD step on the current backend (built here, so run the returned call inside the same calls.use)."""
    opt = calls.optimizer(ZOSGD, list(params), lr=LR, mu=MU, dist=dist, seed=SEED)
    return lambda: opt.step(closure)


def mezo(params: Sequence[torch.nn.Parameter], closure: Callable[[], object]) -> Callable[[], object]:
    return lambda: mezo_step(list(params), closure, lr=LR, mu=MU, seed=SEED)


def row(kind: str, backend: str, timing: Timing, params: Sequence[torch.Tensor], label: str = "") -> dict:
    return dict(case=label, dtype=str(params[0].dtype)[6:], numel=sum(p.numel() for p in params),
                tensors=len(params), backend=backend, kind=kind, ms=timing.median * 1e3, spread=timing.spread,
                rounds=len(timing.seconds))


def add_speedups(rows: Sequence[dict]) -> None:
    """speedup: the MeZO loop's time over each row's, per case (None without a MeZO row)."""
    mezo = {r["case"]: r["ms"] for r in rows if r["kind"] == MEZO}
    for r in rows:
        r["speedup"] = mezo[r["case"]] / r["ms"] if r["case"] in mezo else None


def measure(params: Sequence[torch.nn.Parameter], closure: Callable[[], object], backends: Sequence[str], *,
            dists: Sequence[str] = ("rademacher", "gaussian"), rounds: int = 5, warmup: int = 1,
            mezo_rounds: int = 3, max_seconds: float | None = None, label: str = "") -> list[dict]:
    """Rows of ms per step and the speed-up over MeZO's loop, MeZO's own row first."""
    if not all(p.requires_grad for p in params):
        raise ValueError("the ZO-SGD step skips parameters with requires_grad=False; pass trainable ones")
    device = params[0].device
    base = time_call(mezo(params, closure), device, rounds=mezo_rounds, warmup=1, max_seconds=max_seconds)
    rows = [row(MEZO, "torch", base, params, label)]
    for backend in backends:
        with calls.use(backend):
            for dist in dists:
                t = time_call(zo_sgd(params, closure, dist), device, rounds=rounds, warmup=warmup,
                              max_seconds=max_seconds)
                rows.append(row(f"ZOSGD {dist}", backend, t, params, label))
    add_speedups(rows)
    return rows
