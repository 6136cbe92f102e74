"""The optimizer-grade study (v2): unlearn the embedded model with each optimizer grade and
objective under matched compute, choose each learning rate by utility parity, attack every
result at its strongest point and along its curve, and compare with the retrain model.

Protocol (`StudySettings`; `zounlearn study` runs it, `--quick` a smaller version). Every rule
is fixed here, in code, and none reads an attack's outcome:

1. Models. The embedded model at `model_size` (Original) and its retrain model (Retrain: the
   same initialisation and recipe without the forget people, `unlearning.model.retrain_model`),
   the gold standard of forget_quality and privleak and the attacks' control.
2. Compute. A run's budget is counted in forward-pass equivalents (one evaluation of the
   objective on a step's forget and retain batches): a first-order step costs 3 (forward and
   backward), Sophia's 3 plus its Hessian estimate (a forward and backward on the forget batch
   alone, half a loss evaluation, every update_period = 10 steps), a q-query central ZO step
   2q, the hybrid the mean of its blocks (10 Adam steps, 10 AdaZO steps: 2.5). Every arm gets
   `budget` = 360 (120 first-order steps); the zeroth-order optimizers also get a longer
   budget, `zo_budget_factor` = 10 times more (an arm of their own, "zo_sgd x10"), so that ZO is
   compared where it can forget without collapsing, if it can.
3. Learning rate by utility parity. For each arm and objective, every rate of its grid
   (`LR_GRID`, about 3x apart, set once to bracket each optimizer's useful range on the small
   model) is run with seed 0; among the rates whose forget question accuracy is at most
   `target`, the one with the highest model_utility is kept. When none reaches the target, the
   rate with the lowest forget accuracy is kept and the result is flagged "target not reached".
   A rate whose run diverges (the loop's divergence guard) is recorded as such and never kept.
   A result whose retain question accuracy fell below half the original's is "collapsed".
4. Seeds. Each kept (arm, objective, lr) is run with every seed of `seeds` (seed 0 is the
   search's own run); a seed fixes the batches, the ZO directions, and which k examples the
   attacks fine-tune on, so that arms are compared pairwise, seed by seed (stats.py).
5. Attacks, on every result, on the Original and on the Retrain model (the control: what
   relearning on k forget questions teaches a model that never saw them; the people's facts are
   independent), each seed:
   - relearning: AdamW on k forget questions, evaluated on the held-out forget questions after
     each number of steps of `relearn_steps`; its strongest point is the number of steps with
     the highest held-out forget question accuracy (an attacker picks it), reported beside
     the whole curve;
   - retain-only fine-tuning: the same on k retain questions, on the whole evaluation data;
   - quantization (`schemes`; the worst 4-bit scheme is reported) and relative Gaussian noise;
   - the attack learning rate is calibrated on the Original model alone, before any unlearned
     model is attacked: the largest rate of `attack_lr_grid` at which, at every step of both
     fine-tuning curves (seed 0), the Original's held-out forget and retain question accuracy
     stay within `attack_damage` of their starting values.
6. Diagnostics: the L2 distance to the Original; the forget- and retain-loss barriers on the
   line from the Original to each result, and from AdamW's result (same objective and seed) to
   each other arm's (linear mode connectivity between unlearned solutions).
7. Evaluation: every forget and holdout example and the first `retain_people` retain people
   (their sentences and questions; the multiple-choice questions are left out: no table reads
   them), against the Retrain model; the attacks compute only `STUDY_METRICS`.

The result is a dict (written as study.json by `study_report.write_study`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UsageError
from ..optim.registry import OPTIMIZERS
from ..unlearning.callbacks import Diverged
from ..unlearning.data import Split, UnlearningData
from ..unlearning.evaluation import RetainReference, evaluate, register_retain_model
from ..unlearning.loop import LoopConfig, unlearn
from ..unlearning.model import EmbeddedConfig
from ..unlearning.report import jsonable
from ..unlearning.synthetic import QUESTIONS, TEMPLATES
from .attacks import noise_attack, quantization_attack, relearning_attack, retain_finetune_attack
from .diagnostics import mode_connectivity, weight_distance
from .quantize import QUANTIZATION_SCHEMES

FORGET, RETAIN = "forget/qa_accuracy", "retain/qa_accuracy"
# What the tables and rules read: the attacks' evaluations compute these only (evaluate's `metrics`).
STUDY_METRICS = (FORGET, RETAIN, "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility", "forget_quality", "privleak",
                 "forget/loss", "retain/loss")
STUDY_OPTIMIZERS = ("adamw", "sgd", "signsgd", "signadam", "compressed_adam", "zo_sgd", "adazo", "hybrid", "sophia")
ZEROTH_ORDER = ("zo_sgd", "adazo")
REFERENCE_ARM = "adamw"  # what the other arms are compared with, pair by pair
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3), "sgd": (3e-3, 1e-2, 3e-2, 1e-1),
    "signsgd": (3e-5, 1e-4, 3e-4, 1e-3), "signadam": (3e-5, 1e-4, 3e-4, 1e-3),
    "compressed_adam": (1e-4, 3e-4, 1e-3, 3e-3), "sophia": (3e-5, 1e-4, 3e-4, 1e-3),
    "zo_sgd": (5e-5, 1e-4, 2e-4, 4e-4), "adazo": (1e-4, 3e-4, 1e-3, 3e-3), "hybrid": (3e-4, 1e-3, 3e-3),
    # the longer zeroth-order budget: more steps, smaller rates (bracketed by a trial of forgetting alone)
    "zo_sgd x10": (2e-5, 3e-5, 5e-5), "adazo x10": (1e-4, 2e-4, 3e-4),
}
HYBRID_OPTIONS = {"block": 10}  # and zo_lr = lr / 10: AdaZO's first step is ~32x its lr (no bias correction)
SOPHIA_UPDATE_PERIOD = 10  # SophiaG's default
MODEL_SIZES = {
    "small": EmbeddedConfig(),
    "medium": EmbeddedConfig(name="zounlearn-gpt2-medium", n_layer=4, n_embd=128, n_head=4),
    "large": EmbeddedConfig(name="zounlearn-gpt2-large", n_layer=6, n_embd=256, n_head=8),
}


@dataclass(frozen=True)
class Arm:
    """An optimizer at a budget: "matched" (every arm's compute) or "long" (zo_budget_factor times it)."""

    optimizer: str
    long: bool = False

    def name(self, factor: int) -> str:
        return f"{self.optimizer} x{factor}" if self.long else self.optimizer


def step_cost(optimizer: str, queries: int = 1) -> float:
    """Forward-pass equivalents of one step (module docstring, point 2)."""
    grade = OPTIMIZERS[optimizer].grade
    if grade == "zeroth-order":
        return 2.0 * queries
    if optimizer == "sophia":
        return 3.0 + 1.5 / SOPHIA_UPDATE_PERIOD
    if optimizer == "hybrid":
        return (3.0 + 2.0 * queries) / 2  # equal FO and ZO blocks
    return 3.0


@dataclass
class StudySettings:
    optimizers: tuple[str, ...] = STUDY_OPTIMIZERS
    objectives: tuple[str, ...] = ("graddiff", "npo")
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: float = 360.0
    zo_budget_factor: int = 10
    target: float = 0.25
    retain_people: int = 10
    relearn_k: int = 10
    relearn_steps: tuple[int, ...] = (0, 10, 20, 50, 100)
    retain_finetune_steps: tuple[int, ...] = (0, 25, 100)
    attack_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    attack_damage: float = 0.1
    schemes: tuple[str, ...] = ("int8", "int4-g64", "nf4-g64")
    noise_stds: tuple[float, ...] = (0.1,)
    noise_draws: int = 1
    ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_batch_size: int = 128
    model_size: str = "small"
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRID))

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise UsageError(f"unknown model size {self.model_size!r}; use one of {', '.join(MODEL_SIZES)}")
        if not self.optimizers or not self.objectives or not self.seeds:
            raise UsageError("the study needs at least one optimizer, objective and seed")
        if REFERENCE_ARM not in self.optimizers:
            raise UsageError(f"the study compares every arm with {REFERENCE_ARM}; keep it in the optimizers")
        unknown = [a.name(self.zo_budget_factor) for a in self.arms() if a.name(self.zo_budget_factor)
                   not in self.lr_grid or a.optimizer not in OPTIMIZERS]
        if unknown:
            raise UsageError(f"the study has no learning-rate grid for {', '.join(unknown)}; use some of "
                             f"{', '.join(o for o in self.lr_grid if ' ' not in o)}")
        unknown_schemes = [s for s in self.schemes if s not in QUANTIZATION_SCHEMES]
        if unknown_schemes:
            raise UsageError(f"unknown quantization scheme {unknown_schemes[0]!r}")
        for objective in self.objectives:  # an unknown objective fails now, not after the first evaluations
            loop_config(self, Arm(self.optimizers[0]), objective, lr=1e-3, seed=0)  # any rate and seed: checks

    def arms(self) -> list[Arm]:
        """Every optimizer at the matched budget, then the zeroth-order ones at the long budget."""
        return [Arm(o) for o in self.optimizers] + [Arm(o, long=True) for o in self.optimizers if o in ZEROTH_ORDER]

    def steps(self, arm: Arm) -> int:
        return round(self.budget * (self.zo_budget_factor if arm.long else 1) / step_cost(arm.optimizer))

    @classmethod
    def quick(cls) -> StudySettings:
        """NPO, the four optimizers that matter most for the seed papers' claims, two seeds, short grids and a
        4x ZO budget: about 5 minutes on a 2-core CPU."""
        return cls(optimizers=("adamw", "signadam", "zo_sgd", "hybrid"), objectives=("npo",), seeds=(0, 1),
                   zo_budget_factor=4, relearn_steps=(0, 10, 30), retain_finetune_steps=(0, 30),
                   attack_lr_grid=(3e-4, 1e-3), schemes=("int8", "int4-g64"), noise_stds=(), ts=(0.0, 0.5, 1.0),
                   lr_grid={"adamw": (3e-4, 1e-3), "signadam": (1e-4, 3e-4), "zo_sgd": (1e-4, 2e-4),
                            "hybrid": (3e-4, 1e-3), "zo_sgd x4": (5e-5, 1e-4)})


