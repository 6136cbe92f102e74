"""Optimizers by name, for the unlearning loop and the command line.

`make_optimizer("adazo", params, lr=1e-5, seed=0, mu=1e-3)` builds one; `OPTIMIZERS` lists every
name with its grade (the axis of "Downgrade to Upgrade": first order, compressed first order,
zeroth order, hybrid, second order) and its default learning rate. The defaults are the usual
starting points for LLM unlearning (1e-5 for Adam-like and sign updates, as in TOFU's and NPO's
fine-tuning runs; 1e-6 for ZO-SGD, MeZO's range), not tuned values: every model and objective
wants its own, so pass `lr`. `check_optimizer_options` validates a name and its options without
building anything a caller can see, so that a command fails before it loads a model.

First-order optimizers take `in_backward=True` (update each parameter inside backward and free
its gradient at once), `update_clip` (per-tensor update clipping, AdamW / SGD / CompressedAdam)
and `state_dtype` (the lean state, docs/memory.md: "bfloat16", every fused optimizer takes it;
"int8", 8-bit block-wise state, AdamW, SignAdam, ZOAdam, AdaZO and ZOSignAdam); "adamw" and
"sgd" then build zounlearn's fused AdamW and SGD, torch.optim's math. The hybrid presets
(HYBRID_PRESETS) are hybrids by name: "hybrid" is the paper's (AdamW + AdaZO) with its first-order
phase in backward and bfloat16 states, "hybrid_float32" the paper's as published, the others leaner
(docs/memory.md says what each holds).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_betas, check_range
from ..errors import UsageError
from .base import FusedOptimizer
from .classic import SGD, AdamW
from .first_order import FirstOrderOptimizer
from .hybrid import HybridFOZO
from .sign import CompressedAdam, SignAdam, SignSGD
from .sophia import SophiaG
from .zo import ZOSGD, AdaZO, ZeroOrderOptimizer, ZOAdam, ZOSignAdam, ZOSignSGD


@dataclass(frozen=True)
class OptimizerSpec:
    cls: type[torch.optim.Optimizer]
    grade: str
    lr: float
    preset: dict[str, Any] = field(default_factory=dict)  # a hybrid preset's fixed options
    defaults: dict[str, Any] = field(default_factory=dict)  # options it sets unless given
    about: str = ""  # a hybrid preset in words, for --help and reports

    @property
    def ours(self) -> bool:
        """One of zounlearn's: it takes `seed` (its directions' and rounding's generator)."""
        return self.cls is HybridFOZO or issubclass(self.cls, FusedOptimizer)

    @property
    def zeroth_order(self) -> bool:
        return issubclass(self.cls, ZeroOrderOptimizer)


