"""The `zounlearn` command line.

  info      which backends run here (--timing: a timed perturbation round trip)
  demo      unlearn the embedded model offline, before/after table, report and plots
  unlearn   unlearn a forget set from any Hugging Face causal LM
  eval      evaluate a model on forget, retain and holdout data
  attack    relearn, retain-finetune, quantize, noise: attack an unlearned model (diagnose: weight space)
  study     every optimizer grade on the embedded model, attacked and diagnosed
  memory    the predicted peak memory of each optimizer on a model, and what fits a GPU

Bad input (missing files, unknown names, a model that is not one, a dtype the device cannot
run, an option of the wrong type, an output that cannot be written) ends with one line on
stderr that says what is wrong and how to fix it, exit status 2, before any model is loaded
or any output is created: zounlearn's own errors (zounlearn.errors.ZounlearnError) and
OSErrors (a path that cannot be read or written) are told that way. Any other exception is
a bug and keeps its traceback (exit status 1). A run stopped by SIGINT or SIGTERM exits
with 128 + the signal's number (130, 143) after saying where it can be resumed from.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import ZounlearnError
from . import bench, memory, robustness, study, unlearn
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
    bench.register(sub)
    memory.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for records such as study.md
    command = f"zounlearn {args.command}"
    try:
        with _one_line_warnings(command):
            return args.handler(args)
    except KeyboardInterrupt as e:
        print(f"\n{command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except ZounlearnError as e:
        print(f"{command}: error: {_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: name it
        where = f"{e.filename}: " if e.filename else ""
        print(f"{command}: error: {where}{_line(e.strerror or str(e))}", file=sys.stderr)
        return 2


def _line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings on one line each, as the errors are (Python's format adds the source line)."""
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"{command}: warning: {_line(str(message))}", file=sys.stderr if file is None else file)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
