"""The study's outputs: study.json, tables, plots and a Markdown report whose findings are computed
from the numbers (paired comparisons with 95% intervals, stats.py), whatever they say.

Per result (arm, objective, seed), with forget/retain accuracy = question accuracy:
- the unlearned model's forget_Q_A_Prob, forget_Q_A_ROUGE, model_utility, forget_quality and
  privleak (evaluation.py);
- each fine-tuning attack at its strongest point: the number of steps (after 0) with the
  highest forget question accuracy (relearning: on the held-out forget questions, never
  relearned; retain-only fine-tuning: on all of them), its recovery = that accuracy - the
  accuracy at step 0, and the four numbers there; the recovery at the curve's end beside it;
- quantization: the 4-bit scheme with the highest forget accuracy; noise: the forget accuracy;
- weight space: L2 relative to the Original's norm; the forget- and retain-loss barriers from
  the Original and from AdamW's solution (same objective and seed).
Results that missed the forgetting target or collapsed are shown but left out of the comparisons.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..unlearning.metrics import format_metric
from ..unlearning.report import jsonable, save_figure
from .quantize import BITSANDBYTES_SCHEMES, QUANTIZATION_SCHEMES
from .stats import Interval, interval, paired, verdict

FORGET, RETAIN = "forget/qa_accuracy", "retain/qa_accuracy"
NUMBERS = (("prob", "forget_Q_A_Prob"), ("rouge", "forget_Q_A_ROUGE"), ("utility", "model_utility"),
           ("fq", "forget_quality"))
DOWNGRADED = ("compressed first-order", "zeroth-order", "hybrid")


def _get(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return math.nan if value is None else float(value)


def _strongest(curve: Sequence[Mapping[str, Any]], steps: Sequence[int], prefix: str) -> dict[str, float]:
    """The attack's strongest point (the highest forget accuracy after step 0; the first of ties) and its end."""
    accuracy = [_get(m, FORGET) for m in curve]
    best = max(range(1, len(curve)), key=lambda i: (accuracy[i], -i)) if len(curve) > 1 else 0
    row = {f"{prefix}_step": steps[best], f"{prefix}_before": accuracy[0], f"{prefix}_after": accuracy[best],
           f"{prefix}_recovery": accuracy[best] - accuracy[0], f"{prefix}_end_recovery": accuracy[-1] - accuracy[0]}
    row.update({f"{prefix}_{name}": _get(curve[best], key) for name, key in NUMBERS})
    return row


def summarize_attacks(record: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, float]:
    """The attack numbers of one attacked model (a result, the Original or the Retrain model)."""
    relearn, finetune = record["relearning"], record["retain_finetune"]
    row = {**_strongest(relearn["heldout"], relearn["steps"], "relearn"),
           **_strongest(finetune["whole"], finetune["steps"], "retain_ft")}
    four_bit = {s: m for s, m in record["quantization"].items() if _four_bit(s)}
    if four_bit:
        worst = max(four_bit, key=lambda s: _get(four_bit[s], FORGET))
        row.update({"quant_scheme": worst, "quant_after": _get(four_bit[worst], FORGET),
                    "quant_recovery": _get(four_bit[worst], FORGET) - _get(before, FORGET),
                    **{f"quant_{name}": _get(four_bit[worst], key) for name, key in NUMBERS}})
    for std, value in record.get("noise", {}).items():
        row[f"noise_{std}"] = _get(value["mean"], FORGET)
    return row


def _four_bit(scheme: str) -> bool:
    return scheme in BITSANDBYTES_SCHEMES or (scheme in QUANTIZATION_SCHEMES and QUANTIZATION_SCHEMES[scheme].bits == 4)


