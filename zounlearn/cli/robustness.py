"""`zounlearn attack relearn|retain-finetune|quantize|noise` and `zounlearn diagnose`.

Each attack runs on an unlearned model (--model) and its data (the data flags; without
--forget the embedded model's synthetic data), prints a compact table and, with --output,
writes the whole result as JSON (NaN and infinities as null). `diagnose` compares the
unlearned model with the one it was unlearned from (--original): weight distance and the
metrics along the straight line between them (mode connectivity).

Every option is checked before a model is loaded or a step is taken (the value of --k
against the data's size: once the data is read, before any work), so bad input ends with
one line on stderr and exit status 2, and no output file.

zounlearn.robustness is imported only when a command runs (it pulls in most of
transformers, seconds of start-up that `zounlearn --help` or `info` should not pay), so the
library defaults shown in --help are restated here; tests/test_cli_robustness.py checks
that they equal the library's.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .inputs import (
    EMBEDDED,
    GIVEN,
    add_config_flag,
    add_data_flags,
    add_model_flags,
    as_float,
    as_int,
    check_writable,
    comma_list,
    load_model_and_data,
    load_named_model,
    merged,
)

# The library's defaults (zounlearn.robustness.attacks and diagnostics), restated: see the module docstring.
DEFAULT_K = 10
DEFAULT_STEPS = (0, 5, 10, 20, 50)
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 10
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_SCHEMES = ("int8", "int8-g128", "int8-g64", "int4", "int4-g128", "int4-g64", "nf4-g64", "bnb-fp4")
DEFAULT_RELATIVE_STDS = (0.01, 0.03, 0.1, 0.3)
DEFAULT_DRAWS = 3
DEFAULT_TS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Options every command takes (dest: default).
COMMON_DEFAULTS: dict[str, Any] = {
    "model": None, "dtype": "float32", "device": None, "threads": None, "forget": None, "retain": None,
    "holdout": None, "fields": None, "text_unit": None, "eval_batch_size": 32, "max_length": None, "output": None,
}
FINETUNE_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS, "seed": 0, "k": DEFAULT_K, "steps": DEFAULT_STEPS, "lr": DEFAULT_LR,
    "batch_size": DEFAULT_BATCH_SIZE, "weight_decay": DEFAULT_WEIGHT_DECAY, "plot": None,
}
QUANTIZE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "schemes": DEFAULT_SCHEMES}
NOISE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "seed": 0, "stds": DEFAULT_RELATIVE_STDS, "draws": DEFAULT_DRAWS}
DIAGNOSE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "original": None, "ts": DEFAULT_TS, "plot": None}

# Table columns: each the first of its metric keys (zounlearn.unlearning.metrics) that the result has (an
# accuracy falls back to choice accuracy without question/answer pairs); a column with none is left out.
SUMMARY_COLUMNS = (("forget/qa_accuracy", "forget/choice_accuracy"), ("retain/qa_accuracy", "retain/choice_accuracy"),
                   ("forget_quality",), ("model_utility",), ("forget/loss",), ("retain/loss",), ("mia_min_k",),
                   ("privleak",))


MODEL_HELP = "the unlearned model"


def _joined(values: Sequence[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


# --- the parser


def _add_common(parser: argparse.ArgumentParser, *, seed_help: str | None) -> None:
    add_config_flag(parser)
    add_model_flags(parser, model_help=MODEL_HELP)
    add_data_flags(parser)
    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--eval-batch-size", default=GIVEN, type=int, metavar="N",
                       help=f"examples per evaluation batch (default: {COMMON_DEFAULTS['eval_batch_size']})")
    group.add_argument("--max-length", default=GIVEN, type=int, metavar="N",
                       help="truncate examples to this many tokens (default: no limit)")
    if seed_help is not None:  # quantize and diagnose have nothing random
        group.add_argument("--seed", default=GIVEN, type=int, help=f"{seed_help} (default: 0)")
    group.add_argument("--output", "-o", default=GIVEN, metavar="FILE",
                       help="also write the whole result as JSON (written atomically; NaN as null)")


def _add_finetune_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("fine-tuning (AdamW on every parameter of a copy, in train mode)")
    group.add_argument("--k", default=GIVEN, type=int, metavar="K",
                       help=f"{what} examples to fine-tune on, chosen by --seed (default: {DEFAULT_K})")
    group.add_argument("--steps", default=GIVEN, metavar="N,N,...",
                       help="comma-separated, strictly increasing optimizer step counts after which to evaluate; "
                            f"0 is the model as given (default: {_joined(DEFAULT_STEPS)})")
    group.add_argument("--lr", default=GIVEN, type=float,
                       help=f"AdamW learning rate (default: {DEFAULT_LR:g}; for a 7B model use its fine-tuning "
                            "rate, e.g. 1e-5)")
    group.add_argument("--batch-size", default=GIVEN, type=int, metavar="N",
                       help=f"examples per step, drawn from the K (default: {DEFAULT_BATCH_SIZE})")
    group.add_argument("--weight-decay", default=GIVEN, type=float, metavar="WD",
                       help=f"AdamW weight decay (default: {DEFAULT_WEIGHT_DECAY:g})")
    group.add_argument("--plot", default=GIVEN, metavar="FILE.png",
                       help="also draw the curve (accuracies and losses by step) as a PNG")


def register(sub: argparse._SubParsersAction) -> None:
    attack = sub.add_parser(
        "attack", help="try to bring unlearned knowledge back: relearn, retain-finetune, quantize, noise",
        description="Attacks on an unlearned model, each on a copy (the model is never changed): fine-tuning on a "
                    "few forget examples (relearn) or on retain examples only (retain-finetune), weight "
                    "quantization (quantize) and Gaussian weight noise (noise). See docs/unlearning.md.")
    attacks = attack.add_subparsers(dest="attack", required=True, metavar="ATTACK")

    relearn = attacks.add_parser(
        "relearn", help="fine-tune on k forget examples: does the rest come back?",
        description="Fine-tune a copy of --model on K forget examples (question/answer pairs when the forget set "
                    "has them, else its texts) and evaluate after each number of --steps: on the held-out forget "
                    "portion (the forget examples not relearned) and on the whole data.")
    _add_common(relearn, seed_help="which K examples, their batch order and dropout")
    _add_finetune_flags(relearn, "forget")
    relearn.set_defaults(handler=run_relearn)

    retain = attacks.add_parser(
        "retain-finetune", help="fine-tune on k retain examples only: does benign fine-tuning undo unlearning?",
        description="Fine-tune a copy of --model on K retain examples only (no forget example) and evaluate the "
                    "whole data after each number of --steps.")
    _add_common(retain, seed_help="which K examples, their batch order and dropout")
    _add_finetune_flags(retain, "retain")
    retain.set_defaults(handler=run_retain_finetune)

    quantize = attacks.add_parser(
        "quantize", help="quantize the weights (int8, int4, NF4, FP4): does low precision undo unlearning?",
        description="Quantize then dequantize the Linear/Conv1D weights inside the transformer blocks of a copy of "
                    "--model with each scheme and evaluate it, next to the unquantized model (the baseline row).")
    _add_common(quantize, seed_help=None)
    quantize.add_argument_group("quantization").add_argument(
        "--schemes", default=GIVEN, metavar="NAME,NAME,...",
        help=f"comma-separated quantization schemes (default: all of {_joined(DEFAULT_SCHEMES)}); also bnb-nf4, "
             "bnb-int8 (bitsandbytes' load_in_4bit / LLM.int8; bnb-fp4 is the seed paper's) and fp4-g64")
    quantize.set_defaults(handler=run_quantize)

    noise = attacks.add_parser(
        "noise", help="add Gaussian weight noise: the control for quantization",
        description="Add Gaussian noise to the weights quantization acts on, with a standard deviation relative to "
                    "each tensor's RMS, and evaluate; mean and standard deviation over --draws draws per std.")
    _add_common(noise, seed_help="the noise draws (draw d is the same at every std)")
    group = noise.add_argument_group("noise")
    group.add_argument("--stds", default=GIVEN, metavar="S,S,...",
                       help="comma-separated standard deviations relative to each weight tensor's RMS, >= 0 "
                            f"(default: {_joined(DEFAULT_RELATIVE_STDS)})")
    group.add_argument("--draws", default=GIVEN, type=int, metavar="N",
                       help=f"noise draws per std, averaged (default: {DEFAULT_DRAWS})")
    noise.set_defaults(handler=run_noise)

    diagnose = sub.add_parser(
        "diagnose", help="weight distance and mode connectivity between an original and an unlearned model",
        description="How far unlearning moved the weights (L2 distance in total, relative to the original's norm "
                    "and per transformer block) and the metrics along (1 - t) original + t unlearned, with the "
                    "barrier heights of the forget and retain losses and accuracies (0: no barrier on the grid).")
    _add_common(diagnose, seed_help=None)
    group = diagnose.add_argument_group("diagnostics")
    group.add_argument("--original", default=GIVEN, metavar="M",
                       help=f"the model --model was unlearned from (same architecture), or '{EMBEDDED}'; loaded "
                            "with the same --dtype and --device")
    group.add_argument("--ts", default=GIVEN, metavar="T,T,...",
                       help="comma-separated interpolation points, distinct and including 0 (the original) and 1 "
                            f"(the unlearned model) (default: {_joined(DEFAULT_TS)})")
    group.add_argument("--plot", default=GIVEN, metavar="FILE.png",
                       help="also draw the metrics along t as a PNG")
    diagnose.set_defaults(handler=run_diagnose)


# --- checking options


def _number(options: Mapping[str, Any], key: str, *, low: float, open_low: bool = False, integer: bool = False,
            optional: bool = False) -> Any:
    """options[key] as an int or a finite float >= low (> low when open_low); None passes when optional."""
    value, flag = options[key], "--" + key.replace("_", "-")
    if value is None and optional:
        return None
    problem = f"{flag} must be {'an integer' if integer else 'a finite number'} " \
              f"{'>' if open_low else '>='} {low:g}, got {value!r}"
    try:
        number = as_int(value) if integer else as_float(value)
    except (TypeError, ValueError):
        raise UsageError(problem) from None
    if number < low or (open_low and number == low):
        raise UsageError(problem)
    return number


def _common(options: dict[str, Any]) -> dict[str, Any]:
    """Checks the options every command takes; returns evaluate's keyword arguments."""
    if options["model"] is None:
        raise UsageError(f"no model given; pass --model DIR_OR_HUB_NAME (the unlearned model), or --model {EMBEDDED}")
    options["eval_batch_size"] = _number(options, "eval_batch_size", low=1, integer=True)
    options["max_length"] = _number(options, "max_length", low=2, integer=True, optional=True)
    if "seed" in options:  # quantize and diagnose have nothing random, and no --seed
        options["seed"] = _number(options, "seed", low=0, integer=True)
    for key in ("output", "plot"):
        if options.get(key) is not None:
            check_writable(options[key], f"--{key}")
    return {"batch_size": options["eval_batch_size"], "max_length": options["max_length"]}


