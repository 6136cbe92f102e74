"""The unlearning run's output: metrics.jsonl back in, a terminal table, report.json, report.md, plots.

metrics.jsonl holds one JSON object a line: `{"type": "train", "step", "epoch", "loss", "phase",
"lr", "elapsed"}` after each step (loss null when the step was skipped; phase "fo"/"zo" only for
the hybrid optimizer) and `{"type": "eval", "step", "elapsed", "metrics": {...}}` with the keys
of `evaluation.evaluate` (step 0: before unlearning). Metric values may be null, NaN or infinite
(perplexity overflows): tables show them as "nan"/"inf", report.json as null (JSON has no NaN).
A plot without data is not written (no eval records: no metrics.png), and neither is its key in
`write_report`'s answer. Every file goes through `zounlearn.atomic`, so a crash never leaves
half a report. matplotlib is imported only when a plot is drawn, and without pyplot, so the
user's backend and open figures are left alone. Which metrics there are, their order and how
each is formatted come from the metric registry (metrics.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_json, write_text
from .data import DataError
from .metrics import format_metric, ordered

SPLITS = ("forget", "retain", "holdout")
MISSING = "n/a"

HOW_TO_READ = (
    "**How to read this.** Unlearning should make the model forget the forget set and nothing else. "
    "Forget question accuracy, multiple-choice accuracy, ROUGE-L and answer probability (forget_Q_A_Prob) should "
    "fall towards the holdout's (people the model never saw), and the forget loss should rise. Forget quality "
    "(TOFU's, a KS test's p-value) says how much the model's truth ratios on the forget set look like those of a "
    "retain model that never saw it: near 1 is the goal, tiny values (1e-10) mean it still tells the forget "
    "facts from wrong ones. Retain metrics and model utility (their harmonic mean) should stay where they were: "
    "a fall is collateral damage. mia_min_k is the Min-k% AUC telling forget from holdout examples; privleak "
    "(MUSE's) compares it with the retain model's: 0 is the goal, towards -100 the forget set still looks like "
    "training data (it leaks), large positive values mean it now looks less likely than unseen data, itself a "
    "trace of unlearning (over-unlearning) that an attacker can detect."
)


# --- reading metrics.jsonl


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, in order. An unterminated last line that does not parse is a
    record cut off by a crash and is dropped; any other line that is not a JSON object raises
    DataError (a ValueError) with its line number."""
    data = Path(path).read_bytes()  # bytes: a cut may split a UTF-8 character, which only that line may suffer
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            if number == len(lines):  # no newline after it: the write never finished
                break
            raise DataError(f"{path}:{number}: not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# --- numbers


def _number(value: Any) -> float:
    """A metric as a float; null (how JSON carries NaN) is NaN."""
    return math.nan if value is None else float(value)


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """after - before for every key present in both."""
    return {key: _number(after[key]) - _number(before[key]) for key in before if key in after}


def default_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The metrics present, in the registry's order (forget, retain, privacy, holdout), then unregistered ones."""
    return ordered(set(before) | set(after))


def _rows(before: Mapping[str, Any], after: Mapping[str, Any], keys: Sequence[str] | None) -> list[tuple[str, ...]]:
    keys = default_keys(before, after) if keys is None else keys
    rows = []
    for key in keys:
        if key not in before and key not in after:
            continue
        old = format_metric(_number(before[key]), key) if key in before else MISSING
        new = format_metric(_number(after[key]), key) if key in after else MISSING
        change = (format_metric(_number(after[key]) - _number(before[key]), key, signed=True)
                  if key in before and key in after else MISSING)
        rows.append((key, old, new, change))
    return rows


def metrics_table(before: Mapping[str, float], after: Mapping[str, float], keys: Sequence[str] | None = None) -> str:
    """A plain-text table, metric | before | after | change (after - before), for the terminal."""
    rows = [("metric", "before", "after", "change"), *_rows(before, after, keys)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# --- Markdown


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings as dotted names (optimizer.lr), so each gets a line of its own."""
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


def _setting(value: Any, *, exact: bool) -> str:
    """A setting as written (exact: lr 1e-05, not 1.000e-05) or a measured number, rounded."""
    if isinstance(value, float) and not exact:
        return format_metric(value, "")
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(item, exact=exact) for item in value)
    return "none" if value is None else str(value)


def _summary_items(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items = _flatten(summary)
    names = {name for name, _ in items}
    steps, seconds = summary.get("steps"), summary.get("seconds")
    # Throughput is what one compares across optimizers; derive it when the loop did not.
    if (not names & {"steps/s", "steps_per_second"} and isinstance(steps, (int, float))
            and isinstance(seconds, (int, float)) and seconds > 0):
        items.append(("steps/s", steps / seconds))
    return items


def markdown_report(config: Mapping[str, Any], before: Mapping[str, float], after: Mapping[str, float],
                    summary: Mapping[str, Any], *, images: Sequence[str | os.PathLike] = ()) -> str:
    """The run as a Markdown document: settings, metric table, summary, how to read it, and the
    `images` (paths relative to the document) embedded at the end."""
    lines = ["# Unlearning report", "", "## Run", ""]
    lines += [f"- {name}: `{_setting(value, exact=True)}`" for name, value in _flatten(config)] or ["- (none recorded)"]
    lines += ["", "## Metrics", ""]
    if not before:
        lines += [f"No evaluation before unlearning was recorded: the before and change columns say {MISSING}.", ""]
    lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| `{key}` | {old} | {new} | {change} |" for key, old, new, change in _rows(before, after, None)]
    lines += ["", "## Summary", ""]
    lines += [f"- {name}: {_setting(value, exact=False)}" for name, value in _summary_items(summary)] or ["- (none)"]
    lines += ["", HOW_TO_READ, ""]
    if images:
        lines += ["## Plots", ""] + [f"![{Path(image).stem}]({Path(image).as_posix()})" for image in images] + [""]
    return "\n".join(lines)


# --- plots

# Colours by split, line styles by metric: a panel stays readable with six lines.
SPLIT_COLORS = {"forget": "tab:red", "retain": "tab:blue", "holdout": "tab:gray"}
ANSWER_STYLES = {"{split}/qa_accuracy": "-", "{split}/choice_accuracy": "--", "{split}_Q_A_ROUGE": ":"}
PHASES = {"fo": ("first-order (FO)", "tab:blue", "o"), "zo": ("zeroth-order (ZO)", "tab:orange", "^")}


def save_figure(figure: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # a canvas of the figure's own: pyplot's backend is never consulted
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)  # the format by name: tmp ends in .tmp
    figure.clear()
    return path


def _loss_figure(history: Sequence[dict]) -> Any | None:
    from matplotlib.figure import Figure

    points = [(record["step"], _number(record.get("loss")), record.get("phase"))
              for record in history if record.get("type") == "train"]
    points = [point for point in points if math.isfinite(point[1])]  # skipped steps have no loss
    if not points:
        return None
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    steps, losses, phases = zip(*points)
    if any(phase is not None for phase in phases):
        axes.plot(steps, losses, color="0.8", linewidth=0.8, zorder=1)  # the run's order, under the markers
        for phase in dict.fromkeys(phases):  # first-seen order
            label, color, marker = PHASES.get(phase, (str(phase), None, "."))
            xs = [step for step, _, p in points if p == phase]
            ys = [loss for _, loss, p in points if p == phase]
            axes.scatter(xs, ys, s=14, color=color, marker=marker, label=label, zorder=2)
        axes.legend()
    else:
        axes.plot(steps, losses, color="tab:blue", linewidth=1.2)
    axes.set(xlabel="step", ylabel="training loss", title="Training loss")
    axes.grid(alpha=0.3)
    return figure


def _series(evals: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], _number(record["metrics"][key])) for record in evals if key in record["metrics"]]
    return [step for step, _ in points], [value for _, value in points]


def _metrics_figure(history: Sequence[dict]) -> Any | None:
    from matplotlib.figure import Figure

    evals = sorted((record for record in history if record.get("type") == "eval" and record.get("metrics")),
                   key=lambda record: record["step"])
    # (title, y label, [(label, key, colour, line style)], y limits, reference line)
    # (title, y label, [(label, key, colour, line style)], y limits, reference line, log scale)
    panels = [
        ("Answers", "accuracy / ROUGE-L recall / utility",
         [(key.format(split=split), key.format(split=split), SPLIT_COLORS[split], style)
          for split in ("forget", "retain") for key, style in ANSWER_STYLES.items()]
         + [("model_utility", "model_utility", "black", "-.")], (-0.05, 1.05), None, False),
        ("Forget quality (TOFU)", "KS p-value vs the retain model (goal 1)",
         [("forget_quality", "forget_quality", "tab:green", "-")], None, None, True),
        ("Loss", "answer-token NLL",
         [(split, f"{split}/loss", SPLIT_COLORS[split], "-") for split in SPLITS], None, None, False),
        ("Membership inference", "Min-k% AUC, forget vs holdout",
         [("mia_min_k", "mia_min_k", "tab:purple", "-")], (-0.05, 1.05), 0.5, False),
    ]
    drawn = []
    for title, ylabel, lines, ylim, reference, log in panels:
        series = [(label, *_series(evals, key), color, style) for label, key, color, style in lines]
        series = [s for s in series if any(math.isfinite(value) and (value > 0 or not log) for value in s[2])]
        if series:
            drawn.append((title, ylabel, series, ylim, reference, log))
    if not drawn:
        return None
    figure = Figure(figsize=(5 * len(drawn), 4), layout="constrained")
    for index, (title, ylabel, series, ylim, reference, log) in enumerate(drawn, start=1):
        axes = figure.add_subplot(1, len(drawn), index)
        for label, steps, values, color, style in series:
            axes.plot(steps, values, color=color, linestyle=style, marker="o", markersize=3, label=label)
        if reference is not None:
            axes.axhline(reference, color="0.5", linestyle="--", linewidth=0.8)
        if log:
            axes.set_yscale("log")
        if ylim is not None:
            axes.set_ylim(*ylim)
        axes.set(xlabel="step", ylabel=ylabel, title=title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def _plots(history: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    out_dir = Path(out_dir)
    written = {}
    for name, file_name, build in (("loss_plot", "loss.png", _loss_figure),
                                   ("metrics_plot", "metrics.png", _metrics_figure)):
        figure = build(history)
        if figure is not None:
            written[name] = save_figure(figure, out_dir / file_name)
    return written


def plot_run(history: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Writes loss.png (training loss by step, FO and ZO steps told apart) and metrics.png (eval
    metrics by step: answers, losses, membership inference); a plot or panel without data is skipped.
    Returns the paths written."""
    return list(_plots(history, out_dir).values())


# --- everything together


def jsonable(value: Any) -> Any:
    """JSON-ready: NaN and infinities as null, tuples as lists, anything else unknown (paths) as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return str(value)


def write_report(run_dir: str | os.PathLike, *, config: Mapping[str, Any], before: Mapping[str, float],
                 after: Mapping[str, float], history: Sequence[dict], summary: Mapping[str, Any]) -> dict[str, Path]:
    """Writes report.json, report.md, loss.png and metrics.png into run_dir; returns their paths under
    "json", "markdown", "loss_plot", "metrics_plot" (a plot with no data is neither written nor listed)."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "markdown": run_dir / "report.md"}
    plots = _plots(history, run_dir)  # first, so report.md embeds only the plots that exist
    write_json(paths["json"], jsonable({"config": config, "before": before, "after": after,
                                         "change": changes(before, after), "summary": summary}))
    write_text(paths["markdown"], markdown_report(config, before, after, summary,
                                                  images=[path.name for path in plots.values()]))
    return {**paths, **plots}
