"""The stages of `make gpu-check` (scripts/gpu_check.py runs each in its own process with its own
time cap). Each writes result.json into its folder, rewritten as results come in, so that a stage
cut short by its cap keeps what it measured. The measurements are zounlearn.bench's.

Sizes (docs/gpu-check.md says how each was chosen from the review's H200 model): FULL on the GPU,
DRY (--dry-run) tiny on the CPU with the cpp backend and Triton's interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TEST_FILES = ["tests/test_rng.py", "tests/test_perturb.py", "tests/test_validation.py", "tests/test_triton_kernels.py",
              "tests/test_update_ops.py", "tests/test_optim.py"]


@dataclass(frozen=True)
class Sizes:
    device: str
    backends: tuple[str, ...]
    flat_log2: int  # one tensor of 2^flat_log2 elements
    list_model: str  # a model's parameter list (zounlearn.bench.models.MODELS)
    hf_model: str  # a causal LM built from a config (HF_CONFIGS)
    batch: tuple[int, int]  # sequences x tokens
    memory_dtype: str
    rounds: int
    shards: int  # pytest and compile processes at once
    flat_dtypes: tuple[str, ...]
    interpreter: bool  # Triton in its interpreter (~0.2 s a launch): the smallest case and one pass of each op
    selection: dict  # stage -> extra pytest arguments


# 12 processes on 16 cores: Triton compiles in the process that launches, ptxas beside it.
FULL = Sizes("cuda", ("cuda", "triton"), 28, "llama-7b", "tinyllama-1.1b", (8, 512), "bfloat16", 5,
             min(12, max(1, (os.cpu_count() or 2) - 4)), ("float32", "bfloat16"), False, {})
DRY = Sizes("cpu", ("cpp", "triton"), 12, "tiny", "tiny", (2, 32), "float32", 1, 2, ("float32",), True,
            {"gpu-paths": ("-k", "perturb_"),
             "tests": ("-k", "opcheck or hand_formula or known_answers or mezo_step_by_hand or empty_inputs")})


@dataclass
class Context:
    out: Path  # this stage's folder
    dry_run: bool
    deadline: float  # time.monotonic() by which the stage must have written its result

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else FULL

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, result: dict) -> None:
        from zounlearn.atomic import write_json

        write_json(self.out / "result.json", result)


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status or None when cut off at timeout, the output's tail), the output also in log."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")[-3000:]


# --- build and environment -------------------------------------------------------------------

def build(ctx: Context) -> dict:
    """pip install the package offline against the torch that is here, for this GPU, on all cores."""
    import torch

    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 1)}
    if torch.cuda.is_available():
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    result = {"command": " ".join(cmd[2:]), "TORCH_CUDA_ARCH_LIST": env.get("TORCH_CUDA_ARCH_LIST"),
              "MAX_JOBS": env["MAX_JOBS"], "ninja": shutil.which("ninja") is not None,
              "setuptools": _distribution("setuptools")}  # pyproject.toml's license field needs >= 77
    if ctx.dry_run:  # resolve the same offline install without building or changing anything
        cmd.append("--dry-run")
    started = time.monotonic()
    code, tail = _run(cmd, ctx.out / "pip.log", ctx.left() - 10, env)
    result.update(seconds=time.monotonic() - started, exit_status=code, tail=tail[-1500:])
    check = "import zounlearn._C_cpu" + ("" if ctx.dry_run else ", zounlearn._C_cuda")
    probe, probe_tail = _run([sys.executable, "-c", check], ctx.out / "import.log", 60)
    result.update(imports=check, imports_ok=probe == 0, import_error=probe_tail if probe else "")
    result["ok"] = code == 0 and probe == 0
    return result


def _distribution(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(ctx: Context) -> dict:
    import torch

    from zounlearn.bench import calls

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception as err:  # noqa: BLE001 -- recorded, not fatal
            return f"not importable: {err}"

    def command(*argv: str) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), []))
    result = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": version("triton"), "transformers": version("transformers"), "pytest": version("pytest"),
        "numpy": version("numpy"), "cpus": os.cpu_count(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), None),
        "cpu_isa": sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))),
        "nvcc": command("nvcc", "--version"), "compute_sanitizer": _sanitizer(),
        "git_commit": command("git", "-C", str(ROOT), "rev-parse", "HEAD"),
        "backends": calls.describe(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                         "nvidia_smi": command("nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                               "clocks.max.mem,power.limit", "--format=csv")}
    result["ok"] = True
    return result


# --- pytest, several processes at once ---------------------------------------------------------

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


# --- measurements --------------------------------------------------------------------------------

def _warm(spec: tuple, dtype: str, device: str) -> str | None:
    """Run one pass on Triton on a 4096-element tensor (same specialisation as the big ones): compiles
    the kernel into Triton's cache in a worker process. Returns the error, if any."""
    import torch

    from zounlearn.bench import calls, passes

    p = passes.Pass(*spec)
    try:
        tensors = passes.Tensors.allocate([(4096,)], getattr(torch, dtype), device)
        with torch.no_grad(), calls.use("triton"):
            p.runner(tensors)()
    except Exception as err:  # noqa: BLE001 -- the measurement will meet it again and record it
        return f"{p.name} {dtype}: {type(err).__name__}: {err}"
    return None


