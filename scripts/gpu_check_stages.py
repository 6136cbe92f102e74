"""The stages of `make gpu-check` (scripts/gpu_check.py runs each in its own process with its own
time cap). Each writes result.json into its folder, rewritten as results come in, so that a stage
cut short by its cap keeps what it measured. The build, the environment and compute-sanitizer are
here; the tests in gpu_check_pytest.py, the measurements in gpu_check_measure.py.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_context import ROOT, SCRIPTS, Context, run_logged
from gpu_check_measure import bandwidth, memory, step
from gpu_check_pytest import correctness, tests


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
    code, tail = run_logged(cmd, ctx.out / "pip.log", ctx.left() - 10, env)
    result.update(seconds=time.monotonic() - started, exit_status=code, tail=tail[-1500:])
    check = "import zounlearn._C_cpu" + ("" if ctx.dry_run else ", zounlearn._C_cuda")
    probe, probe_tail = run_logged([sys.executable, "-c", check], ctx.out / "import.log", 60)
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
                    for rule in (Rule.SGD, Rule.ADAZO, Rule.DESCENT):
                        calls.zo_update_(params, [0.5], 5, [1], offsets, rule=rule, m=m if rule.uses_m else [],
                                         v=v if rule.uses_v else [], restore=1e-3, dist=dist, **h)
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
    if tool is None or ctx.dry_run:  # the cases alone, here
        return {"tool": tool, "note": "no compute-sanitizer here (or a dry run): the cases ran without it",
                **sanitizer_cases(ctx)}
    result = {"tool": tool, "runs": {}}
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # one cudaMalloc per tensor: memcheck sees bounds
    for i, check in enumerate(("memcheck", "racecheck")):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", *runner]
        code, tail = run_logged(cmd, ctx.out / f"{check}.log", ctx.left() / (2 - i) - 3, env)
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
