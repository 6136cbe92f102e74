"""`zounlearn memory`: the predicted peak memory of unlearning a model, by component, and what fits."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .inputs import UsageError, as_float, comma_list, key_values

DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16", "int8")
GPUS = (24.0, 80.0, 141.0)
INFERENCE = "inference"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="predict the peak memory of unlearning a model with each optimizer, and what fits a GPU",
        description="Predicts the steady-state peak memory of an unlearning step (weights, gradients, optimizer "
                    "state, activations, scratch) from the model's Hugging Face config, by the memory model of "
                    "docs/memory.md, for each optimizer and hybrid preset, and whether it fits each GPU size. "
                    "Nothing is loaded but the config: the architecture is traced on the meta device.")
    p.add_argument("--model", default="7b",
                   help="a model directory or config.json, or a size: gpt2, gpt2-medium, gpt2-large, 1b, 7b, 13b, 70b "
                        "(default: 7b)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the parameters' dtype (default: bfloat16)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, forget and retain together (default: 8)")
    p.add_argument("--length", type=int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--optimizer", metavar="A,B",
                   help="registry names (zounlearn unlearn --optimizer), 'inference', or NAME+in_backward; default: "
                        "all of them")
    p.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE",
                   help="an option for every optimizer named, e.g. in_backward=true, zo_dist=sphere; repeatable")
    p.add_argument("--state-dtype", choices=STATE_DTYPES,
                   help="zounlearn's optimizer state in this dtype (state_dtype; a hybrid's fo_ and zo_state_dtype "
                        "where its preset leaves them open); default: each optimizer's own (float32, or its preset's)")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint the layers' activations")
    p.add_argument("--gpu", metavar="GB,GB", help="GPU memory sizes in GB (10^9 bytes) to check (default: 24,80,141)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where torch's own optimizers step (their scratch differs; default: cuda)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_memory)


def rows(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Any]], list[str]]:
    """(the profile, [(row name, Estimate)], the names left out: they cannot keep --state-dtype)."""
    import torch

    from ..memory import estimate, load_config, plan, profile
    from ..memory.estimate import Plan
    from ..optim.registry import OPTIMIZERS

    if args.batch < 1 or args.length < 1:
        raise UsageError(f"--batch and --length must be at least 1, got {args.batch} and {args.length}")
    options = key_values(args.optimizer_option, "--optimizer-option")
    if args.optimizer:
        names = comma_list(args.optimizer, "--optimizer", str.strip, "optimizer names", "adamw,hybrid_signadam")
    else:
        first_order = [n for n, s in OPTIMIZERS.items() if s.grade not in ("zeroth-order", "hybrid")]
        names = [INFERENCE, *OPTIMIZERS, *(f"{n}+in_backward" for n in first_order)]
    prof = profile(load_config(args.model), getattr(torch, args.dtype), args.model)
    out, skipped = [], []
    for name in names:
        base, _, flag = name.partition("+")
        if flag not in ("", "in_backward"):
            raise UsageError(f"--optimizer {name!r}: the only suffix is +in_backward, e.g. adamw+in_backward")
        if base == INFERENCE:
            p = Plan(name=INFERENCE, state_bytes=0.0, first_order=False, zeroth_order=False)
        else:
            try:
                p = plan(base, **{**_state_options(base, args.state_dtype), **options,
                                  **({"in_backward": True} if flag else {})})
            except UsageError:  # all of them asked for: leave out those that cannot keep this state
                if args.optimizer or args.state_dtype is None:
                    raise
                skipped.append(name)
                continue
        out.append((name, estimate(prof, p, batch=args.batch, length=args.length,
                                   checkpointing=args.activation_checkpointing, device=args.device)))
    return prof, out, skipped


def _state_options(name: str, state_dtype: str | None) -> dict[str, str]:
    """--state-dtype as the options of optimizer `name` that set it (none it does not take)."""
    from ..optim.registry import optimizer_options

    if state_dtype is None:
        return {}
    accepted = optimizer_options(name)
    return {key: state_dtype for key in ("state_dtype", "fo_state_dtype", "zo_state_dtype") if key in accepted}


def run_memory(args: argparse.Namespace) -> int:
    from ..memory import COMPONENTS, describe

    gpus = comma_list(args.gpu, "--gpu", as_float, "sizes in GB", "24,80") if args.gpu else list(GPUS)
    if any(g <= 0 for g in gpus):
        raise UsageError(f"--gpu sizes must be positive, got {args.gpu!r}")
    prof, estimates, skipped = rows(args)
    if args.json:
        print(json.dumps({"model": describe(prof), "batch": args.batch, "length": args.length,
                          "state_dtype": args.state_dtype, "activation_checkpointing": args.activation_checkpointing,
                          "rows": [{"optimizer": name, "peak_bytes": e.peak, "at": e.at, **e.components,
                                    "state_bytes_per_parameter": e.plan.state_bytes,
                                    "fits_gb": [g for g in gpus if e.fits(g * 1e9)]} for name, e in estimates],
                          "left_out": skipped}))
        return 0
    print(describe(prof))
    state = f"{args.state_dtype} optimizer state" if args.state_dtype else "each optimizer's own state dtype"
    print(f"batch {args.batch} x {args.length} tokens, {state}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; GB = 10^9 bytes "
          f"(docs/memory.md)\n")
    header = ["optimizer", *COMPONENTS, "peak GB", "peak at", *(f"{g:g} GB" for g in gpus)]
    table = [[name, *(f"{e.components[c] / 1e9:.2f}" for c in COMPONENTS), f"{e.peak / 1e9:.2f}", e.at,
              *("fits" if e.fits(g * 1e9) else "-" for g in gpus)] for name, e in estimates]
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  ".join(str(c).ljust(w) if i in (0, 7) else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    from ..optim.registry import OPTIMIZERS

    presets = [(name, OPTIMIZERS[name].about) for name, _ in estimates if name in OPTIMIZERS and OPTIMIZERS[name].about]
    if presets:
        print("\n" + "\n".join(f"{name}: {about}" for name, about in presets))
    if skipped:
        print(f"\nleft out (they keep no {args.state_dtype} state): " + ", ".join(skipped))
    return 0