def _prewarm(ctx: Context, specs: list[tuple], dtypes: list[str]) -> dict:
    """Compile the Triton kernels the measurements will run, in parallel worker processes."""
    started = time.monotonic()
    errors = []
    if "triton" in ctx.sizes.backends:
        jobs = [(spec, dtype) for spec in specs for dtype in dtypes]
        with ProcessPoolExecutor(min(ctx.sizes.shards, len(jobs)), mp_context=get_context("spawn")) as pool:
            errors = [e for e in pool.map(_warm, *zip(*jobs), [ctx.sizes.device] * len(jobs)) if e]
    return {"prewarm_seconds": time.monotonic() - started, "prewarm_errors": errors}


def bandwidth(ctx: Context) -> dict:
    """Every pass on both backends at 2^28 elements (float32, bfloat16) and on a 7B model's list."""
    import torch

    from zounlearn.bench import models, passes

    s = ctx.sizes
    all_passes = passes.fused_passes(zo_dists=("rademacher", "gaussian"))
    result = {"rows": [], "done": [], "errors": []}
    specs = [(p.op, p.dist, p.rule) for p in all_passes]
    # With the interpreter there is nothing to compile: one pass proves the prewarm works.
    if s.interpreter:
        result.update(_prewarm(ctx, specs[:1], ["float32"]))
    else:
        result.update(_prewarm(ctx, specs, ["float32", "bfloat16"]))
    one_of_each = [next(p for p in all_passes if p.op == op) for op in ("perturb_", "zo_update_", "grad_update_")]
    ctx.save(result)
    cases = [(f"2^{s.flat_log2} {d}", [(1 << s.flat_log2,)], d) for d in s.flat_dtypes]
    cases.append((f"{s.list_model} list bfloat16", models.model_shapes(s.list_model), "bfloat16"))
    for backend in s.backends:  # the cuda rows first: they need no compilation
        for label, shapes, dtype in cases:
            interpreted = backend == "triton" and s.interpreter
            if interpreted and label != cases[0][0]:
                continue
            tensors = passes.Tensors.allocate(shapes, getattr(torch, dtype), s.device)
            result["rows"] += passes.measure(tensors, one_of_each if interpreted else all_passes, [backend],
                                             rounds=s.rounds, label=label, errors=result["errors"])
            result["done"].append(f"{backend}: {label}")
            ctx.save(result)
            del tensors
            _free(s.device)
    result["ok"] = not result["errors"]
    return result


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def step(ctx: Context) -> dict:
    """A ZO-SGD step against MeZO's loop: on a 7B model's list (optimizer work only) and on a causal LM
    built from a config (the whole step, two forward passes)."""
    import torch

    from zounlearn.bench import models, steps

    s = ctx.sizes
    result = {"rows": []}
    backends = [b for b in s.backends if not (b == "triton" and s.interpreter)]
    params = models.make_params(models.model_shapes(s.list_model), torch.bfloat16, s.device)
    result["rows"] += steps.measure(params, steps.constant_loss, backends, rounds=s.rounds, mezo_rounds=s.rounds,
                                    label=f"{s.list_model} list bfloat16, optimizer work")
    ctx.save(result)
    del params
    _free(s.device)
    net = models.hf_model(s.hf_model, s.device, torch.bfloat16)
    tokens = models.token_batch(net, *s.batch)
    closure = lambda: net(tokens, labels=tokens).loss  # noqa: E731
    result["rows"] += steps.measure(list(net.parameters()), closure, backends, rounds=s.rounds,
                                    mezo_rounds=s.rounds, label=f"{s.hf_model} bfloat16 {s.batch[0]}x{s.batch[1]}, "
                                                                 "whole step")
    result["ok"] = True
    return result


def memory(ctx: Context) -> dict:
    """Steady-state peak memory of each kind of step on a ~1B-parameter causal LM."""
    import torch

    from zounlearn.bench import memory as bench_memory

    s = ctx.sizes
    # In this process, as on a GPU (a dry run's CPU figures are then rougher than benchmarks/' ones).
    rows = bench_memory.measure(bench_memory.KINDS, s.hf_model, s.device, getattr(torch, s.memory_dtype), *s.batch,
                                in_process=True)
    return {"rows": rows, "model": s.hf_model, "batch": list(s.batch), "ok": True}


# --- compute-sanitizer -------------------------------------------------------------------------------

def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for path in (found, f"{home}/bin/compute-sanitizer", f"{home}/compute-sanitizer/compute-sanitizer"):
        if path and os.path.isfile(path):
            return path
    return None


