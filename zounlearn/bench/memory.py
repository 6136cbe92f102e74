"""Steady-state peak memory of one training step of each kind on a causal LM built from a config.

Every kind first runs its warm-up round, in which each of its phases allocates its state (the
hybrid runs one first-order and one zeroth-order step per round, so both inner optimizers hold
their state), then the high-water mark is reset and one more round is measured: the peak of a
long run, not of its first step.

- CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, in-process.
- CPU: the kernel's high-water mark of resident memory (VmHWM, reset through
  /proc/self/clear_refs), each kind in a fresh process (`python -m zounlearn.bench.memory KIND`)
  started with blocks of 64 KiB and more mmap-ed and the heap trimmed before the reset, so
  resident memory follows live memory instead of malloc's free lists.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch

from ..optim import ZOSGD, AdaZO, HybridFOZO, SignAdam
from ..optim.mezo import mezo_step
from . import calls
from .models import hf_model, token_batch

KINDS = ("inference", "ZOSGD", "ZOSGD exact", "MeZO loop", "AdaZO", "AdamW", "SignAdam", "HybridFOZO")
# The same on LoRA adapters (peft, r 8, alpha 16 on its default target modules): only the adapters train.
LORA_KINDS = tuple(f"LoRA {kind}" for kind in ("inference", "AdamW", "AdaZO", "SignAdam", "HybridFOZO"))
LR, MU = 1e-7, 1e-3
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # read by glibc at start-up only


def _round(kind: str, model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One steady-state round of `kind`: a step (the hybrid: one first-order and one ZO step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "inference":
        return lambda: torch.no_grad()(loss)()
    if kind in ("ZOSGD", "ZOSGD exact"):  # in place, or perturbing copies one tensor at a time
        opt = calls.optimizer(ZOSGD, params, lr=LR, mu=MU, model=model,
                              perturbation="exact" if kind.endswith("exact") else "in_place")
        return lambda: opt.step(loss)
    if kind == "AdaZO":
        opt = calls.optimizer(AdaZO, params, lr=LR, mu=MU)
        return lambda: opt.step(loss)
    if kind == "MeZO loop":
        return lambda: mezo_step(params, loss, lr=LR, mu=MU, seed=0)
    if kind == "SignAdam":
        opt = calls.optimizer(SignAdam, params, lr=LR)
        return lambda: opt.step(loss)
    if kind == "AdamW":
        adamw = torch.optim.AdamW(params, lr=LR)

        def step() -> None:
            adamw.zero_grad(set_to_none=True)
            loss().backward()
            adamw.step()
        return step
    if kind == "HybridFOZO":
        hybrid = HybridFOZO(params, lr=LR, block=1, fo_optimizer=lambda ps: torch.optim.Adam(ps, lr=LR),
                            zo_optimizer=lambda ps: calls.optimizer(AdaZO, ps, lr=LR, mu=MU))
        return lambda: (hybrid.step(loss), hybrid.step(loss))  # first-order, then zeroth-order
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak(kind: str, model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """The steady-state peak of `kind` on `model` (in this process), as a row; param_bytes counts the
    whole model's parameters (for a LoRA kind, the frozen base ones too)."""
    device = tokens.device
    name = kind
    if kind.startswith("LoRA "):
        from ..hf.lora import LoraSpec, apply_lora

        model, kind = apply_lora(model, LoraSpec(r=8, alpha=16.0)), kind.removeprefix("LoRA ")
    loss = lambda: model(tokens, labels=tokens).loss  # noqa: E731
    step = _round(kind, model, loss)
    step()  # warm-up: every phase allocates its state, the allocator its caches
    _reset_peak(device)
    step()
    result = _peak(device)
    del step
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    return dict(kind=name, peak_bytes=result, param_bytes=sum(p.numel() * p.element_size() for p in params),
                params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                device=device.type,
                dtype=str(params[0].dtype).removeprefix("torch."), batch=list(tokens.shape))


def measure(kinds: Sequence[str], model: str, device: torch.device | str, dtype: torch.dtype, batch: int,
            length: int, backend: str | None = None, in_process: bool | None = None) -> list[dict]:
    """One row per kind with its peak, x inference and the excess over inference as % of parameter bytes.

    in_process: all kinds in this process (default on CUDA); else each in a fresh one (default on the
    CPU, where freed memory may stay resident and a process's high-water mark counts everything)."""
    device = torch.device(device)
    if device.type == "cuda" if in_process is None else in_process:
        with calls.use(backend):
            net = hf_model(model, device, dtype)
            tokens = token_batch(net, batch, length)
            rows = [peak(kind, net, tokens) for kind in kinds]
    else:
        rows = []
        for kind in kinds:
            argv = [sys.executable, "-m", __name__, kind, "--model", model, "--dtype", str(dtype)[6:],
                    "--batch", str(batch), "--length", str(length)] + (["--backend", backend] if backend else [])
            out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, **_MMAP_ENV})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_inference and excess_pct (of the parameter bytes) against the inference row, when there is one."""
    base = next((r["peak_bytes"] for r in rows if r["kind"] == "inference"), None)
    for r in rows:
        r["x_inference"] = r["peak_bytes"] / base if base else None
        r["excess_pct"] = 100 * (r["peak_bytes"] - base) / r["param_bytes"] if base else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the steady-state peak of one kind on the CPU, as one JSON line")
    parser.add_argument("kind", choices=KINDS + LORA_KINDS)
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != _MMAP_ENV["MALLOC_MMAP_THRESHOLD_"]:
        raise SystemExit("run through zounlearn.bench.memory.measure, or with MALLOC_MMAP_THRESHOLD_=65536 set")
    torch.manual_seed(0)
    with calls.use(args.backend):
        net = hf_model(args.model, "cpu", getattr(torch, args.dtype))
        print(json.dumps(peak(args.kind, net, token_batch(net, args.batch, args.length))))


if __name__ == "__main__":
    main()