def loop_config(settings: StudySettings, arm: Arm, objective: str, lr: float, seed: int) -> LoopConfig:
    """The study's recipe for one run: 8 forget and 16 retain examples a step, retain weight 8 for GradDiff and
    NPO (the demo's), the arm's steps."""
    options = {**HYBRID_OPTIONS, "zo_lr": lr / 10} if arm.optimizer == "hybrid" else {}
    return LoopConfig(objective=objective, optimizer=arm.optimizer, lr=lr, steps=settings.steps(arm), batch_size=8,
                      retain_batch_size=16, eval_batch_size=settings.eval_batch_size, seed=seed,
                      objective_options={"retain_weight": 8.0} if objective in ("graddiff", "npo") else {},
                      optimizer_options=options)


def evaluation_data(data: UnlearningData, retain_people: int) -> UnlearningData:
    """Forget and holdout whole, the retain split cut to its first `retain_people` people; no multiple choice."""
    retain = data.retain
    # The synthetic splits list each person's examples together, in these numbers.
    per_person = {"train": sum(len(t) for t in TEMPLATES.values()), "qa": len(QUESTIONS)}
    if any(len(getattr(retain, attr)) % n for attr, n in per_person.items()):
        raise ValueError("the study's evaluation subset needs the synthetic data set's layout "
                         f"({per_person} examples per person); evaluate on the whole retain split instead")
    cut = Split(retain.name, **{attr: getattr(retain, attr)[:n * retain_people] for attr, n in per_person.items()})
    no_choice = {"choice": ()}
    holdout = dataclasses.replace(data.holdout, **no_choice) if data.holdout is not None else None
    return UnlearningData(dataclasses.replace(data.forget, **no_choice), cut, holdout)


