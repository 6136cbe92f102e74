"""The optimizer-grade study: unlearn the embedded model with each optimizer grade and
objective, then attack every result and measure how far it moved.

Protocol (`StudySettings`; `zounlearn study` runs it, `--quick` a smaller version):

1. Budget: every run is the demo's recipe, the same for every optimizer: `steps` steps of 8
   forget and 16 retain examples, retain weight 8 for GradDiff and NPO, eval mode.
2. Learning rate rule: for each optimizer and objective, the rates of its grid (`LR_GRID`,
   ascending, about 3x apart) are tried in order with seed 0, and the first whose forget
   question accuracy is at most `target` (comparable forgetting) is kept. When none gets
   there, the rate with the lowest forget accuracy is kept and the result is flagged
   "target not reached". The grids were set once, before the study, to bracket each
   optimizer's useful range on this model; they are not tuned toward any attack outcome.
3. Each kept (optimizer, objective, lr) is unlearned again with every seed of `seeds` (seed 0
   is the search's own run), and each result is attacked: relearning on k forget questions
   (held-out forget accuracy along the steps grid), retain-only fine-tuning, every
   quantization scheme, relative Gaussian noise, and diagnosed: L2 distance to the original
   and linear mode connectivity.
4. Evaluation for the study uses every forget and holdout example and the first
   `retain_people` retain people (their sentences, questions and 4-choice questions): the
   retain split is 9x the forget split, and a subset keeps the many evaluations affordable.

The result is a dict (written as study.json by `write_study`) with one record per (optimizer,
objective, seed).
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
from ..unlearning.data import Split, UnlearningData
from ..unlearning.evaluation import evaluate
from ..unlearning.loop import LoopConfig, unlearn
from ..unlearning.report import jsonable
from ..unlearning.synthetic import QUESTIONS, TEMPLATES
from .attacks import noise_attack, quantization_attack, relearning_attack, retain_finetune_attack
from .diagnostics import mode_connectivity, weight_distance
from .quantize import QUANTIZATION_SCHEMES

# The grades of "Downgrade to Upgrade" and the optimizers that stand for them here (grade: OPTIMIZERS[name].grade).
STUDY_OPTIMIZERS = ("adamw", "sgd", "signsgd", "signadam", "compressed_adam", "zo_sgd", "adazo", "hybrid", "sophia")
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3), "sgd": (3e-3, 1e-2, 3e-2, 1e-1),
    "signsgd": (3e-5, 1e-4, 3e-4, 1e-3), "signadam": (3e-5, 1e-4, 3e-4, 1e-3),
    "compressed_adam": (1e-4, 3e-4, 1e-3, 3e-3), "sophia": (3e-5, 1e-4, 3e-4, 1e-3),
    "zo_sgd": (1e-4, 2e-4, 2.5e-4, 3e-4, 4e-4), "adazo": (1e-4, 3e-4, 1e-3, 3e-3),
    "hybrid": (3e-4, 1e-3, 3e-3),
}
HYBRID_OPTIONS = {"block": 10}  # and zo_lr = lr / 10: AdaZO's first step is ~32x its lr (no bias correction)


@dataclass
class StudySettings:
    optimizers: tuple[str, ...] = STUDY_OPTIMIZERS
    objectives: tuple[str, ...] = ("graddiff", "npo")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 120
    target: float = 0.25
    retain_people: int = 20
    relearn_k: int = 10
    relearn_steps: tuple[int, ...] = (0, 5, 10, 20, 50)
    relearn_lr: float = 1e-3  # 1e-4 (the attacks' default) regained <= 0.05 everywhere in a trial: uninformative
    retain_finetune_steps: tuple[int, ...] = (0, 20, 50)
    schemes: tuple[str, ...] = tuple(QUANTIZATION_SCHEMES)
    noise_stds: tuple[float, ...] = (0.01, 0.03, 0.1)
    noise_draws: int = 2
    ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_batch_size: int = 64
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRID))

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS or o not in self.lr_grid]
        if unknown:
            raise UsageError(f"the study has no learning-rate grid for {', '.join(unknown)}; use some of "
                             f"{', '.join(self.lr_grid)}")
        if not self.optimizers or not self.objectives or not self.seeds:
            raise UsageError("the study needs at least one optimizer, objective and seed")
        for objective in self.objectives:  # an unknown objective fails now, not after the first evaluations
            loop_config(self, self.optimizers[0], objective, lr=1e-3, seed=0)  # any rate and seed: only checks

    @classmethod
    def quick(cls) -> StudySettings:
        """One objective, one optimizer per grade that matters most for the seed papers' claims,
        short grids: about 3 minutes on a 2-core CPU."""
        return cls(optimizers=("adamw", "signadam", "zo_sgd", "hybrid"), objectives=("npo",), seeds=(0,),
                   relearn_steps=(0, 10, 30), retain_finetune_steps=(0, 30), schemes=("int8", "int4-g64", "nf4-g64"),
                   noise_stds=(0.03,), noise_draws=1, ts=(0.0, 0.5, 1.0),
                   lr_grid={k: v[1:] for k, v in LR_GRID.items()})


def loop_config(settings: StudySettings, optimizer: str, objective: str, lr: float, seed: int) -> LoopConfig:
    """The study's budget for one run (the demo's recipe)."""
    options = {**HYBRID_OPTIONS, "zo_lr": lr / 10} if optimizer == "hybrid" else {}
    return LoopConfig(objective=objective, optimizer=optimizer, lr=lr, steps=settings.steps, batch_size=8,
                      retain_batch_size=16, eval_batch_size=settings.eval_batch_size, seed=seed,
                      objective_options={"retain_weight": 8.0}, optimizer_options=options)


def evaluation_data(data: UnlearningData, retain_people: int) -> UnlearningData:
    """Forget and holdout whole; the retain split cut to its first `retain_people` people."""
    retain = data.retain
    # The synthetic splits list each person's examples together, in these numbers.
    per_person = {"train": sum(len(t) for t in TEMPLATES.values()), "qa": len(QUESTIONS), "choice": len(QUESTIONS)}
    if any(len(getattr(retain, attr)) % n for attr, n in per_person.items()):
        raise ValueError("the study's evaluation subset needs the synthetic data set's layout "
                         f"({per_person} examples per person); evaluate on the whole retain split instead")
    cut = Split(retain.name, **{attr: getattr(retain, attr)[:n * retain_people] for attr, n in per_person.items()})
    return dataclasses.replace(data, retain=cut)


def run_study(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData,
              settings: StudySettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step of the protocol; `model` is left as it was (each run unlearns a copy)."""
    start = time.perf_counter()
    eval_data = evaluation_data(data, settings.retain_people)
    eval_kwargs = {"batch_size": settings.eval_batch_size}
    original = evaluate(model, tokenizer, eval_data, **eval_kwargs)
    attacks_on_original = _attacks(model, model, tokenizer, eval_data, settings, eval_kwargs, diagnostics=False)
    results, searches = [], []
    for objective in settings.objectives:
        for optimizer in settings.optimizers:
            search = _search_lr(model, tokenizer, data, eval_data, settings, optimizer, objective, log)
            searches.append({k: v for k, v in search.items() if k != "model"})
            for seed in settings.seeds:
                if seed == 0:
                    unlearned, after = search["model"], search["after"]
                else:
                    unlearned = copy.deepcopy(model)
                    after = unlearn(unlearned, tokenizer, data, loop_config(settings, optimizer, objective,
                                                                            search["lr"], seed),
                                    progress=False, eval_data=eval_data).after
                tick = time.perf_counter()
                record = {"optimizer": optimizer, "grade": OPTIMIZERS[optimizer].grade,
                          "objective": objective, "seed": seed, "lr": search["lr"], "reached": search["reached"],
                          "unlearned": after,
                          **_attacks(model, unlearned, tokenizer, eval_data, settings, eval_kwargs, diagnostics=True)}
                log(f"  attacks on {optimizer}/{objective} seed {seed}: {time.perf_counter() - tick:.0f} s")
                results.append(record)
    return {"settings": jsonable(dataclasses.asdict(settings)), "original": original,
            "original_attacks": attacks_on_original, "lr_search": searches, "results": results,
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _search_lr(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: UnlearningData,
               eval_data: UnlearningData, settings: StudySettings, optimizer: str, objective: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    """The learning-rate rule of the module docstring, with seed 0."""
    tried, best = [], None
    for lr in settings.lr_grid[optimizer]:
        unlearned = copy.deepcopy(model)
        after = unlearn(unlearned, tokenizer, data, loop_config(settings, optimizer, objective, lr, 0),
                        progress=False, eval_data=eval_data).after
        forget, retain = after.get("forget/qa_accuracy", 1.0), after.get("retain/qa_accuracy", 0.0)
        tried.append({"lr": lr, "forget/qa_accuracy": forget, "retain/qa_accuracy": retain})
        log(f"{optimizer}/{objective} lr {lr:g}: forget {forget:.2f} retain {retain:.2f}")
        reached = forget <= settings.target
        if reached or best is None or forget < best["forget"]:
            best = {"lr": lr, "forget": forget, "model": unlearned, "after": after}
        if reached:
            break
    assert best is not None
    return {"optimizer": optimizer, "objective": objective, "lr": best["lr"],
            "reached": reached, "tried": tried, "model": best["model"], "after": best["after"]}


def _attacks(original: torch.nn.Module, unlearned: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             data: UnlearningData, settings: StudySettings, eval_kwargs: dict[str, Any], *, diagnostics: bool
             ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "relearning": relearning_attack(unlearned, tokenizer, data, k=settings.relearn_k, steps=settings.relearn_steps,
                                        lr=settings.relearn_lr, eval_kwargs=eval_kwargs),
        "retain_finetune": retain_finetune_attack(unlearned, tokenizer, data, k=settings.relearn_k,
                                                  steps=settings.retain_finetune_steps, lr=settings.relearn_lr,
                                                  eval_kwargs=eval_kwargs),
        "quantization": quantization_attack(unlearned, tokenizer, data, schemes=settings.schemes,
                                            eval_kwargs=eval_kwargs),
        "noise": {str(std): value for std, value in noise_attack(
            unlearned, tokenizer, data, relative_stds=settings.noise_stds, draws=settings.noise_draws,
            eval_kwargs=eval_kwargs).items()},
    }
    if diagnostics:
        out["distance"] = weight_distance(original, unlearned)
        out["connectivity"] = mode_connectivity(original, unlearned, tokenizer, data, ts=settings.ts, **eval_kwargs)
    return out