def _finetune_options(options: dict[str, Any]) -> None:
    options["k"] = _number(options, "k", low=1, integer=True)
    options["lr"] = _number(options, "lr", low=0, open_low=True)
    options["batch_size"] = _number(options, "batch_size", low=1, integer=True)
    options["weight_decay"] = _number(options, "weight_decay", low=0)
    steps = comma_list(options["steps"], "--steps", as_int, "step counts", "0,5,10,20,50")
    if any(n < 0 for n in steps) or any(a >= b for a, b in itertools.pairwise(steps)):
        raise UsageError(f"--steps must be strictly increasing step counts >= 0, e.g. 0,5,10,20,50; "
                         f"got {_joined(steps)}")
    options["steps"] = steps


# --- output


def _write(options: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    from ..atomic import write_json
    from ..unlearning.report import jsonable

    if options["output"]:
        write_json(options["output"], jsonable(record))
        print(f"\nresult written to {options['output']}")


def _save_png(figure: Any, path: str) -> None:
    from ..unlearning.report import save_figure

    save_figure(figure, Path(path))
    print(f"plot written to {path}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text: the first column left-aligned, the others right-aligned, a rule under the header."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _key(metrics: Mapping[str, float], split: str, metric: str) -> str | None:
    """The key of a split's accuracy (qa_accuracy, else choice_accuracy) or other metric; None when absent."""
    names = ("qa_accuracy", "choice_accuracy") if metric == "accuracy" else (metric,)
    return next((f"{split}/{name}" for name in names if f"{split}/{name}" in metrics), None)


def _header(key: str) -> str:
    """A column header: forget/qa_accuracy -> forget qa acc; the field's names (forget_quality) as they are."""
    return key.replace("/", " ").replace("_accuracy", " acc")


def _cell(value: float, key: str) -> str:
    from ..unlearning.metrics import format_metric

    return format_metric(float("nan") if value is None else value, key)


def _summary_columns(metrics: Mapping[str, float], columns=SUMMARY_COLUMNS) -> list[tuple[str, str]]:
    """(header, key) for the columns whose metric is present."""
    keys = [next((key for key in candidates if key in metrics), None) for candidates in columns]
    return [(_header(key), key) for key in keys if key is not None]


# --- the fine-tuning attacks


def _fine_tune_table(result: Mapping[str, Any]) -> str:
    whole = result["whole"]
    heldout = result.get("heldout")
    columns: list[tuple[str, list[Mapping[str, float]], str]] = []
    if heldout is not None:
        key = _key(heldout[0], "forget", "accuracy")
        if key:
            columns.append((f"held-out forget {'qa' if 'qa' in key else 'choice'} acc", heldout, key))
    for header, key in _summary_columns(whole[0], SUMMARY_COLUMNS[:2]):
        columns.append((header, whole, key))
    if heldout is not None and "forget/loss" in heldout[0]:
        columns.append(("held-out forget loss", heldout, "forget/loss"))
    for header, key in _summary_columns(whole[0], SUMMARY_COLUMNS[2:]):
        columns.append((header, whole, key))
    rows = [[str(n)] + [_cell(curve[i].get(key), key) for _, curve, key in columns]
            for i, n in enumerate(result["steps"])]
    return _table(["steps"] + [header for header, _, _ in columns], rows)


def _fine_tune_plot(result: Mapping[str, Any], path: str, title: str) -> None:
    from matplotlib.figure import Figure

    steps = result["steps"]
    curves = [("held-out forget", result.get("heldout"), "forget", "tab:red", "--"),
              ("forget", result["whole"], "forget", "tab:red", "-"),
              ("retain", result["whole"], "retain", "tab:blue", "-")]
    figure = Figure(figsize=(10, 4), layout="constrained")
    for index, (metric, ylabel) in enumerate((("accuracy", "question accuracy"), ("loss", "answer-token NLL")), 1):
        axes = figure.add_subplot(1, 2, index)
        for label, curve, split, color, style in curves:
            key = _key(curve[0], split, metric) if curve else None
            if key is None:
                continue
            values = [math.nan if m.get(key) is None else m[key] for m in curve]
            suffix = f" ({key.split('/')[1].replace('_', ' ')})" if metric == "accuracy" else ""
            axes.plot(steps, values, color=color, linestyle=style, marker="o", markersize=3, label=label + suffix)
        if metric == "accuracy":
            axes.set_ylim(-0.05, 1.05)
        axes.set(xlabel="fine-tuning steps", ylabel=ylabel, title=title if index == 1 else "Loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save_png(figure, path)


def _fine_tune(args: argparse.Namespace, name: str) -> int:
    options = merged(args, FINETUNE_DEFAULTS)
    eval_kwargs = _common(options)
    _finetune_options(options)
    from ..robustness import relearning_attack, retain_finetune_attack

    model, tokenizer, data, meta = load_model_and_data(options)
    if name == "relearn":
        pool, role = ("qa" if data.forget.qa else "train"), "forget"
        available = len(getattr(data.forget, pool))
        most = available - 1  # at least one held out
    else:
        pool, role = ("qa" if data.retain.qa else "train"), "retain"
        available = len(getattr(data.retain, pool))
        most = available
    what = "question/answer pairs" if pool == "qa" else "examples"
    if most >= 1 and options["k"] > most:
        raise UsageError(f"--k {options['k']} is too large: the {role} set has {available} {what}"
                         + (", and relearning keeps at least one held out" if name == "relearn" else "")
                         + f"; use --k from 1 to {most}")
    attack = relearning_attack if name == "relearn" else retain_finetune_attack
    print(f"{name}: fine-tuning a copy of {options['model']} on {options['k']} {role} {what} "
          f"(lr {options['lr']:g}), evaluating after {_joined(options['steps'])} steps ...", flush=True)
    result = attack(model, tokenizer, data, k=options["k"], steps=options["steps"], lr=options["lr"],
                    batch_size=options["batch_size"], weight_decay=options["weight_decay"], seed=options["seed"],
                    max_length=options["max_length"], eval_kwargs={"batch_size": eval_kwargs["batch_size"]})
    print()
    print(_fine_tune_table(result))
    if options["plot"]:
        _fine_tune_plot(result, options["plot"], "Relearning" if name == "relearn" else "Retain-only fine-tuning")
    _write(options, {"attack": name, "meta": meta, "result": result})
    return 0


def run_relearn(args: argparse.Namespace) -> int:
    return _fine_tune(args, "relearn")


def run_retain_finetune(args: argparse.Namespace) -> int:
    return _fine_tune(args, "retain-finetune")


# --- quantization and noise


def run_quantize(args: argparse.Namespace) -> int:
    options = merged(args, QUANTIZE_DEFAULTS)
    eval_kwargs = _common(options)
    schemes = comma_list(options["schemes"], "--schemes", lambda s: str(s).strip(), "scheme names", "int8,int4-g64")
    from ..robustness import quantization_attack
    from ..robustness.quantize import check_scheme
    from ..unlearning import evaluate
    from ..unlearning.batches import fit_to_context

    for scheme in schemes:
        try:
            check_scheme(scheme)
        except ValueError as e:
            raise UsageError(f"--schemes: {e}") from None
    if len(set(schemes)) != len(schemes):
        raise UsageError(f"--schemes names a scheme twice: {','.join(schemes)}")
    model, tokenizer, data, meta = load_model_and_data(options)
    # The baseline truncates as the attack will (which warns about it itself).
    limit = fit_to_context(model, tokenizer, data, eval_kwargs["max_length"], warn=False)
    print(f"quantize: evaluating {options['model']} unquantized and with {', '.join(schemes)} ...", flush=True)
    baseline = evaluate(model, tokenizer, data, **{**eval_kwargs, "max_length": limit})
    result = quantization_attack(model, tokenizer, data, schemes=schemes, eval_kwargs=eval_kwargs)
    columns = _summary_columns(baseline)
    rows = [["none (baseline)"] + [_cell(baseline[key], key) for _, key in columns]]
    for scheme, metrics in result.items():
        rows.append([scheme] + [f"{_cell(metrics[key], key)} ({_change(metrics[key], baseline[key], key)})"
                                for _, key in columns])
    print()
    print(_table(["scheme"] + [header for header, _ in columns], rows))
    print("\n(in parentheses: the change from the unquantized model)")
    _write(options, {"attack": "quantize", "meta": meta, "schemes": schemes, "baseline": baseline,
                     "result": result})
    return 0


def _change(value: float, baseline: float, key: str) -> str:
    from ..unlearning.metrics import format_metric

    return format_metric(value - baseline, key, signed=True)


def run_noise(args: argparse.Namespace) -> int:
    options = merged(args, NOISE_DEFAULTS)
    eval_kwargs = _common(options)
    stds = comma_list(options["stds"], "--stds", as_float, "relative standard deviations >= 0", "0.01,0.1")
    if any(std < 0 for std in stds):
        raise UsageError(f"--stds must be >= 0 (relative to each weight tensor's RMS), got {_joined(stds)}")
    if len(set(stds)) != len(stds):
        raise UsageError(f"--stds names a value twice: {_joined(stds)}")
    options["draws"] = _number(options, "draws", low=1, integer=True)
    from ..robustness import noise_attack

    model, tokenizer, data, meta = load_model_and_data(options)
    print(f"noise: {options['draws']} draws at each relative std {_joined(stds)} on {options['model']} ...",
          flush=True)
    result = noise_attack(model, tokenizer, data, relative_stds=stds, draws=options["draws"], seed=options["seed"],
                          eval_kwargs=eval_kwargs)
    first = next(iter(result.values()))["mean"]
    columns = _summary_columns(first)
    rows = [[f"{std:g}"] + [f"{_cell(r['mean'][key], key)} ± {_cell(r['std'][key], key)}" for _, key in columns]
            for std, r in result.items()]
    print()
    print(_table(["relative std"] + [header for header, _ in columns], rows))
    print(f"\n(mean ± standard deviation over {options['draws']} draws)")
    _write(options, {"attack": "noise", "meta": meta, "draws": options["draws"], "seed": options["seed"],
                     "result": result})
    return 0


# --- diagnostics


def run_diagnose(args: argparse.Namespace) -> int:
    options = merged(args, DIAGNOSE_DEFAULTS)
    if options["original"] is None:
        raise UsageError(f"no original model given; pass --original DIR_OR_HUB_NAME (the model --model was "
                         f"unlearned from), or --original {EMBEDDED}")
    eval_kwargs = _common(options)
    ts = comma_list(options["ts"], "--ts", as_float, "numbers", "0,0.25,0.5,0.75,1")
    if len(set(ts)) != len(ts) or 0 not in ts or 1 not in ts:
        raise UsageError(f"--ts must hold distinct values including 0 (the original) and 1 (the unlearned model), "
                         f"got {_joined(ts)}")
    from ..robustness import mode_connectivity, weight_distance
    from ..unlearning.batches import fit_to_context

    model, tokenizer, data, meta = load_model_and_data(options)
    eval_kwargs["max_length"] = fit_to_context(model, tokenizer, data, eval_kwargs["max_length"])
    original = load_named_model(options["original"], options)[0]  # the unlearned model's dtype and device
    meta = {"original": options["original"], **meta}
    distance = weight_distance(original, model)
    print(f"weight distance  ||unlearned - original|| = {distance['total']:.6g}, "
          f"relative to ||original||: {distance['relative']:.6g}")
    layers = [(f"block {key}" if key != "other" else "other (embeddings, final norm, head)", value)
              for key, value in distance["per_layer"].items()]
    print(_table(["part", "distance"], [[name, f"{value:.6g}"] for name, value in layers]))
    print(f"\nmode connectivity: evaluating (1 - t) original + t unlearned at t = {_joined(ts)} ...", flush=True)
    connectivity = mode_connectivity(original, model, tokenizer, data, ts, **eval_kwargs)
    # A height of 0 for an accuracy comes out as -0.0 (its sign is flipped): 0 it is, in the table and the JSON.
    connectivity["barrier"] = {key: value + 0.0 for key, value in connectivity["barrier"].items()}
    columns = _summary_columns(connectivity["metrics"][0])
    print(_table(["t"] + [header for header, _ in columns],
                 [[f"{t:g}"] + [_cell(m[key], key) for _, key in columns]
                  for t, m in zip(connectivity["t"], connectivity["metrics"])]))
    print("\nbarrier heights (0: no barrier on the grid; a loss's rise above, an accuracy's dip below the line)")
    print(_table(["metric", "height"], [[key, _cell(value, key)] for key, value in connectivity["barrier"].items()]))
    if options["plot"]:
        _diagnose_plot(connectivity, options["plot"])
    _write(options, {"meta": meta, "distance": distance, "connectivity": connectivity})
    return 0


def _diagnose_plot(connectivity: Mapping[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    ts, metrics = connectivity["t"], connectivity["metrics"]
    order = sorted(range(len(ts)), key=ts.__getitem__)
    figure = Figure(figsize=(10, 4), layout="constrained")
    for index, (metric, ylabel, title) in enumerate((("accuracy", "question accuracy", "Answers along the line"),
                                                     ("loss", "answer-token NLL", "Loss along the line")), 1):
        axes = figure.add_subplot(1, 2, index)
        for split, color in (("forget", "tab:red"), ("retain", "tab:blue"), ("holdout", "tab:gray")):
            key = _key(metrics[0], split, metric)
            if key is None:
                continue
            axes.plot([ts[i] for i in order], [math.nan if metrics[i][key] is None else metrics[i][key]
                                               for i in order],
                      color=color, marker="o", markersize=3, label=key)
        if metric == "accuracy":
            axes.set_ylim(-0.05, 1.05)
        axes.set(xlabel="t (0: original, 1: unlearned)", ylabel=ylabel, title=title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save_png(figure, path)
