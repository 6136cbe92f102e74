"""The study's outputs: study.json, a table, plots and a Markdown report whose findings are
computed from the numbers (comparisons of grades and rank correlations), whatever they say.

Per result (optimizer, objective, seed), with forget/retain accuracy = question accuracy:
- recovery after an attack = forget accuracy after it - forget accuracy of the unlearned
  model (relearning: on the held-out forget questions, which were never relearned);
- the quantization figure is the largest forget accuracy over the 4-bit schemes;
- L2 = weight distance relative to the original's norm; barriers = how far above the
  straight line the forget and the retain loss climb between the original and the unlearned
  weights (linear mode connectivity);
- results that missed the forgetting target, or collapsed (retain accuracy below half the
  original's), are shown but left out of the comparisons.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..unlearning.report import jsonable, save_figure

FORGET, RETAIN = "forget/qa_accuracy", "retain/qa_accuracy"
DOWNGRADED = ("compressed first-order", "zeroth-order")
COLLAPSE = 0.5  # a result whose retain accuracy fell below half the original's was destroyed, not unlearned


def summarize(result: dict[str, Any], original: dict[str, float]) -> dict[str, Any]:
    """The numbers of the table, per result."""
    relearn, finetune = result["relearning"], result["retain_finetune"]
    four_bit = [m[FORGET] for s, m in result["quantization"].items() if "4" in s]
    forget = result["unlearned"][FORGET]
    heldout_before, relearned = relearn["heldout"][0][FORGET], relearn["heldout"][-1][FORGET]
    retain_ft = finetune["whole"][-1][FORGET]
    quantized = max(four_bit, default=math.nan)
    noise = {std: value["mean"][FORGET] for std, value in result["noise"].items()}
    return {
        "optimizer": result["optimizer"], "grade": result["grade"], "objective": result["objective"],
        "seed": result["seed"], "lr": result["lr"], "reached": result["reached"],
        "collapsed": result["unlearned"][RETAIN] < COLLAPSE * original[RETAIN],
        "forget": forget, "retain": result["unlearned"][RETAIN],
        "heldout_before": heldout_before, "relearned": relearned, "relearn_recovery": relearned - heldout_before,
        "retain_ft": retain_ft, "retain_ft_recovery": retain_ft - forget,
        "quantized": quantized, "quant_recovery": quantized - forget,
        "noise": noise, "l2": result["distance"]["relative"],
        "barrier": result["connectivity"]["barrier"].get("forget/loss", math.nan),
        "retain_barrier": result["connectivity"]["barrier"].get("retain/loss", math.nan),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


COLUMNS = (("forget", "forget acc"), ("retain", "retain acc"), ("relearned", "relearned (held-out)"),
           ("retain_ft", "after retain-only FT"), ("quantized", "4-bit (worst)"), ("l2", "L2 / ‖θ‖"),
           ("barrier", "barrier (forget loss)"), ("retain_barrier", "barrier (retain loss)"))


def grouped(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["objective"], row["optimizer"]), []).append(row)
    return groups


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (objective, optimizer), mean ± std over seeds."""
    head = ["objective", "optimizer", "grade", "lr", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (objective, optimizer), group in grouped(rows).items():
        lr = f"{group[0]['lr']:g}" + ("" if group[0]["reached"] else " (target not reached)") + \
            (" (collapsed)" if any(r["collapsed"] for r in group) else "")
        cells = [_cell([r[key] for r in group], 3 if key == "l2" else 2) for key, _ in COLUMNS]
        lines.append("| " + " | ".join([objective, optimizer, group[0]["grade"], lr, *cells]) + " |")
    return "\n".join(lines)


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return math.nan

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    try:
        return statistics.correlation(rx, ry)
    except statistics.StatisticsError:  # a constant column
        return math.nan


def findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Statements computed from the rows: grade comparisons and correlations, and whether they agree with the
    seed papers. Only results that reached the forgetting target without collapsing are compared."""
    reached = [r for r in rows if r["reached"] and not r["collapsed"]]
    out = []
    for flag, why in (("reached", "did not reach the forgetting target within its learning-rate grid"),
                      ("collapsed", f"collapsed (retain accuracy below {COLLAPSE:.0%} of the original's)")):
        names = sorted({f"{r['optimizer']}/{r['objective']}" for r in rows if r[flag] == (flag == "collapsed")})
        if names:
            out.append(f"Left out of the comparisons below, because it {why}: {', '.join(names)}.")
    by_grade: dict[str, list[dict[str, Any]]] = {}
    for row in reached:
        by_grade.setdefault(row["grade"], []).append(row)
    for key, attack, claim in (
            ("relearn_recovery", "relearning (held-out forget accuracy regained)",
             "downgraded (zeroth-order, sign/compressed) optimizers resist relearning better than first-order ones"),
            ("quant_recovery", "4-bit quantization (forget accuracy regained, worst scheme)",
             "downgraded optimizers resist quantization better than first-order ones"),
            ("retain_ft_recovery", "retain-only fine-tuning (forget accuracy regained)", None)):
        means = {grade: _mean_std([r[key] for r in group])[0] for grade, group in by_grade.items()}
        listing = ", ".join(f"{grade} {value:+.2f}" for grade, value in sorted(means.items(), key=lambda kv: kv[1]))
        text = f"Mean recovery after {attack} by grade: {listing}."
        if claim and "first-order" in means:
            downgraded = [r[key] for g in DOWNGRADED for r in by_grade.get(g, [])]
            if downgraded:
                d, f = _mean_std(downgraded)[0], means["first-order"]
                verdict = "agrees" if d < f - 0.02 else ("disagrees" if d > f + 0.02 else "neither agrees nor "
                                                         "disagrees (within 0.02)")
                text += (f" Downgraded grades regained {d:+.2f} on average against {f:+.2f} for first order: this "
                         f"{verdict} with the claim that {claim}.")
        if key == "retain_ft_recovery":
            back = sum(r[key] > 0.1 for r in reached)
            text += (f" Forget accuracy rose by more than 0.1 after fine-tuning on retain data alone in {back} of "
                     f"{len(reached)} results (\"From Dormant to Deleted\" reports that it can).")
        out.append(text)
    for key, name, larger in (("l2", "relative L2 distance", "moved further from the original"),
                              ("barrier", "forget-loss barrier", "sit behind a higher forget-loss barrier"),
                              ("retain_barrier", "retain-loss barrier", "sit behind a higher retain-loss barrier")):
        rho = _spearman([r[key] for r in reached], [r["relearn_recovery"] for r in reached])
        if not math.isnan(rho):
            direction = "less" if rho < -0.1 else ("more" if rho > 0.1 else "neither more nor less (|rho| <= 0.1)")
            out.append(f"Across {len(reached)} results, the Spearman correlation between {name} and relearning "
                       f"recovery is {rho:+.2f}: results that {larger} regained {direction} (\"From Dormant to "
                       f"Deleted\" predicts less).")
    return out


def plots(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    rows = result["results"]
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    written = []

    figure, panels = _per_objective(objectives)
    for objective, axes in panels:
        for r in rows:
            if r["objective"] == objective and r["seed"] == 0:
                curve = r["relearning"]
                axes.plot(curve["steps"], [m[FORGET] for m in curve["heldout"]], marker="o", label=r["optimizer"])
        base = result["original_attacks"]["relearning"]
        axes.plot(base["steps"], [m[FORGET] for m in base["heldout"]], "k--", label="original (not unlearned)")
        axes.set(title=f"Relearning after {objective}", xlabel="AdamW steps on k forget questions",
                 ylabel="held-out forget question accuracy", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "relearning.png"))

    schemes = list(rows[0]["quantization"])
    figure, panels = _per_objective(objectives)
    for objective, axes in panels:
        chosen = [r for r in rows if r["objective"] == objective and r["seed"] == 0]
        width = 0.8 / (len(schemes) + 1)
        for j, scheme in enumerate(["unlearned", *schemes]):
            values = [r["unlearned"][FORGET] if scheme == "unlearned" else r["quantization"][scheme][FORGET]
                      for r in chosen]
            axes.bar([x + j * width for x in range(len(chosen))], values, width, label=scheme)
        axes.set_xticks([x + 0.4 - width / 2 for x in range(len(chosen))], [r["optimizer"] for r in chosen],
                        rotation=30, fontsize=8)
        axes.set(title=f"Quantization after {objective}", ylabel="forget question accuracy", ylim=(0, 1.02))
        axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "quantization.png"))

    figure, panels = _per_objective(objectives)
    for objective, axes in panels:
        for r in rows:
            if r["objective"] == objective and r["seed"] == 0:
                lmc = r["connectivity"]
                line, = axes.plot(lmc["t"], [m["forget/loss"] for m in lmc["metrics"]], marker="o",
                                  label=f"{r['optimizer']} forget")
                axes.plot(lmc["t"], [m["retain/loss"] for m in lmc["metrics"]], linestyle=":",
                          color=line.get_color())
        axes.set(title=f"Mode connectivity, {objective} (solid forget, dotted retain)",
                 xlabel="t: (1 - t) θ_original + t θ_unlearned", ylabel="loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    written.append(save_figure(figure, out_dir / "connectivity.png"))
    return written


def _per_objective(objectives: Sequence[str]) -> tuple[Any, list[tuple[str, Any]]]:
    """A figure with one panel per objective, side by side, and (objective, its axes)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(objectives), 4.2), layout="constrained")
    return figure, [(objective, figure.add_subplot(1, len(objectives), i + 1))
                    for i, objective in enumerate(objectives)]


