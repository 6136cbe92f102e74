"""One record per zounlearn optimizer, as torch/testing/_internal/common_optimizers.py keeps its
OptimizerInfo table: what to build it with, how it may fail, how fast it must converge, its loop
twin, and what it supports. tests/test_optim.py draws its generic tests from OPTIMIZERS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import loop_twins
import torch

from zounlearn import optim


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: Callable[..., torch.optim.Optimizer]
    # Two param groups' own options (tensors 0, 2 and tensors 1, 3) and the optimizer-wide ones.
    groups: tuple[dict[str, Any], dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    twin: Callable[..., Any] | None = None  # its pure-PyTorch loop version (tests/loop_twins.py)
    # Least squares from zero: the loss must fall below factor * initial within steps.
    convergence: tuple[dict[str, Any], int, float] | None = None
    error_inputs: tuple[tuple[dict[str, Any], str], ...] = ()  # (constructor kwargs, message)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    zeroth_order: bool = False
    keeps_moments: bool = True  # float32 state besides the step counts
    hessian: bool = False  # takes a hessian_closure (SophiaG)

    @property
    def seeded(self) -> bool:
        return self.zeroth_order or self.cls is optim.HybridFOZO


def _zo(name, cls, twin, groups, options, convergence, errors=(), moments=True) -> OptimizerInfo:
    return OptimizerInfo(name, cls, groups, options, twin, convergence, errors, zeroth_order=True,
                         keeps_moments=moments)


ZO_ERRORS = (({"queries": 9}, "queries must be an integer from 1 to 8"), ({"dist": "uniform"}, "dist must be one of"),
             ({"estimator": "backward"}, "estimator must be one of"), ({"mu": 0.0}, "invalid mu"),
             ({"lr": -1.0}, "invalid lr"))

OPTIMIZERS: dict[str, OptimizerInfo] = {info.name: info for info in [
    _zo("ZOSGD", optim.ZOSGD, loop_twins.ZOSGD, ({"lr": 2e-2}, {"lr": 1e-2, "weight_decay": 0.1}), {},
        ({"lr": 0.02, "mu": 1e-3}, 300, 0.3), ZO_ERRORS, moments=False),
    _zo("ZOSGD-momentum", optim.ZOSGD, loop_twins.ZOSGD,
        ({"lr": 1e-2, "momentum": 0.9}, {"lr": 5e-3, "momentum": 0.5, "weight_decay": 0.1, "mu": 2e-2}),
        {"queries": 3}, ({"lr": 0.005, "momentum": 0.9, "mu": 1e-3}, 300, 0.3),
        (({"momentum": 1.5}, "invalid momentum"),)),
    _zo("ZOSignSGD", optim.ZOSignSGD, loop_twins.ZOSignSGD, ({"lr": 1e-2}, {"lr": 2e-2, "weight_decay": 0.1}),
        {"dist": "gaussian"}, ({"lr": 0.01, "mu": 1e-3, "queries": 4}, 300, 0.3), moments=False),
    _zo("ZOAdam", optim.ZOAdam, loop_twins.ZOAdam,
        ({"lr": 1e-2}, {"lr": 2e-2, "betas": (0.8, 0.99), "weight_decay": 0.1}), {"estimator": "forward", "queries": 2},
        ({"lr": 0.03, "mu": 1e-3, "queries": 4}, 300, 0.3), (({"betas": (0.9,)}, "betas must be a pair"),)),
    _zo("AdaZO", optim.AdaZO, loop_twins.AdaZO, ({"lr": 1e-2}, {"lr": 3e-2, "betas": (0.8, 0.9), "eps": 1e-6}),
        {"dist": "sphere"}, ({"lr": 0.03, "mu": 1e-3, "queries": 4}, 300, 0.3),
        (({"betas": (0.9, 1.0)}, r"invalid betas\[1\]"), ({"eps": 0.0}, "invalid eps"))),
    _zo("ZOSignAdam", optim.ZOSignAdam, loop_twins.ZOSignAdam,
        ({"lr": 1e-2}, {"lr": 2e-2, "beta": 0.5, "weight_decay": 0.1}), {"queries": 2},
        ({"lr": 0.01, "mu": 1e-3, "queries": 4}, 300, 0.3), (({"beta": 1.5}, "invalid beta"),)),
    OptimizerInfo("SignSGD", optim.SignSGD, ({"lr": 1e-2}, {"lr": 2e-2, "weight_decay": 0.1}), {}, loop_twins.SignSGD,
                  ({"lr": 0.01}, 100, 0.1), (({"weight_decay": -1.0}, "invalid weight_decay"),), keeps_moments=False),
    OptimizerInfo("SignAdam", optim.SignAdam, ({"lr": 1e-2}, {"lr": 2e-2, "beta": 0.5, "weight_decay": 0.1}), {},
                  loop_twins.SignAdam, ({"lr": 0.01}, 100, 0.1), (({"beta": 1.5}, "invalid beta"),)),
    OptimizerInfo("CompressedAdam", optim.CompressedAdam, ({"lr": 1e-2}, {"lr": 2e-2, "bits": 2, "weight_decay": 0.1}),
                  {"bits": 4}, loop_twins.CompressedAdam, ({"lr": 0.02, "bits": 4}, 100, 0.1),
                  (({"bits": 0}, "bits must be an integer from 1 to 16"),)),
    OptimizerInfo("CompressedAdam-1bit", optim.CompressedAdam, ({"lr": 1e-2}, {"lr": 2e-2, "betas": (0.8, 0.9)}),
                  {"bits": 1}, loop_twins.CompressedAdam),
    OptimizerInfo("SophiaG", optim.SophiaG, ({"lr": 1e-2}, {"lr": 2e-2, "rho": 0.1}),
                  {"update_period": 2, "hessian_batch_size": 8}, loop_twins.SophiaG,
                  ({"lr": 0.02, "weight_decay": 0.0}, 100, 0.1),
                  (({"update_period": 0}, "update_period must be an integer >= 1"), ({"rho": 0.0}, "invalid rho")),
                  hessian=True),
    OptimizerInfo("AdamW", optim.AdamW, ({"lr": 1e-2}, {"lr": 2e-2, "betas": (0.8, 0.99), "weight_decay": 0.1}), {},
                  loop_twins.AdamW, ({"lr": 0.05}, 100, 0.1), (({"betas": [0.9]}, "betas must be a pair"),)),
    OptimizerInfo("SGD", optim.SGD,
                  ({"lr": 1e-2, "momentum": 0.9}, {"lr": 5e-3, "momentum": 0.5, "weight_decay": 0.1}), {},
                  loop_twins.SGD, ({"lr": 0.01, "momentum": 0.9}, 100, 0.1),
                  (({"momentum": -0.1}, "invalid momentum"),)),
    OptimizerInfo("HybridFOZO", optim.HybridFOZO, ({"lr": 1e-2, "zo_lr": 1e-2}, {"lr": 2e-2, "zo_lr": 5e-3}),
                  {"block": 2, "zo_block": 1, "total_steps": 7,
                   "fo_optimizer": lambda groups: optim.SignAdam(groups),
                   "zo_optimizer": lambda groups: optim.AdaZO(groups, mu=1e-2, seed=5)},
                  loop_twins.HybridFOZO, ({"lr": 0.05, "zo_lr": 1e-3, "block": 10, "total_steps": 100}, 100, 0.1),
                  (({"block": 0}, "block must be an integer >= 1"), ({"zo_lr": -1.0}, "invalid zo_lr"))),
]}


def build(info: OptimizerInfo, params: list[torch.nn.Parameter], *, twin: bool = False, **extra: Any):
    """The optimizer (or its twin) over two param groups: tensors 0, 2 and tensors 1, 3."""
    groups = [{"params": [params[0], params[2]], **info.groups[0]},
              {"params": [params[1], params[3]], **info.groups[1]}]
    options = {**info.options, **extra}
    if not twin:
        return info.cls(groups, **options)
    if info.cls is optim.HybridFOZO:
        # The hybrid's twin: the schedule from its definition over the inner optimizers' twins.
        inner = [{"params": g["params"], "lr": g["lr"]} for g in groups]
        zo_inner = [{"params": g["params"], "lr": g["zo_lr"]} for g in groups]
        return loop_twins.HybridFOZO(loop_twins.SignAdam(inner), loop_twins.AdaZO(zo_inner, mu=1e-2, seed=5),
                                     block=options["block"], zo_block=options.get("zo_block"),
                                     total_steps=options.get("total_steps"))
    return info.twin(groups, **options)
