"""`zounlearn demo`, `zounlearn unlearn` and `zounlearn eval`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..checks import check_int
from ..errors import UsageError
from ..ops import backends
from ..optim.registry import OPTIMIZERS
from .inputs import (
    EMBEDDED,
    GIVEN,
    add_config_flag,
    add_data_flags,
    add_model_flags,
    check_data_flags,
    check_writable,
    key_values,
    load_model_and_data,
    merged,
)

# The loop's settings, as flags (dest: default). None: the loop's own default.
LOOP_DEFAULTS: dict[str, Any] = {
    "objective": "npo", "optimizer": "hybrid", "lr": None, "steps": None, "epochs": None, "batch_size": 8,
    "retain_batch_size": None, "gradient_accumulation_steps": 1, "max_length": None, "eval_every": 0,
    "eval_batch_size": 32, "checkpoint_every": 0, "seed": 0, "train_mode": False, "activation_checkpointing": False,
    "objective_option": None, "optimizer_option": None, "backend": "auto",
}
RUN_DEFAULTS: dict[str, Any] = {
    "model": None, "dtype": "float32", "device": None, "threads": None, "forget": None, "retain": None,
    "holdout": None, "fields": None, "text_unit": None, "output": None, "resume": False, "save_model": True,
    "progress": True, "lora": None, "merge_lora": False,
}
EVAL_DEFAULTS: dict[str, Any] = {
    **{k: RUN_DEFAULTS[k] for k in ("model", "dtype", "device", "threads", "forget", "retain", "holdout", "fields",
                                    "text_unit", "output")}, "eval_batch_size": 32, "max_length": None,
    "retain_model": None,
}

# The demo's recipe on the embedded model (10 forget people, 90 retain people): 120 steps of 8
# forget and 16 retain examples, retain weight 8 (SimNPO's TOFU setting), the budget of the
# optimizer-grade study (docs/study). Learning rates: the study's for NPO (the first of each
# optimizer's grid to bring forget question accuracy to <= 0.25), except the hybrid's, one grid
# step above it (1e-3: forget 0.04 instead of 0.21, retain 0.74-0.79 either way); zo_signsgd,
# zo_adam and zo_signadam are not in the study: the smallest rate of a 3x sweep that forgot at all. The
# zeroth-order ones forget only by wrecking the model at this budget (retain accuracy ~0).
DEMO_DEFAULTS: dict[str, Any] = {
    **LOOP_DEFAULTS, "model": EMBEDDED, "steps": 120, "retain_batch_size": 16, "eval_every": 20,
    "eval_batch_size": 64, "rebuild": False,
}
DEMO_RETAIN_WEIGHT = 8.0
DEMO_LR = {"adamw": 3e-4, "sgd": 3e-3, "signsgd": 3e-4, "signadam": 1e-4, "compressed_adam": 3e-4, "sophia": 1e-4,
           "zo_sgd": 2.5e-4, "zo_signsgd": 1e-2, "zo_adam": 1e-2, "adazo": 3e-4, "zo_signadam": 1e-3,
           "hybrid": 1e-3, "hybrid_float32": 1e-3, "hybrid_adam_shared": 3e-3, "hybrid_signadam": 2e-4,
           "hybrid_signadam_shared": 1e-3, "hybrid_signsgd": 3e-4}
# The lean presets (docs/memory.md): the smallest rate of a 2-3x grid that brought forget question
# accuracy to <= 0.10 (the paper's hybrid: 0.00), with these zeroth-order rates.
DEMO_HYBRID = {"zo_lr": 1e-4, "block": 10}
DEMO_ZO_LR = {"hybrid_signadam": 2.5e-5, "hybrid_signadam_shared": 1e-5, "hybrid_signsgd": 2.5e-5}


def add_loop_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    group = parser.add_argument_group("unlearning")
    group.add_argument("--objective", default=GIVEN, choices=("ga", "graddiff", "npo", "simnpo", "rmu"),
                       help=f"what to minimise (default: {defaults['objective']}); docs/unlearning.md")
    group.add_argument("--objective-option", action="append", default=GIVEN, metavar="KEY=VALUE",
                       help="an objective hyperparameter, e.g. beta=0.1, retain_weight=1, layer=1 (RMU); repeatable")
    group.add_argument("--optimizer", default=GIVEN, choices=tuple(OPTIMIZERS),
                       help=f"which optimizer (default: {defaults['optimizer']})")
    group.add_argument("--lr", default=GIVEN, type=float,
                       help="learning rate (default: " + ("tuned per optimizer for the embedded model" if
                                                           defaults is DEMO_DEFAULTS else "the optimizer's") + ")")
    group.add_argument("--optimizer-option", action="append", default=GIVEN, metavar="KEY=VALUE",
                       help="an optimizer option, e.g. momentum=0.9, mu=1e-3, queries=4; hybrid: zo_lr=1e-5, "
                            "block=20, fo_optimizer=adamw; repeatable")
    steps = defaults["steps"] or "one epoch over the forget set"
    group.add_argument("--steps", default=GIVEN, type=int, help=f"optimizer steps (default: {steps})")
    group.add_argument("--epochs", default=GIVEN, type=float, help="epochs over the forget set, instead of --steps")
    group.add_argument("--batch-size", default=GIVEN, type=int,
                       help=f"forget examples per step (default: {defaults['batch_size']})")
    group.add_argument("--retain-batch-size", default=GIVEN, type=int,
                       help=f"retain examples per step (default: {defaults['retain_batch_size'] or 'batch size'})")
    group.add_argument("--gradient-accumulation-steps", default=GIVEN, type=int, metavar="N",
                       help="split each step's batches into N micro-batches, one forward (and backward) at a "
                            "time, the same loss and update up to rounding: less activation memory (default: 1)")
    group.add_argument("--max-length", default=GIVEN, type=int, help="truncate examples to this many tokens")
    group.add_argument("--eval-every", default=GIVEN, type=int,
                       help=f"evaluate every N steps (default: {defaults['eval_every'] or 'only before and after'})")
    group.add_argument("--eval-batch-size", default=GIVEN, type=int,
                       help=f"examples per evaluation batch (default: {defaults['eval_batch_size']})")
    group.add_argument("--checkpoint-every", default=GIVEN, type=int,
                       help="write a checkpoint every N steps (default: 0, only when stopped with Ctrl-C)")
    group.add_argument("--seed", default=GIVEN, type=int, help="batch order, ZO directions, dropout (default: 0)")
    group.add_argument("--train-mode", default=GIVEN, action="store_true",
                       help="run the model in train mode (dropout on); default: eval mode")
    group.add_argument("--backend", default=GIVEN, choices=("auto", *backends.BACKENDS),
                       help="which kernels run the fused ops (default: auto, the fastest for the device; "
                            "`zounlearn info` lists them); one that cannot run here is an error before any work")
    group.add_argument("--activation-checkpointing", default=GIVEN, action="store_true",
                       help="recompute each layer's activations in first-order backward passes: less memory, one "
                            "more forward per step (docs/memory.md)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output", "-o", default=GIVEN, metavar="DIR",
                       help="the run directory (default: runs/<objective>-<optimizer>-<date-time>); it must not "
                            "exist or be empty, unless --resume")
    group.add_argument("--resume", default=GIVEN, action="store_true",
                       help="continue the unfinished run in --output from its newest checkpoint")
    group.add_argument("--no-save-model", dest="save_model", default=GIVEN, action="store_false",
                       help="do not write the unlearned model to DIR/model")
    group.add_argument("--no-progress", dest="progress", default=GIVEN, action="store_false",
                       help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="unlearn the embedded model's forget set offline and show before/after",
                          description="Builds (once) or loads the embedded model, evaluates it, unlearns its forget "
                                      "set (hybrid optimizer on NPO by default), evaluates again, writes the run "
                                      "directory (report, plots, model) and prints a before/after table.")
    add_loop_flags(demo, DEMO_DEFAULTS)
    add_output_flags(demo)
    demo.add_argument("--threads", default=GIVEN, type=int, metavar="N", help="CPU threads (default: 1)")
    demo.add_argument("--rebuild", default=GIVEN, action="store_true", help="rebuild the cached embedded model")
    demo.set_defaults(handler=run_demo)

    run = sub.add_parser("unlearn", help="unlearn a forget set from a Hugging Face model",
                         description="Unlearn --forget from --model while keeping --retain; writes the run "
                                     "directory: config.json, metrics.jsonl, checkpoints/, model/, report.json, "
                                     "report.md, loss.png, metrics.png.")
    add_config_flag(run)
    add_model_flags(run)
    add_data_flags(run)
    add_loop_flags(run, LOOP_DEFAULTS)
    add_output_flags(run)
    lora = run.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", default=GIVEN, metavar="r=8,alpha=16,target=M,M",
                      help="unlearn LoRA adapters instead of the weights; DIR/model then holds the adapters as peft "
                           "saves them (zounlearn.hf.lora)")
    lora.add_argument("--merge-lora", default=GIVEN, action="store_true",
                      help="also write the model with the adapters merged into its weights to DIR/merged")
    run.set_defaults(handler=run_unlearn)

    evaluate = sub.add_parser("eval", help="evaluate a model on forget, retain and holdout data",
                              description="Loss, perplexity, question and 4-choice accuracy, ROUGE-L and the Min-k%% "
                                          "membership-inference AUC of a model on the given data.")
    add_config_flag(evaluate)
    add_model_flags(evaluate)
    add_data_flags(evaluate)
    evaluate.add_argument("--eval-batch-size", default=GIVEN, type=int, help="examples per batch (default: 32)")
    evaluate.add_argument("--max-length", default=GIVEN, type=int, help="truncate examples to this many tokens")
    evaluate.add_argument("--output", "-o", default=GIVEN, metavar="FILE", help="also write the metrics as JSON")
    evaluate.add_argument("--retain-model", default=GIVEN, metavar="M",
                          help="a model trained without the forget set (TOFU's retain model; same tokenizer), for "
                               "forget_quality and privleak; the embedded model's data come with theirs")
    evaluate.set_defaults(handler=run_eval)


def run_demo(args: argparse.Namespace) -> int:
    options = merged(args, {**DEMO_DEFAULTS, **RUN_DEFAULTS, "model": EMBEDDED})
    name = options["optimizer"]
    if options["lr"] is None:
        options["lr"] = DEMO_LR[name]
    objective_options = key_values(options["objective_option"], "--objective-option")
    if options["objective"] in ("graddiff", "npo", "simnpo"):
        objective_options.setdefault("retain_weight", DEMO_RETAIN_WEIGHT)
    if options["objective"] == "rmu":
        objective_options.setdefault("layer", 1)  # the embedded model has 2 blocks
    optimizer_options = key_values(options["optimizer_option"], "--optimizer-option")
    if OPTIMIZERS[name].grade == "hybrid":
        optimizer_options = {**DEMO_HYBRID, "zo_lr": DEMO_ZO_LR.get(name, DEMO_HYBRID["zo_lr"]), **optimizer_options}
    return _unlearn(options, objective_options, optimizer_options)


def run_unlearn(args: argparse.Namespace) -> int:
    options = merged(args, {**LOOP_DEFAULTS, **RUN_DEFAULTS})
    return _unlearn(options, key_values(options["objective_option"], "--objective-option"),
                    key_values(options["optimizer_option"], "--optimizer-option"))


def _unlearn(options: dict[str, Any], objective_options: dict[str, Any], optimizer_options: dict[str, Any]) -> int:
    from ..unlearning.loop import LoopConfig, unlearn
    from ..unlearning.report import metrics_table

    config = LoopConfig(**{k: options[k] for k in LOOP_DEFAULTS
                           if k not in ("objective_option", "optimizer_option", "backend")},
                        objective_options=objective_options, optimizer_options=optimizer_options)
    check_optimizer_options(config.optimizer, config.lr, optimizer_options)
    device = str(options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends.require(options["backend"], device.split(":")[0])  # a bad device itself is refused by the model's load
    output = options["output"]
    if output is None:
        if options["resume"]:
            raise UsageError("--resume needs --output DIR, the run directory to continue")
        output = Path("runs") / f"{config.objective}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not options["resume"] and Path(output).is_dir() and any(Path(output).iterdir()):
        raise UsageError(f"the run directory {output} exists and is not empty; choose another --output, or add "
                         f"--resume to continue it")
    check_writable(output, "--output", directory=True)
    lora = None
    if options.get("lora"):
        from ..hf.lora import apply_lora, parse_lora, save_merged
        lora = parse_lora(options["lora"])
    elif options.get("merge_lora"):
        raise UsageError("--merge-lora needs --lora")
    if options.get("rebuild"):  # the demo's --rebuild, once every option is checked
        from ..unlearning import embedded_model
        embedded_model(rebuild=True, threads=options.get("threads") or 1)
    model, tokenizer, data, meta = load_model_and_data(options, progress=options["progress"])
    if lora is not None:
        model = apply_lora(model, lora)
        meta = {**meta, "lora": options["lora"]}
    with backends.use(options["backend"]):
        result = unlearn(model, tokenizer, data, config, output, resume=options["resume"],
                         progress=options["progress"], save_model=options["save_model"], meta=meta)
    if options.get("merge_lora"):
        save_merged(model, tokenizer, Path(output) / "merged")
    print(f"\n{config.objective} with {config.optimizer} (lr {config.lr if config.lr is not None else 'default'}), "
          f"{result.steps} steps, {result.seconds:.1f} s of training\n")
    print(metrics_table(result.before, result.after))
    print(f"\nrun directory: {output}  (report.md, loss.png, metrics.png"
          f"{', model/' if options['save_model'] else ''})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    options = merged(args, EVAL_DEFAULTS)
    if options["retain_model"] == EMBEDDED:
        raise UsageError("--retain-model embedded is not a retain model; the embedded data use their retrain model "
                         "without the flag")
    check_int("--eval-batch-size", options["eval_batch_size"], 1)
    if options["max_length"] is not None:
        check_int("--max-length", options["max_length"], 2)
    if options["output"] is not None:
        check_writable(options["output"], "--output")
    check_data_flags(options)
    from ..atomic import write_json
    from ..unlearning import evaluate
    from ..unlearning.batches import fit_to_context
    from ..unlearning.report import default_keys, format_metric, jsonable

    model, tokenizer, data, meta = load_model_and_data(options, progress=True)
    retain = None
    if options["retain_model"] is not None:
        from ..unlearning import load_model
        retain = load_model(options["retain_model"], dtype=options["dtype"], device=model.device)[0]
        meta["retain_model"] = options["retain_model"]
    limit = fit_to_context(model, tokenizer, data, options["max_length"])
    metrics = evaluate(model, tokenizer, data, batch_size=options["eval_batch_size"], max_length=limit,
                       retain_model=retain)
    for key in default_keys(metrics, metrics):
        print(f"{key:<28} {format_metric(metrics[key], key):>10}")
    if options["output"]:
        write_json(options["output"], jsonable({"meta": meta, "metrics": metrics}))
        print(f"\nmetrics written to {options['output']}")
    return 0


def check_optimizer_options(name: str, lr: float | None, options: dict[str, Any]) -> None:
    """The optimizer's options, type-checked before any work: one line and exit 2 for a bad value."""
    from ..optim import registry

    if name == "custom":
        return
    try:
        registry.check_optimizer_options(name, options, lr)
    except UsageError as e:
        raise UsageError(f"--optimizer-option: {' '.join(str(e).split())}") from None