def sanitizer_cases(ctx: Context) -> dict:
    """Small cases for compute-sanitizer: several tiles per CTA (3 at the most CTAs per SM), more
    tensors than one launch holds, a misaligned view, every op kind on both backends. Every tensor
    ends where its own allocation ends (run with PYTORCH_NO_CUDA_MEMORY_CACHING=1), so that memcheck
    sees any access past it."""
    import torch

    from zounlearn.bench import calls
    from zounlearn.bench.calls import Rule

    s = ctx.sizes
    sms = torch.cuda.get_device_properties(0).multi_processor_count if s.device == "cuda" else 1
    n = sms * 5 * 3 * 4096 if s.device == "cuda" else 3 * 4096
    many = 130 if s.device == "cuda" else 3  # more than a launch holds; on the CPU the interpreter is slow
    h = dict(lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-8, step=3, bits=3, rho=0.04)
    ran = []
    for backend in s.backends:
        with calls.use(backend):
            for dtype in (torch.bfloat16, torch.float32)[: 2 if s.device == "cuda" else 1]:
                def new(numel: int, shift: int = 0, kind: torch.dtype = dtype) -> torch.Tensor:
                    return torch.randn(numel + shift, device=s.device).to(kind)[shift:]

                sizes = [n // 2 - 3, n // 2 + 8] + [129 + i for i in range(many)]  # odd tails
                params = [new(sizes[0], shift=1)] + [new(k) for k in sizes[1:]]  # the first one misaligned
                grads = [new(k, shift=3) for k in sizes]
                m = [new(k, shift=1, kind=torch.float32).mul_(0.1) for k in sizes]
                v = [new(k, kind=torch.float32).square_() for k in sizes]
                offsets = calls.flat_offsets(params, start=2**32 - 77)
                for dist in ("rademacher", "gaussian"):
                    calls.perturb_(params, [1e-3], 5, offsets=offsets, dist=dist)
                    calls.perturb_(params, [1e-3, -2e-3, 1e-3], 5, offsets=offsets, dist=dist, alpha=0.99)
                    for rule in (Rule.SGD, Rule.ADAZO, Rule.SOPHIA):
                        calls.zo_update_(params, [0.5], 5, [1], offsets, rule=rule, m=m, v=v if rule.uses_v else [],
                                         restore=1e-3, dist=dist, **h)
                scales = torch.zeros(len(params), device=s.device)
                for rule in (Rule.ADAM_MOMENTS, Rule.QUANTIZED, Rule.ADAM, Rule.SIGN):
                    calls.grad_update_(params, grads, rule=rule, m=m if rule.uses_m else [], v=v if rule.uses_v else [],
                                       scales=scales if rule in (Rule.ADAM_MOMENTS, Rule.QUANTIZED) else None, **h)
                sample = calls.sample(n, 5, 2, offset=2**31 - 100, dist="gaussian", device=s.device)
                if s.device == "cuda":
                    torch.cuda.synchronize()
                assert torch.isfinite(sample).all() and all(torch.isfinite(p).all() for p in params)
                ran.append(f"{backend} {str(dtype)[6:]}: {len(params)} tensors, {sum(sizes)} elements, every op kind")
    return {"ran": ran, "ok": True}


def sanitizer(ctx: Context) -> dict:
    """compute-sanitizer memcheck and racecheck on sanitizer_cases, when the tool is here."""
    tool = _sanitizer()
    runner = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--stage", "sanitizer-cases", "--out",
              str(ctx.out.parent)] + (["--dry-run"] if ctx.dry_run else [])
    if tool is None or ctx.dry_run:
        code, tail = _run(runner, ctx.out / "cases.log", ctx.left() - 5)
        return {"tool": tool, "note": "no compute-sanitizer here (or a dry run): the cases ran without it",
                "exit_status": code, "tail": tail[-1500:], "ok": code == 0}
    result = {"tool": tool, "runs": {}}
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # one cudaMalloc per tensor: memcheck sees bounds
    for i, check in enumerate(("memcheck", "racecheck")):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", *runner]
        code, tail = _run(cmd, ctx.out / f"{check}.log", ctx.left() / (2 - i) - 3, env)
        summary = [line for line in tail.splitlines() if "SUMMARY" in line]
        result["runs"][check] = {"exit_status": code, "summary": summary[-1:] or None, "tail": tail[-1500:]}
        ctx.save(result)
    result["ok"] = all(r["exit_status"] == 0 for r in result["runs"].values())
    return result


STAGES = {"build": build, "env": environment, "correctness": correctness, "bandwidth": bandwidth, "step": step,
          "memory": memory, "tests": tests, "sanitizer": sanitizer, "sanitizer-cases": sanitizer_cases}


def run(name: str, ctx: Context) -> int:
    """Run one stage in this process: its result.json gets status ok, failed or error."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = STAGES[name](ctx)
        status = "ok" if result.pop("ok", False) else "failed"
    except Exception as err:  # noqa: BLE001 -- the stage's failure is its result
        import traceback

        traceback.print_exc()
        previous = ctx.out / "result.json"
        result = json.loads(previous.read_text()) if previous.exists() else {}
        result["error"] = f"{type(err).__name__}: {err}"
        status = "error"
    result.update(status=status, seconds=time.monotonic() - started)
    ctx.save(result)
    return 0 if status == "ok" else 1