def summarize(result: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of the tables, per result."""
    after = result["unlearned"]
    barrier = result["connectivity"]["barrier"]
    to_reference = result.get("connectivity_to_reference", {}).get("barrier", {})
    return {
        **{key: result[key] for key in ("arm", "optimizer", "grade", "budget", "steps", "compute", "objective",
                                        "seed", "lr", "reached", "collapsed")},
        "forget": _get(after, FORGET), "retain": _get(after, RETAIN), "privleak": _get(after, "privleak"),
        **{name: _get(after, key) for name, key in NUMBERS},
        **summarize_attacks(result, after),
        "l2": result["distance"]["relative"],
        "barrier": _get(barrier, "forget/loss"), "retain_barrier": _get(barrier, "retain/loss"),
        "barrier_ref": _get(to_reference, "forget/loss"), "retain_barrier_ref": _get(to_reference, "retain/loss"),
    }


def control_rows(result: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The Original's and the Retrain model's attack numbers, one row per seed."""
    out = {}
    for name, by_seed in result["controls"].items():
        before = result["models"][name]
        out[name] = [{"arm": name, "seed": int(seed), "forget": _get(before, FORGET), "retain": _get(before, RETAIN),
                      "privleak": _get(before, "privleak"), **{n: _get(before, key) for n, key in NUMBERS},
                      **summarize_attacks(record, before)} for seed, record in by_seed.items()]
    return out


# --- tables


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r.get(key, math.nan)) for r in rows]


def _cell(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """mean ± half-width of the 95% interval (one seed: the value); forget quality: the median p-value."""
    values = [v for v in _values(rows, key) if not math.isnan(v)]
    if not values:
        return "n/a"
    if key.endswith("fq"):
        return format_metric(statistics.median(values), "forget_quality")
    if key.endswith("_step"):
        return "/".join(str(int(v)) for v in values)
    estimate = interval(values)
    digits = 3 if key == "l2" else (1 if key.endswith("privleak") else 2)
    text = f"{estimate.mean:.{digits}f}"
    if math.isnan(estimate.low) or estimate.high == estimate.low:  # one seed, or the same value every seed
        return text
    return f"{text} ± {(estimate.high - estimate.low) / 2:.{digits}f}"


TABLES = {
    "Unlearned (before any attack)": (("forget", "forget acc"), ("prob", "forget Q_A_Prob"),
                                      ("rouge", "forget Q_A_ROUGE"), ("utility", "model utility"),
                                      ("fq", "forget quality"), ("privleak", "privleak"), ("retain", "retain acc")),
    "Relearning at its strongest point (held-out forget questions)": (
        ("relearn_step", "steps"), ("relearn_before", "acc before"), ("relearn_after", "acc at strongest"),
        ("relearn_recovery", "recovery"), ("relearn_end_recovery", "recovery at the end"),
        ("relearn_prob", "Q_A_Prob"), ("relearn_rouge", "Q_A_ROUGE"), ("relearn_utility", "model utility"),
        ("relearn_fq", "forget quality")),
    "Retain-only fine-tuning at its strongest point (all forget questions)": (
        ("retain_ft_step", "steps"), ("retain_ft_after", "forget acc"), ("retain_ft_recovery", "recovery"),
        ("retain_ft_prob", "Q_A_Prob"), ("retain_ft_rouge", "Q_A_ROUGE"), ("retain_ft_utility", "model utility"),
        ("retain_ft_fq", "forget quality")),
    "Quantization (the worst 4-bit scheme) and weight noise": (
        ("quant_after", "forget acc"), ("quant_recovery", "recovery"), ("quant_prob", "Q_A_Prob"),
        ("quant_rouge", "Q_A_ROUGE"), ("quant_utility", "model utility"), ("quant_fq", "forget quality")),
    "Weight space": (("l2", "L2 / ‖θ‖"), ("barrier", "forget-loss barrier from Original"),
                     ("retain_barrier", "retain-loss barrier from Original"),
                     ("barrier_ref", "forget-loss barrier from AdamW's"),
                     ("retain_barrier_ref", "retain-loss barrier from AdamW's")),
}


def grouped(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["objective"], row["arm"]), []).append(row)
    return groups


