#!/usr/bin/env python3
"""`make gpu-check`: everything a short GPU lease should verify, in one command of at most 8 minutes.

    python scripts/gpu_check.py              # on the GPU machine (no network): build, then the stages
    python scripts/gpu_check.py --dry-run    # the same stages at tiny sizes on the CPU (CI)

Stages, in order of value; each runs in its own process group under its own time cap (and all
of them under one budget), writes its results into $GPU_CHECK_OUT/<stage>/ (default
runs/gpu-check-<date-time>) as they come, and is killed at its cap without losing the others':

  build        pip install --no-build-isolation --no-deps --no-index -e . for the visible GPU, all cores
  env          versions, the GPU, the CPU, nvcc, compute-sanitizer, the backends
  correctness  tests/test_gpu_paths.py: every op, rule, dtype and backend on the review's paths
  bandwidth    every pass on both GPU backends against add_ and copy_ (2^28 elements, a 7B list)
  step         ZO-SGD (Rademacher, Gaussian) against MeZO's loop (a 7B list; TinyLlama-1.1B shapes)
  memory       steady-state peak memory of inference, ZO-SGD, MeZO, AdaZO, AdamW (and in backward),
               SignAdam, the paper's hybrid and a lean preset (1.1B)
  tests        the op and optimizer tests, whose backends are then cuda and triton
  sanitizer    compute-sanitizer memcheck and racecheck on small cases, when the tool is here

then summary.md (and summary.json) in the output folder, also printed. docs/gpu-check.md says how
each cap was sized from the review's H200 model. Exit status 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_stages as stages  # noqa: E402

# (stage, cap in seconds on the H200, cap in a dry run); see docs/gpu-check.md for the sizing.
PLAN = [("build", 180, 40), ("env", 20, 30), ("correctness", 75, 50), ("bandwidth", 45, 40), ("step", 40, 30),
        ("memory", 35, 50), ("tests", 90, 50), ("sanitizer", 45, 30)]
BUDGET, DRY_BUDGET = 470, 170  # seconds for all stages (8 minutes, 3 in a dry run, less the summary)
MIN_STAGE = 5


def _run_stage(name: str, cap: float, out: Path, dry_run: bool) -> dict:
    """The stage in a child process group, killed at cap; its result.json plus the runner's view."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--stage", name, "--out", str(out), "--cap", str(cap)]
    cmd += ["--dry-run"] if dry_run else []
    started = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=stages.ROOT, start_new_session=True)
        try:
            proc.wait(timeout=cap)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    path = folder / "result.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if timed_out:
        result["status"] = "timeout"
    elif "status" not in result:
        result["status"] = f"crashed (exit status {proc.returncode})"
    result.update(cap=cap, wall_seconds=time.monotonic() - started)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: proves the script works")
    parser.add_argument("--out", default=None, help="output folder (default: $GPU_CHECK_OUT or runs/gpu-check-*)")
    parser.add_argument("--only", default=None, metavar="A,B", help="run these stages only")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage here
    parser.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:  # the CPU, whatever this machine has; Triton through its interpreter; one thread,
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # which tiny sizes run fastest (on a busy machine, 100x
        os.environ["TRITON_INTERPRET"] = "1"  # faster than two threads that wait for each other)
        os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(args.out or os.environ.get("GPU_CHECK_OUT") or
               f"runs/gpu-check-{'dry-' if args.dry_run else ''}{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if args.stage:
        ctx = stages.Context(out / args.stage, args.dry_run, time.monotonic() + args.cap - 2)
        return stages.run(args.stage, ctx)
    plan = [(name, dry if args.dry_run else full) for name, full, dry in PLAN]
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {name for name, _ in plan}
        if unknown:
            parser.error(f"unknown stage(s) {sorted(unknown)}; the stages are {[name for name, _ in plan]}")
        plan = [(name, cap) for name, cap in plan if name in wanted]
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (DRY_BUDGET if args.dry_run else BUDGET)
    print(f"gpu-check{' --dry-run' if args.dry_run else ''}: writing to {out}", flush=True)
    results = {}
    for name, own_cap in plan:
        cap = min(own_cap, deadline - time.monotonic())
        if cap < MIN_STAGE:
            results[name] = {"status": "skipped: the budget ran out", "cap": 0}
        else:
            results[name] = _run_stage(name, cap, out, args.dry_run)
        r = results[name]
        r["cut_by_budget"] = cap < own_cap and r["status"] != "ok"
        print(f"  {name:<12} {r['status']:<10} {r.get('wall_seconds', 0):6.1f} s (cap {r['cap']:.0f} s)", flush=True)
    from gpu_check_summary import write_summary

    text = write_summary(out, results, args.dry_run)
    print("\n" + text)
    # A dry run proves the stages work: one that a slow machine's budget cut short (or skipped) is no
    # failure of the script. On the GPU every missing result counts.
    failed = [n for n, r in results.items() if r["status"] != "ok" and not (args.dry_run and r["cut_by_budget"])]
    if failed:
        print(f"gpu-check: not ok: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
