"""`zounlearn study`: the optimizer-grade study on the embedded model (zounlearn/robustness/study.py)."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from .inputs import UsageError, as_int, comma_list, set_threads


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser(
        "study", help="unlearn the embedded model with every optimizer grade, attack and diagnose every result",
        description="Unlearns the embedded model with each optimizer grade (first order, compressed first order, "
                    "zeroth order, hybrid, second order) and objective at a learning rate chosen by a fixed rule, "
                    "then runs relearning, retain-only fine-tuning, quantization and noise attacks and the "
                    "weight-space diagnostics on every result. Writes study.json, study.md and plots; study.md's "
                    "first line records how long it took: 17 min for the full study on one thread of a 2-core "
                    "CPU (docs/study/study.md), about 3 with --quick.")
    study.add_argument("--quick", action="store_true", help="NPO only, four optimizers, short grids, one seed")
    study.add_argument("--output", "-o", metavar="DIR",
                       help="where to write (default: runs/study-<date-time>); must not exist or be empty")
    study.add_argument("--optimizers", metavar="A,B", help="a subset of the study's optimizers (default: all nine)")
    study.add_argument("--objectives", metavar="A,B", help="objectives (default: graddiff,npo; --quick: npo)")
    study.add_argument("--seeds", metavar="0,1", help="unlearning seeds (default: 0,1; --quick: 0)")
    study.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1; results depend on it)")
    study.set_defaults(handler=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    from ..robustness.study import StudySettings, run_study
    from ..robustness.study_report import write_study
    from ..unlearning import embedded_model

    settings = StudySettings.quick() if args.quick else StudySettings()
    changes = {}
    if args.optimizers:
        changes["optimizers"] = tuple(comma_list(args.optimizers, "--optimizers", str.strip, "optimizer names",
                                                 "adamw,hybrid"))
    if args.objectives:
        changes["objectives"] = tuple(comma_list(args.objectives, "--objectives", str.strip, "objective names",
                                                 "graddiff,npo"))
    if args.seeds:
        changes["seeds"] = tuple(comma_list(args.seeds, "--seeds", as_int, "integers", "0,1"))
        if any(seed < 0 for seed in changes["seeds"]):
            raise UsageError(f"--seeds must be >= 0, got {args.seeds!r}")
    if changes:
        settings = StudySettings(**{**settings.__dict__, **changes})
    output = Path(args.output or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"the output directory {output} exists and is not empty; choose another --output")
    set_threads(args.threads, embedded=True)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    model, tokenizer, data = embedded_model(threads=args.threads)
    result = run_study(model, tokenizer, data, settings)
    paths = write_study(result, output, "zounlearn " + shlex.join(args.argv))
    print(f"\n{paths['markdown'].read_text()}\nwritten to {output}")
    return 0