def table(rows: Sequence[dict[str, Any]], controls: Mapping[str, list[dict[str, Any]]], objective: str,
          columns: Sequence[tuple[str, str]], *, arm_details: bool = False) -> str:
    """Markdown: Original, Retrain, then one line per arm of the objective, over seeds."""
    extra = ["grade", "lr", "steps (compute)"] if arm_details else []
    head = ["model", *extra, *(title for _, title in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in controls.items():
        if any(key in group[0] for key, _ in columns):
            lines.append("| " + " | ".join([name.capitalize(), *([""] * len(extra)),
                                            *(_cell(group, key) for key, _ in columns)]) + " |")
    for (row_objective, arm), group in grouped(rows).items():
        if row_objective != objective:
            continue
        flags = ("" if group[0]["reached"] else " (target not reached)") + \
            (" (collapsed)" if any(r["collapsed"] for r in group) else "")
        details = [group[0]["grade"], f"{group[0]['lr']:g}{flags}",
                   f"{group[0]['steps']} ({group[0]['compute']:.0f})"] if arm_details else []
        lines.append("| " + " | ".join([arm, *details, *(_cell(group, key) for key, _ in columns)]) + " |")
    return "\n".join(lines)


# --- findings


def comparable(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that reached the forgetting target without collapsing."""
    return [r for r in rows if r["reached"] and not r["collapsed"]]


def _by_seed(rows: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    """key per seed; several rows of one seed (a grade's arms) are averaged."""
    seeds: dict[int, list[float]] = {}
    for r in rows:
        seeds.setdefault(r["seed"], []).append(float(r.get(key, math.nan)))
    return {seed: statistics.fmean(values) for seed, values in seeds.items()}


def compare(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str) -> Interval:
    """a - b paired by seed, over the seeds both have."""
    first, second = _by_seed(a, key), _by_seed(b, key)
    seeds = sorted(set(first) & set(second))
    return paired([first[s] for s in seeds], [second[s] for s in seeds])


def _line(arm: str, grade: str, difference: Interval, claim_negative: bool | None) -> str:
    judged = "no claim about this grade" if claim_negative is None else \
        verdict(difference, claim_negative=claim_negative)
    return f"  - {arm} ({grade}): {difference}, {difference.n} seeds: {judged}"


CLAIMS = (
    ("relearn_recovery", True, "Downgraded optimizers resist relearning better than first-order ones (held-out "
                               "forget accuracy regained at the strongest point; arm minus AdamW, paired by seed):"),
    ("quant_recovery", True, "Downgraded optimizers resist quantization better than first-order ones (forget "
                             "accuracy regained, worst 4-bit scheme; arm minus AdamW):"),
)
CONTROL_CLAIMS = (
    ("relearn_recovery", "Unlearning hides knowledge that relearning a few facts brings back (recovery minus the "
                         "Retrain model's, which never saw the forget people; paired by seed):"),
    ("retain_ft_recovery", "Fine-tuning on retain data alone brings forgotten knowledge back (\"From Dormant to "
                           "Deleted\"; recovery minus the Retrain model's):"),
)


def findings(rows: Sequence[dict[str, Any]], controls: Mapping[str, list[dict[str, Any]]], objective: str
             ) -> list[str]:
    """Markdown bullets computed from one objective's rows; only comparable results are compared."""
    rows = [r for r in rows if r["objective"] == objective]
    out = _budget_findings(rows)
    usable = comparable(rows)
    reference = [r for r in usable if r["arm"] == "adamw"]
    arms = grouped(usable)
    for key, negative, claim in CLAIMS:
        if not reference:
            out.append(f"- {claim} not compared: AdamW's results missed the target or collapsed.")
            continue
        out.append(f"- {claim}")
        for (_, arm), group in arms.items():
            if arm != "adamw":
                grade = group[0]["grade"]
                out.append(_line(arm, grade, compare(group, reference, key), negative if grade in DOWNGRADED
                                 else None))
        for grade in DOWNGRADED:
            members = [r for r in usable if r["grade"] == grade]
            if len({r["arm"] for r in members}) > 1:  # one arm: its line above says it
                out.append(_line(f"the {grade} grade's mean", grade, compare(members, reference, key), negative))
    retrain = controls.get("retrain", [])
    for key, claim in CONTROL_CLAIMS if retrain else ():
        out.append(f"- {claim}")
        out += [_line(arm, group[0]["grade"], compare(group, retrain, key), False) for (_, arm), group in arms.items()]
    barriers = [(arm, group) for (_, arm), group in arms.items() if arm != "adamw"]
    if barriers:
        out.append("- Zeroth-order unlearning ends in a separate basin (the forget-loss barrier on the line from "
                   "AdamW's solution to the arm's, same seed; other grades for comparison):")
        out += [_line(arm, group[0]["grade"], interval(_values(group, "barrier_ref")),
                      False if group[0]["grade"] == "zeroth-order" else None) for arm, group in barriers]
    ends = [r["relearn_recovery"] - r["relearn_end_recovery"] for r in rows]
    if ends:
        out.append(f"- The relearning curve's end understates its strongest point by {statistics.fmean(ends):.2f} "
                   f"held-out forget accuracy on average (largest {max(ends):.2f}) over {len(ends)} results.")
    return out


def _budget_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where each zeroth-order arm (and any other that failed) stands, and whether it is compared."""
    out = []
    for (_, arm), group in grouped(rows).items():
        collapsed, reached = any(r["collapsed"] for r in group), group[0]["reached"]
        if group[0]["grade"] != "zeroth-order" and reached and not collapsed:
            continue
        problems = [text for flag, text in ((collapsed, "collapsed (retain accuracy below half the Original's)"),
                                            (not reached, "did not reach the forgetting target in its grid")) if flag]
        forget, retain = interval(_values(group, "forget")), interval(_values(group, "retain"))
        out.append(f"- {arm} ({group[0]['grade']}, {group[0]['steps']} steps, {group[0]['compute']:.0f} forward-pass "
                   f"equivalents): forget accuracy {forget.mean:.2f}, retain {retain.mean:.2f}; "
                   + (f"{' and '.join(problems)}, so it is left out of the comparisons." if problems
                      else "it forgets without collapsing and is compared below."))
    return out


# --- plots


def plots(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    rows = result["results"]
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    written = []

    figure, panels = _per_objective(objectives)
    for objective, axes in panels:
        for (row_objective, arm), group in grouped(rows).items():
            if row_objective == objective:
                _mean_curve(axes, [r["relearning"] for r in group], arm, "-")
        for name, style in (("original", "k--"), ("retrain", "k:")):
            _mean_curve(axes, [c["relearning"] for c in result["controls"][name].values()], name, style)
        axes.set(title=f"Relearning after {objective}", xlabel="AdamW steps on k forget questions",
                 ylabel="held-out forget question accuracy (seed mean)", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "relearning.png"))

    figure, panels = _per_objective(objectives)
    for objective, axes in panels:
        chosen = [(arm, group) for (o, arm), group in grouped(rows).items() if o == objective]
        schemes = list(rows[0]["quantization"])
        width = 0.8 / (len(schemes) + 1)
        for j, scheme in enumerate(["unlearned", *schemes]):
            values = [statistics.fmean(_get(r["unlearned"] if scheme == "unlearned" else r["quantization"][scheme],
                                            FORGET) for r in group) for _, group in chosen]
            axes.bar([x + j * width for x in range(len(chosen))], values, width, label=scheme)
        axes.set_xticks([x + 0.4 - width / 2 for x in range(len(chosen))], [arm for arm, _ in chosen],
                        rotation=30, fontsize=8)
        axes.set(title=f"Quantization after {objective}", ylabel="forget question accuracy (seed mean)",
                 ylim=(0, 1.02))
        axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "quantization.png"))

    figure, panels = _per_objective(objectives, rows_of_panels=2)
    for objective, (top, bottom) in panels:
        for r in rows:
            if r["objective"] == objective and r["seed"] == rows[0]["seed"]:
                for axes, key in ((top, "connectivity"), (bottom, "connectivity_to_reference")):
                    if key in r:
                        axes.plot(r[key]["t"], [m["forget/loss"] for m in r[key]["metrics"]], marker="o",
                                  label=r["arm"])
        top.set(title=f"{objective}: from the Original (t = 0) to each result", ylabel="forget loss")
        bottom.set(title=f"{objective}: from AdamW's solution (t = 0) to each other's", ylabel="forget loss",
                   xlabel="t")
        for axes in (top, bottom):
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "connectivity.png"))
    return written


def _mean_curve(axes: Any, curves: Sequence[Mapping[str, Any]], label: str, style: str) -> None:
    steps = curves[0]["steps"]
    values = [statistics.fmean(_get(c["heldout"][i], FORGET) for c in curves) for i in range(len(steps))]
    axes.plot(steps, values, style, marker="o", markersize=3, label=label)


def _per_objective(objectives: Sequence[str], rows_of_panels: int = 1) -> tuple[Any, list[tuple[str, Any]]]:
    """A figure with one column of panels per objective, and (objective, its axes)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(objectives), 4.2 * rows_of_panels), layout="constrained")
    panels = []
    for i, objective in enumerate(objectives):
        axes = [figure.add_subplot(rows_of_panels, len(objectives), i + 1 + r * len(objectives))
                for r in range(rows_of_panels)]
        panels.append((objective, axes[0] if rows_of_panels == 1 else axes))
    return figure, panels


# --- the report


def write_study(result: dict[str, Any], out_dir: str | os.PathLike, command: str, load: str = "") -> dict[str, Path]:
    """study.json, the plots, then study.md (last: a directory without it is unfinished)."""
    out_dir = Path(out_dir)
    rows = [summarize(r) for r in result["results"]]
    controls = control_rows(result)
    write_json(out_dir / "study.json", jsonable({**result, "summary": rows, "control_summary": controls}))
    images = plots(result, out_dir)
    settings, models = result["settings"], result["models"]
    lines = [
        "# The optimizer-grade study", "",
        f"Command: `{command}` ({result['seconds'] / 60:.1f} min on {result['threads']} CPU thread(s), torch "
        f"{result['torch']}{'; ' + load if load else ''}). Protocol: `zounlearn/robustness/study.py` (the rules, "
        f"fixed before any attack); statistics: `zounlearn/robustness/stats.py`; every number below is in "
        f"study.json.", "",
        f"Model: the embedded GPT-2, size {settings['model_size']}. Original: forget question accuracy "
        f"{models['original'][FORGET]:.2f}, retain {models['original'][RETAIN]:.2f}; Retrain (never saw the forget "
        f"people): {models['retrain'][FORGET]:.2f} and {models['retrain'][RETAIN]:.2f}. Budget: "
        f"{settings['budget']:g} forward-pass equivalents per run (a first-order step 3, a ZO step 2), "
        f"{settings['zo_budget_factor']}x that for the 'x{settings['zo_budget_factor']}' zeroth-order arms. "
        f"Learning rate: among the rates of each arm's grid that bring forget question accuracy to at most "
        f"{settings['target']}, the one with the highest model utility. Seeds {settings['seeds']}: each cell is "
        f"the mean ± the half-width of its 95% t-interval (forget quality: the median p-value; steps: per seed). "
        f"Attacks: AdamW at lr {result['attack_lr']['chosen']:g} (calibrated: the largest of "
        f"{settings['attack_lr_grid']} at which the Original loses at most {settings['attack_damage']} of its "
        f"held-out forget and retain accuracy along the curves) on {settings['relearn_k']} forget (relearning) or "
        f"retain questions, {settings['relearn_steps']} and {settings['retain_finetune_steps']} steps; "
        f"quantization {', '.join(settings['schemes'])}.", "",
    ]
    for objective in dict.fromkeys(r["objective"] for r in rows):
        lines += [f"## {objective}", ""]
        for i, (title, columns) in enumerate(TABLES.items()):
            lines += [f"### {title}", "", table(rows, controls, objective, columns, arm_details=i == 0), ""]
        lines += ["### Findings", "", *findings(rows, controls, objective), ""]
    lines += [
        "These are measurements on a small model (a GPT-2 of a few layers on synthetic people), not a replication "
        "of the papers' LLM experiments; a verdict is given only where the 95% interval of a paired difference "
        "excludes zero, and is stated whether or not it agrees.", "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in images], "",
    ]
    write_text(out_dir / "study.md", "\n".join(lines))
    return {"json": out_dir / "study.json", "markdown": out_dir / "study.md", **{p.stem: p for p in images}}