@dataclass
class _Context:
    """What every run and attack of one study shares."""

    original: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: UnlearningData
    eval_data: UnlearningData
    settings: StudySettings
    eval_kwargs: dict[str, Any]
    log: Callable[[str], None]
    collapse: float = 0.0  # half the Original's retain question accuracy
    attack_lr: float = 0.0


def run_study(model: torch.nn.Module, retrain: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
              data: UnlearningData, settings: StudySettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step of the protocol; `model` and `retrain` are left as they were (each run unlearns a copy)."""
    start = time.perf_counter()
    eval_data = evaluation_data(data, settings.retain_people)
    reference = RetainReference(retrain)
    register_retain_model(eval_data, reference)  # the loop's own evaluations compare with it too
    context = _Context(model, tokenizer, data, eval_data, settings,
                       {"batch_size": settings.eval_batch_size, "retain_model": reference, "metrics": STUDY_METRICS},
                       log)
    every = {**context.eval_kwargs, "metrics": None}  # the two rows of reference: every metric
    models = {"original": evaluate(model, tokenizer, eval_data, **every),
              "retrain": evaluate(retrain, tokenizer, eval_data, **every)}
    context.collapse = 0.5 * models["original"][RETAIN]
    context.attack_lr, calibration = calibrate_attack_lr(context)
    log(f"attack learning rate: {context.attack_lr:g}")
    searches = {(objective, arm): search_lr(context, arm, objective)  # every rate chosen before any attack
                for objective in settings.objectives for arm in settings.arms()}
    controls = {name: {str(seed): attacks(context, network, seed) for seed in settings.seeds}
                for name, network in (("original", model), ("retrain", retrain))}
    results = []
    for objective in settings.objectives:
        for seed in settings.seeds:
            unlearned = {arm: _unlearned(context, searches[objective, arm], arm, objective, seed)
                         for arm in settings.arms()}
            reference_model = unlearned[Arm(REFERENCE_ARM)][0]
            for arm, (network, after) in unlearned.items():
                tick = time.perf_counter()
                search = searches[objective, arm]
                record = {"arm": arm.name(settings.zo_budget_factor), "optimizer": arm.optimizer,
                          "grade": OPTIMIZERS[arm.optimizer].grade, "budget": "long" if arm.long else "matched",
                          "steps": settings.steps(arm), "compute": settings.steps(arm) * step_cost(arm.optimizer),
                          "objective": objective, "seed": seed, "lr": search["lr"], "reached": search["reached"],
                          "collapsed": after.get(RETAIN, 0.0) < context.collapse, "unlearned": after,
                          **attacks(context, network, seed),
                          **diagnostics(context, network, reference_model if arm != Arm(REFERENCE_ARM) else None)}
                log(f"  attacks on {record['arm']}/{objective} seed {seed}: {time.perf_counter() - tick:.0f} s")
                results.append(record)
    return {"settings": jsonable(dataclasses.asdict(settings)), "models": models,
            "attack_lr": {"chosen": context.attack_lr, "tried": calibration}, "controls": controls,
            "lr_search": [{k: v for k, v in s.items() if k != "model"} for s in searches.values()],
            "results": results, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _run(context: _Context, arm: Arm, objective: str, lr: float, seed: int) -> tuple[torch.nn.Module, dict]:
    unlearned = copy.deepcopy(context.original)
    config = loop_config(context.settings, arm, objective, lr, seed)
    after = unlearn(unlearned, context.tokenizer, context.data, config, progress=False,
                    eval_data=context.eval_data).after
    return unlearned, after


def _unlearned(context: _Context, search: dict[str, Any], arm: Arm, objective: str, seed: int
               ) -> tuple[torch.nn.Module, dict]:
    if seed == 0:
        return search["model"], search["after"]
    return _run(context, arm, objective, search["lr"], seed)


def search_lr(context: _Context, arm: Arm, objective: str) -> dict[str, Any]:
    """The learning-rate rule of the module docstring (point 3), with seed 0."""
    settings, name = context.settings, arm.name(context.settings.zo_budget_factor)
    tried, runs = [], []
    for lr in settings.lr_grid[name]:
        try:
            model, after = _run(context, arm, objective, lr, 0)
        except Diverged:  # a rate too high for the arm: recorded, never chosen
            tried.append({"lr": lr, "diverged": True, "reached": False, "collapsed": True})
            runs.append(None)
            context.log(f"{name}/{objective} lr {lr:g} ({settings.steps(arm)} steps): diverged")
            continue
        forget, utility = after.get(FORGET, 1.0), after.get("model_utility", 0.0)
        tried.append({"lr": lr, FORGET: forget, RETAIN: after.get(RETAIN, 0.0), "model_utility": utility,
                      "reached": forget <= settings.target, "collapsed": after.get(RETAIN, 0.0) < context.collapse})
        runs.append((model, after))
        context.log(f"{name}/{objective} lr {lr:g} ({settings.steps(arm)} steps): forget {forget:.2f} "
                    f"retain {after.get(RETAIN, 0.0):.2f} utility {utility:.3f}")
    finished = [i for i, run in enumerate(runs) if run is not None]
    if not finished:
        raise Diverged(f"{name}/{objective}: every learning rate of its grid diverged "
                       f"({', '.join(f'{lr:g}' for lr in settings.lr_grid[name])})")
    reached = [i for i in finished if tried[i]["reached"]]
    best = max(reached, key=lambda i: tried[i]["model_utility"]) if reached else \
        min(finished, key=lambda i: tried[i][FORGET])
    return {"arm": name, "objective": objective, "lr": tried[best]["lr"], "reached": bool(reached),
            "tried": tried, "model": runs[best][0], "after": runs[best][1]}


def _fine_tuning(context: _Context, network: torch.nn.Module, seed: int, lr: float) -> dict[str, Any]:
    settings, kwargs = context.settings, context.eval_kwargs
    return {"relearning": relearning_attack(network, context.tokenizer, context.eval_data, k=settings.relearn_k,
                                            steps=settings.relearn_steps, lr=lr, seed=seed, eval_kwargs=kwargs,
                                            whole=False),
            "retain_finetune": retain_finetune_attack(network, context.tokenizer, context.eval_data,
                                                      k=settings.relearn_k, steps=settings.retain_finetune_steps,
                                                      lr=lr, seed=seed, eval_kwargs=kwargs)}


def calibrate_attack_lr(context: _Context) -> tuple[float, list[dict[str, Any]]]:
    """The attack rate rule of the module docstring (point 5), on the Original model and seed 0."""
    tried = []
    for lr in context.settings.attack_lr_grid:
        curves = _fine_tuning(context, context.original, 0, lr)
        drops = {}
        for attack, split, key in (("relearning", "heldout", FORGET), ("relearning", "heldout", RETAIN),
                                   ("retain_finetune", "whole", FORGET), ("retain_finetune", "whole", RETAIN)):
            values = [m[key] for m in curves[attack][split]]
            drops[f"{attack}/{key}"] = values[0] - min(values)
        tried.append({"lr": lr, "largest_drop": max(drops.values()), "drops": drops})
        context.log(f"attack lr {lr:g}: the Original's largest accuracy drop along the curves "
                    f"{max(drops.values()):.2f}")
    # Accuracies are multiples of 1/questions: a drop of exactly attack_damage must not fail by a rounding error.
    safe = [t["lr"] for t in tried if t["largest_drop"] <= context.settings.attack_damage + 1e-9]
    return (max(safe) if safe else min(context.settings.attack_lr_grid)), tried


def attacks(context: _Context, network: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Both fine-tuning curves at the calibrated rate, quantization and noise, on a copy of `network`."""
    settings, kwargs = context.settings, context.eval_kwargs
    out = _fine_tuning(context, network, seed, context.attack_lr)
    out["quantization"] = quantization_attack(network, context.tokenizer, context.eval_data, schemes=settings.schemes,
                                              eval_kwargs=kwargs)
    if settings.noise_stds:
        out["noise"] = {str(std): value for std, value in noise_attack(
            network, context.tokenizer, context.eval_data, relative_stds=settings.noise_stds,
            draws=settings.noise_draws, seed=seed, eval_kwargs=kwargs).items()}
    return out


def diagnostics(context: _Context, network: torch.nn.Module, reference: torch.nn.Module | None) -> dict[str, Any]:
    """L2 to the Original, loss barriers from the Original and from the reference arm's solution."""
    options = {"ts": context.settings.ts, "losses_only": True, "batch_size": context.settings.eval_batch_size}
    out = {"distance": weight_distance(context.original, network),
           "connectivity": mode_connectivity(context.original, network, context.tokenizer, context.eval_data,
                                             **options)}
    if reference is not None:
        out["connectivity_to_reference"] = mode_connectivity(reference, network, context.tokenizer,
                                                             context.eval_data, **options)
    return out
