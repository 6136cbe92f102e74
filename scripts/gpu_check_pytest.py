"""The test stages of `make gpu-check`: pytest in several processes at once (scripts/pytest_shard.py;
pytest-xdist is not on the GPU machine), JUnit XML read back into counts, failures and the largest
errors the tests record."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from gpu_check_context import ROOT, SCRIPTS, Context

TEST_FILES = ["tests/test_rng.py", "tests/test_perturb.py", "tests/test_validation.py", "tests/test_triton_kernels.py",
              "tests/test_update_ops.py", "tests/test_optim.py"]


def _pytest(ctx: Context, name: str, files: list[str], ignore: str) -> dict:
    """The files' tests in ctx.sizes.shards processes at once (scripts/pytest_shard.py), JUnit XML each."""
    shards = ctx.sizes.shards
    env = {**os.environ, "PYTEST_SHARD_IGNORE": ignore,
           "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for i in range(shards):
        junit, log = ctx.out / f"{name}-{i}.xml", ctx.out / f"{name}-{i}.log"
        cmd = [sys.executable, "-m", "pytest", *files, "-p", "pytest_shard", "-p", "no:cacheprovider", "-v", "-rfE",
               "-o", "junit_family=xunit1", f"--junitxml={junit}", *ctx.sizes.selection.get(name, ())]
        f = open(log, "w")
        procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**env, "PYTEST_SHARD": f"{i}/{shards}"}, start_new_session=True),
                      junit, log, f))
    cut_off = []
    for proc, _, log, f in procs:
        try:
            proc.wait(timeout=max(1.0, ctx.left() - 5))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            cut_off.append(log.name)
        f.close()
    result = _junit([junit for _, junit, _, _ in procs], [log for _, _, log, _ in procs])
    result.update(shards=shards, files=files, cut_off=cut_off,
                  exit_statuses=[proc.returncode for proc, *_ in procs])
    # pytest exits 5 when a shard collected nothing; a cut-off shard's passes are counted from its log.
    result["ok"] = not cut_off and result["failed"] == 0 and result["errors"] == 0 and result["passed"] > 0
    return result


def _junit(xmls: list[Path], logs: list[Path]) -> dict:
    counts = defaultdict(int)
    failures, errors_by_group = [], defaultdict(lambda: {"tests": 0, "max_abs_error": 0.0})
    for xml, log in zip(xmls, logs):
        if not xml.exists():  # cut off: count what its log shows
            text = log.read_text(errors="replace")
            for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                counts[outcome.lower() if outcome != "ERROR" else "errors"] += len(re.findall(rf" {outcome}\b", text))
            continue
        for case in ET.parse(xml).getroot().iter("testcase"):
            nodeid = f"{case.get('classname')}::{case.get('name')}"
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if case.find("skipped") is not None:
                counts["skipped"] += 1
            elif problem is not None:
                counts["failed" if problem.tag == "failure" else "errors"] += 1
                first_line = next(iter((problem.get("message") or "").splitlines()), "")
                failures.append({"test": nodeid, "message": first_line[:300]})
            else:
                counts["passed"] += 1
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            if "max_abs_error" in props:
                group = errors_by_group[" ".join(props.get(k, "-") for k in ("backend", "op", "dist"))]
                group["tests"] += 1
                group["max_abs_error"] = max(group["max_abs_error"], float(props["max_abs_error"]))
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failures": failures[:50],
            "max_abs_error": dict(sorted(errors_by_group.items()))}


def correctness(ctx: Context) -> dict:
    """tests/test_gpu_paths.py: every op, rule, dtype and GPU backend on the paths of the review."""
    return _pytest(ctx, "gpu-paths", ["tests/test_gpu_paths.py"], "layout")


def tests(ctx: Context) -> dict:
    """The op and optimizer tests; with a GPU their backends are cuda and triton on CUDA tensors."""
    return _pytest(ctx, "tests", TEST_FILES, "case,base")
