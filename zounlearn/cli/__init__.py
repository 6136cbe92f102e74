"""The `zounlearn` command line.

  info      which backends run here (--timing: a timed perturbation round trip)
  demo      unlearn the embedded model offline, before/after table, report and plots
  unlearn   unlearn a forget set from any Hugging Face causal LM
  eval      evaluate a model on forget, retain and holdout data
  attack    relearn, retain-finetune, quantize, noise: attack an unlearned model (diagnose: weight space)
  study     every optimizer grade on the embedded model, attacked and diagnosed
  memory    the predicted peak memory of each optimizer on a model, and what fits a GPU

Bad input (missing files, unknown names, a model that is not one, a dtype the device cannot
run) ends with one line on stderr that says what is wrong and how to fix it, exit status 2,
and no run directory that looks finished (a finished one has report.json).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from . import memory, robustness, study, unlearn
from .info import run_info


class Parser(argparse.ArgumentParser):
    """argparse with the house's bad-input rule: one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zounlearn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = sub.add_parser("info", help="which backends can run here, and why not")
    p_info.add_argument("--timing", action="store_true", help="also time a perturb/restore round trip per backend")
    p_info.add_argument("--numel", type=int, default=1 << 22, help="parameters to perturb with --timing (default 2^22)")
    p_info.add_argument("--seed", type=int, default=0, help="the round trip's seed (default 0)")
    p_info.add_argument("--repeats", type=int, default=3, help="round trips to average (default 3)")
    p_info.set_defaults(handler=run_info)
    unlearn.register(sub)
    robustness.register(sub)
    study.register(sub)
    memory.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for records such as study.md
    try:
        return args.handler(args)
    except KeyboardInterrupt as e:
        print(f"\nzounlearn {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad input: DataError, ModelError and UsageError are ValueErrors
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"zounlearn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