# The hybrid by name: the options each preset fixes. "hybrid" fixes none: HYBRID_DEFAULTS are its
# defaults, which any option overrides. The first-order phase updates inside backward in all but
# hybrid_float32; "shared" ones keep one state for both phases (zounlearn/optim/shared_state.py).
HYBRID_DEFAULTS = {"fo_in_backward": True, "fo_state_dtype": "bfloat16", "zo_state_dtype": "bfloat16"}
HYBRID_PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "hybrid": ({}, "the paper's (AdamW + AdaZO, each with its own m and v), lean: AdamW in backward, both states "
                   "bfloat16 with stochastic rounding (8 bytes per parameter)"),
    "hybrid_float32": ({"fo_optimizer": "adamw", "fo_in_backward": False, "zo_optimizer": "adazo",
                        "zo_state_dtype": "float32"},
                       "the paper's as published: torch's AdamW + AdaZO, AdamW's m and v in the parameters' dtype, "
                       "AdaZO's float32, the whole gradient held"),
    "hybrid_adam_shared": ({"fo_optimizer": "adamw", "fo_in_backward": True, "zo_optimizer": "zo_adam",
                            "shared_state": True, "fo_state_dtype": "bfloat16", "zo_state_dtype": "bfloat16"},
                           "AdamW in backward + ZOAdam, one shared bfloat16 m and v (4 bytes per parameter)"),
    "hybrid_signadam": ({"fo_optimizer": "signadam", "fo_in_backward": True, "zo_optimizer": "zo_sgd",
                         "fo_state_dtype": "bfloat16"},
                        "SignAdam in backward + stateless ZO-SGD (bfloat16 m: 2 bytes per parameter)"),
    "hybrid_signadam_shared": ({"fo_optimizer": "signadam", "fo_in_backward": True, "zo_optimizer": "zo_signadam",
                                "shared_state": True},
                               "SignAdam in backward + ZOSignAdam, one shared float32 m (4 bytes per parameter; "
                               "in bfloat16 it forgets less at the demo's rate)"),
    "hybrid_signsgd": ({"fo_optimizer": "signsgd", "fo_in_backward": True, "zo_optimizer": "zo_sgd"},
                       "SignSGD in backward + ZO-SGD: no optimizer state"),
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(torch.optim.AdamW, "first-order", 1e-5),
    "sgd": OptimizerSpec(torch.optim.SGD, "first-order", 1e-3),
    "signsgd": OptimizerSpec(SignSGD, "compressed first-order", 1e-5),
    "signadam": OptimizerSpec(SignAdam, "compressed first-order", 1e-5),
    "compressed_adam": OptimizerSpec(CompressedAdam, "compressed first-order", 1e-5),
    "sophia": OptimizerSpec(SophiaG, "second-order", 1e-5),
    "zo_sgd": OptimizerSpec(ZOSGD, "zeroth-order", 1e-6),
    "zo_signsgd": OptimizerSpec(ZOSignSGD, "zeroth-order", 1e-6),
    "zo_adam": OptimizerSpec(ZOAdam, "zeroth-order", 1e-5),
    "adazo": OptimizerSpec(AdaZO, "zeroth-order", 1e-5),
    "zo_signadam": OptimizerSpec(ZOSignAdam, "zeroth-order", 1e-6),
    **{name: OptimizerSpec(HybridFOZO, "hybrid", 1e-5, preset=preset, about=about,
                           defaults=HYBRID_DEFAULTS if name == "hybrid" else {})
       for name, (preset, about) in HYBRID_PRESETS.items()},
}
# The fused twins of torch.optim's, for what only zounlearn's optimizers do (in_backward, update_clip).
_FUSED = {"adamw": AdamW, "sgd": SGD}
_FIRST_ORDER_OPTIONS = ("in_backward", "update_clip", "state_dtype")

# The hybrid's own options; its zeroth-order phase's are passed as zo_<option> (e.g. zo_mu, zo_queries).
_HYBRID_OPTIONS = ("fo_lr", "zo_lr", "block", "zo_block", "fo_optimizer", "fo_in_backward", "fo_update_clip",
                   "fo_state_dtype", "zo_optimizer", "shared_state")
# torch's own optimizers check their options with bare comparisons (a string gives a TypeError
# deep inside); these run first, with our messages.
_TORCH_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "betas": lambda name, value: check_betas(value, name),
    "eps": lambda name, value: check_range(name, value, 0.0, open_low=True),
    "weight_decay": lambda name, value: check_range(name, value, 0.0),
    "momentum": lambda name, value: check_range(name, value, 0.0, 1.0),
    "dampening": lambda name, value: check_range(name, value, 0.0, 1.0),
}
_TORCH_FLAGS = ("amsgrad", "nesterov", "maximize", "foreach", "capturable", "differentiable", "fused")


def optimizer_options(name: str) -> list[str]:
    """The keyword options `make_optimizer(name, ...)` accepts besides lr and seed."""
    spec = _spec(name)
    if spec.cls is HybridFOZO:
        zo = sorted({o for n in _zeroth_order() for o in _options_of(OPTIMIZERS[n])})
        return [o for o in [*_HYBRID_OPTIONS, *(f"zo_{o}" for o in zo)] if o not in spec.preset]
    return _options_of(spec)


