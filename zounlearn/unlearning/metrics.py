"""The metric registry: every key `evaluation.evaluate` reports, what kind of number it is and
which way is better, in the order tables list them.

Evaluation, the run report (report.py), the study report and the command-line tables read
this one table instead of lists of their own, so a new metric is registered here once.

Keys: our own per-split metrics are `SPLIT/NAME` (forget/qa_accuracy); the metrics that
open-unlearning also computes carry its names (forget_quality, forget_Q_A_ROUGE,
model_utility, privleak, ...), so that our numbers can be put beside published ones.
docs/unlearning.md gives each formula and its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["fraction", "pvalue", "number"]


@dataclass(frozen=True)
class Metric:
    """One key of `evaluate`'s result."""

    key: str
    group: str                       # forget, retain, privacy, holdout: where tables list it
    kind: Kind                       # fraction: in [0, 1]; pvalue: in [0, 1], often tiny; number: anything else
    higher_is_better: bool | None    # for unlearning; None: no direction (a diagnostic, or best near a goal)
    goal: float | None = None        # the best value, when it is neither end (privleak: 0)
    needs_retain_model: bool = False  # computed only against a retain (gold-standard) model

    @property
    def is_fraction(self) -> bool:
        return self.kind in ("fraction", "pvalue")


GROUPS = ("forget", "retain", "privacy", "holdout")
_SPLIT_ROLES = {"forget": False, "retain": True, "holdout": None}  # higher_is_better of an answer metric


def _split_metrics(split: str) -> list[Metric]:
    answers = _SPLIT_ROLES[split]
    losses = None if answers is None else not answers  # a retain loss should stay low; a forget loss has no goal
    return [
        Metric(f"{split}/qa_accuracy", split, "fraction", answers),
        Metric(f"{split}/choice_accuracy", split, "fraction", answers),
        Metric(f"{split}_Q_A_Prob", split, "fraction", answers),
        Metric(f"{split}_Q_A_ROUGE", split, "fraction", answers),
        Metric(f"{split}/loss", split, "number", None if split == "forget" else losses),
        Metric(f"{split}/perplexity", split, "number", None if split == "forget" else losses),
        Metric(f"{split}/min_k", split, "number", None),
    ]


def _registry() -> dict[str, Metric]:
    forget, retain, holdout = (_split_metrics(split) for split in ("forget", "retain", "holdout"))
    entries = [
        *forget[:2],
        Metric("forget_quality", "forget", "pvalue", True, needs_retain_model=True),
        *forget[2:4],
        Metric("forget_truth_ratio", "forget", "fraction", True),
        Metric("extraction_strength", "forget", "fraction", False),
        Metric("exact_memorization", "forget", "fraction", False),
        *forget[4:],
        *retain[:2],
        Metric("model_utility", "retain", "fraction", True),
        *retain[2:4],
        Metric("retain_Truth_Ratio", "retain", "fraction", True),
        *retain[4:],
        Metric("mia_min_k", "privacy", "fraction", None),
        Metric("privleak", "privacy", "number", None, goal=0.0, needs_retain_model=True),
        *holdout,
    ]
    return {m.key: m for m in entries}


METRICS: dict[str, Metric] = _registry()


def metric(key: str) -> Metric | None:
    """The registered metric of a key, or None for a key no one registered."""
    return METRICS.get(key)


def is_fraction(key: str) -> bool:
    """Whether a key's values lie in [0, 1]; an unregistered key is not assumed to."""
    known = METRICS.get(key)
    return known is not None and known.is_fraction


def ordered(keys: set[str] | list[str] | tuple[str, ...]) -> list[str]:
    """The keys in table order: registered ones as registered, then the others by group and name."""
    present = set(keys)
    known = [key for key in METRICS if key in present]
    groups = {group: i for i, group in enumerate(GROUPS)}

    def position(key: str) -> tuple[int, str]:
        prefix = key.split("/", 1)[0] if "/" in key else key.split("_", 1)[0]
        return groups.get(prefix, len(groups)), key

    return known + sorted(present - set(METRICS), key=position)


def format_metric(value: float, key: str, *, signed: bool = False) -> str:
    """A value as tables show it: fractions with 3 decimals, p-values below 0.001 in scientific notation,
    other numbers with 4 significant digits."""
    if math.isnan(value):
        return "nan"  # format() would say "+nan" when signed
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    sign = "+" if signed else ""
    known = METRICS.get(key)
    if known is not None and known.kind == "pvalue" and value != 0 and abs(value) < 1e-3:
        return f"{value:{sign}.2e}"
    if known is not None and known.is_fraction:
        return f"{value:{sign}.3f}"
    scientific = f"{value:{sign}.3e}"
    exponent = int(scientific.rsplit("e", 1)[1])  # after rounding to 4 digits: 0.09999999 counts as 0.1000
    if -3 <= exponent < 4:  # 4 significant digits, trailing zeros kept so columns line up
        return f"{value:{sign}.{3 - exponent}f}"
    return scientific
