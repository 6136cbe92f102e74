"""`zounlearn study`: the optimizer-grade study on the embedded model (zounlearn/robustness/study.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from .inputs import UsageError, as_int, comma_list, set_threads

MODEL_SIZES = ("small", "medium", "large")  # zounlearn.robustness.study.MODEL_SIZES, restated: see cli/robustness.py


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser(
        "study", help="unlearn the embedded model with every optimizer grade, attack and diagnose every result",
        description="Unlearns the embedded model with each optimizer grade (first order, compressed first order, "
                    "zeroth order, hybrid, second order) and objective under matched compute (and a longer "
                    "zeroth-order budget), at the learning rate with the highest model utility among those that "
                    "forget, over three seeds; then attacks every result, the original and the retrain model "
                    "(relearning, retain-only fine-tuning at their strongest point, quantization, noise) and "
                    "measures weight distance and mode connectivity. Writes study.json, study.md and plots; "
                    "study.md's first line records how long it took and the machine's load: 31 min for the full "
                    "study on one thread of a 2-core CPU that was also running a benchmark (docs/study/study.md; "
                    "22 on the idle CPU), about 2 with --quick.")
    study.add_argument("--quick", action="store_true", help="NPO only, four optimizers, short grids, two seeds")
    study.add_argument("--output", "-o", metavar="DIR",
                       help="where to write (default: runs/study-<date-time>); must not exist or be empty")
    study.add_argument("--optimizers", metavar="A,B", help="a subset of the study's optimizers, with adamw "
                                                           "(default: all nine)")
    study.add_argument("--objectives", metavar="A,B", help="objectives (default: graddiff,npo; --quick: npo)")
    study.add_argument("--seeds", metavar="0,1,2", help="unlearning seeds (default: 0,1,2; --quick: 0,1)")
    study.add_argument("--model-size", choices=MODEL_SIZES, default="small",
                       help="the embedded model's size: small (2 layers of 64, the default), medium (4 of 128), "
                            "large (6 of 256); each is built once and cached")
    study.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1; results depend on it)")
    study.set_defaults(handler=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    from ..robustness.study import MODEL_SIZES as CONFIGS
    from ..robustness.study import StudySettings, run_study
    from ..robustness.study_report import write_study
    from ..unlearning import embedded_model, retrain_model

    settings = StudySettings.quick() if args.quick else StudySettings()
    changes = {"model_size": args.model_size}
    if args.optimizers:
        changes["optimizers"] = tuple(comma_list(args.optimizers, "--optimizers", str.strip, "optimizer names",
                                                 "adamw,hybrid"))
    if args.objectives:
        changes["objectives"] = tuple(comma_list(args.objectives, "--objectives", str.strip, "objective names",
                                                 "graddiff,npo"))
    if args.seeds:
        changes["seeds"] = tuple(comma_list(args.seeds, "--seeds", as_int, "integers", "0,1,2"))
        if any(seed < 0 for seed in changes["seeds"]):
            raise UsageError(f"--seeds must be >= 0, got {args.seeds!r}")
    settings = StudySettings(**{**settings.__dict__, **changes})
    output = Path(args.output or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"the output directory {output} exists and is not empty; choose another --output")
    set_threads(args.threads, embedded=True)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    config = CONFIGS[settings.model_size]
    load = os.getloadavg()[0]
    model, tokenizer, data = embedded_model(config=config, threads=args.threads)
    retrain, _ = retrain_model(config=config, threads=args.threads)
    result = run_study(model, retrain, tokenizer, data, settings)
    load_note = f"load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on " \
                f"{os.cpu_count()} cores"
    paths = write_study(result, output, "zounlearn " + shlex.join(args.argv), load_note)
    print(f"\n{paths['markdown'].read_text()}\nwritten to {output}")
    return 0