def _options_of(spec: OptimizerSpec) -> list[str]:
    accepted = [n for n in _keywords(spec.cls) if n not in ("params", "lr", "seed", "model")]
    if spec.zeroth_order:
        accepted += [n for n in _keywords(ZeroOrderOptimizer) if n not in ("params", "defaults", "model")]
    if spec.ours:
        accepted += [n for n in _keywords(FusedOptimizer) if n not in ("params", "defaults", "seed")]
    if issubclass(spec.cls, FirstOrderOptimizer) or spec.cls in (torch.optim.AdamW, torch.optim.SGD):
        accepted += [o for o in _FIRST_ORDER_OPTIONS if o not in accepted]
    return accepted


def make_optimizer(name: str, params: Iterable[torch.Tensor], *, lr: float | None = None, seed: int = 0,
                   total_steps: int | None = None, model: torch.nn.Module | None = None,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer called `name` over params. lr None: the default in OPTIMIZERS.

    For the hybrids, lr sets both phases unless fo_lr / zo_lr are given; fo_optimizer names the
    first-order phase's optimizer ("adamw" by default, any non-ZO name here; fo_in_backward,
    fo_update_clip and fo_state_dtype: its in_backward, update_clip and state_dtype), zo_optimizer
    the zeroth-order phase's ("adazo" by default) with the zo_* options, shared_state one state for
    both; a preset fixes some of these. total_steps lays the schedule out so the run ends on a ZO block.
    model: the module that holds params, for the zeroth-order exact mode (which "auto" picks for
    half-precision parameters). Bad names and options raise UsageError before anything is built.
    """
    spec = _spec(name)
    _check_options(name, spec, options)
    lr = spec.lr if lr is None else lr
    check_range("lr", lr, 0.0)
    params = list(params)
    if spec.cls is HybridFOZO:
        defaulted = {k: v for k, v in spec.defaults.items() if k not in options}
        try:
            return _hybrid(params, lr, seed, total_steps, model, {**defaulted, **spec.preset, **options})
        except UsageError as err:
            if not defaulted:
                raise
            in_effect = ", ".join(f"{k}={v}" for k, v in defaulted.items())
            raise UsageError(f"{err} (with {name}'s defaults {in_effect}; give any of them as an option)") from None
    if spec.ours:
        options["seed"] = seed
    if spec.zeroth_order:
        options["model"] = model
    in_backward, clip = options.pop("in_backward", False), options.pop("update_clip", None)
    if not isinstance(in_backward, bool):
        raise UsageError(f"in_backward must be true or false, got {in_backward!r}")
    cls = spec.cls
    if (in_backward or clip is not None or "state_dtype" in options) and cls.__module__.startswith("torch."):
        cls = _FUSED[name.lower()]
        torch_only = sorted(set(options) - set(_keywords(cls)) - set(_keywords(FusedOptimizer)))
        if torch_only:
            raise UsageError(f"optimizer {name} with in_backward, update_clip or state_dtype is zounlearn's fused "
                             f"{cls.__name__}, which has no option {', '.join(torch_only)}")
        options["seed"] = seed
    if not cls.__module__.startswith("torch."):
        optimizer = cls(params, lr=lr, **options)
    else:
        try:
            optimizer = cls(params, lr=lr, **options)
        except (TypeError, ValueError) as err:  # an option torch checks itself, e.g. a wrong type
            raise UsageError(f"optimizer {name}: {err}") from None
    if clip is not None:
        for group in optimizer.param_groups:
            group["update_clip"] = clip
    return optimizer.update_in_backward() if in_backward else _checked_clip(optimizer)


def _checked_clip(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    if isinstance(optimizer, FirstOrderOptimizer):
        for group in optimizer.param_groups:
            optimizer._check_clip(group)
    return optimizer


def check_optimizer_options(name: str, options: dict[str, Any], lr: float | None = None) -> None:
    """Raise UsageError, naming the option, unless make_optimizer(name, ..., **options) would build
    (it builds one over a one-element stand-in parameter and drops it)."""
    reserved = sorted(set(options) & {"lr", "seed", "total_steps", "model"})
    if reserved:
        raise UsageError(f"{', '.join(reserved)} is not an optimizer option of {name}: it is the run's own setting "
                         f"(e.g. --lr, --seed, --steps)")
    make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], lr=lr, **options)


def _check_options(name: str, spec: OptimizerSpec, options: dict[str, Any]) -> None:
    fixed = sorted(set(options) & set(spec.preset))
    if fixed:
        raise UsageError(f"the preset {name} fixes {', '.join(f'{k}={spec.preset[k]}' for k in fixed)}; choose "
                         f"another preset, or build the hybrid from optimizer 'hybrid' with your own options")
    unknown = sorted(set(options) - set(optimizer_options(name)))
    if unknown:
        raise UsageError(f"optimizer {name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(optimizer_options(name))}")
    if spec.cls.__module__.startswith("torch."):
        for key, value in options.items():
            if key in _TORCH_OPTION_CHECKS:
                _TORCH_OPTION_CHECKS[key](key, value)
            elif key in _TORCH_FLAGS and not isinstance(value, bool):
                raise UsageError(f"{key} must be true or false, got {value!r}")


def _zeroth_order() -> list[str]:
    return [n for n, s in OPTIMIZERS.items() if s.grade == "zeroth-order"]


def _hybrid(params: list[torch.Tensor], lr: float, seed: int, total_steps: int | None, model: torch.nn.Module | None,
            options: dict[str, Any]) -> HybridFOZO:
    fo_name = options.pop("fo_optimizer", "adamw")
    if not isinstance(fo_name, str) or fo_name.lower() not in OPTIMIZERS or \
            OPTIMIZERS[fo_name.lower()].grade in ("zeroth-order", "hybrid"):
        first_order = [n for n, s in OPTIMIZERS.items() if s.grade not in ("zeroth-order", "hybrid")]
        raise UsageError(f"the hybrid's fo_optimizer must be a first-order optimizer, one of "
                         f"{', '.join(first_order)}; got {fo_name!r}")
    zo_name = options.pop("zo_optimizer", "adazo")
    if not isinstance(zo_name, str) or zo_name.lower() not in _zeroth_order():
        raise UsageError(f"the hybrid's zo_optimizer must be a zeroth-order optimizer, one of "
                         f"{', '.join(_zeroth_order())}; got {zo_name!r}")
    fo_lr, zo_lr = options.pop("fo_lr", lr), options.pop("zo_lr", lr)
    check_range("fo_lr", fo_lr, 0.0)
    check_range("zo_lr", zo_lr, 0.0)
    fo_options = {key[3:]: options.pop(key) for key in ("fo_in_backward", "fo_update_clip", "fo_state_dtype")
                  if key in options}
    blocks = {key: options.pop(key) for key in ("block", "zo_block", "shared_state") if key in options}
    zo_spec = OPTIMIZERS[zo_name.lower()]
    zo = {key[3:]: value for key, value in options.items()}  # what is left: zo_<option>
    unknown = sorted(set(zo) - set(optimizer_options(zo_name)))
    if unknown:
        raise UsageError(f"the hybrid's zo_optimizer {zo_name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(optimizer_options(zo_name))} (as zo_<option>)")
    # The first-order phase's rounding under its own key: the two phases' rounding words independent.
    make_optimizer(fo_name, [torch.nn.Parameter(torch.zeros(1))], seed=seed + 1, **fo_options)  # bad ones: fail now
    return HybridFOZO(params, lr=fo_lr, zo_lr=zo_lr,
                      fo_optimizer=lambda groups: make_optimizer(fo_name, groups, seed=seed + 1, **fo_options),
                      zo_optimizer=lambda groups: zo_spec.cls(groups, lr=zo_lr, seed=seed, model=model, **zo),
                      total_steps=total_steps, seed=seed, **blocks)


def _spec(name: str) -> OptimizerSpec:
    spec = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise UsageError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    return spec


def _keywords(cls: Callable[..., Any]) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