def write_study(result: dict[str, Any], out_dir: str | os.PathLike, command: str) -> dict[str, Path]:
    """study.json, the plots, then study.md (last: a directory without it is unfinished)."""
    out_dir = Path(out_dir)
    rows = [summarize(r, result["original"]) for r in result["results"]]
    write_json(out_dir / "study.json", jsonable({**result, "summary": rows}))
    images = plots(result, out_dir)
    settings = result["settings"]
    original = result["original"]
    base = result["original_attacks"]["relearning"]["heldout"]
    lines = [
        "# The optimizer-grade study", "",
        f"Command: `{command}` ({result['seconds'] / 60:.1f} min on {result['threads']} CPU thread(s), torch "
        f"{result['torch']}). Protocol: `zounlearn/robustness/study.py`; every number below is in study.json.", "",
        f"The embedded model before unlearning: forget question accuracy {original[FORGET]:.2f}, retain "
        f"{original[RETAIN]:.2f}. Budget: {settings['steps']} steps per run; learning rate: the first of each "
        f"optimizer's grid that brings forget question accuracy to at most {settings['target']}; seeds "
        f"{settings['seeds']} (mean ± std where more than one). Relearning: AdamW lr {settings['relearn_lr']} on "
        f"{settings['relearn_k']} forget questions for {settings['relearn_steps'][-1]} steps, measured on the other "
        f"forget questions (the original model there: {base[0][FORGET]:.2f} -> {base[-1][FORGET]:.2f}). Retain-only "
        f"fine-tuning: the same on {settings['relearn_k']} retain questions. Quantization: "
        f"{', '.join(settings['schemes'])}.", "",
        "## Results", "", table(rows), "",
        "## Findings", "", *[f"- {text}" for text in findings(rows)], "",
        "These are measurements on one small model (a 2-layer GPT-2 on synthetic people), not a replication of the "
        "papers' LLM experiments; they are stated whether or not they agree.", "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in images], "",
    ]
    write_text(out_dir / "study.md", "\n".join(lines))
    return {"json": out_dir / "study.json", "markdown": out_dir / "study.md", **{p.stem: p for p in images}}
