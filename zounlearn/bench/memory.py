"""Steady-state peak memory of one training round of each kind on a causal LM built from a config.

    python -m zounlearn.bench.memory AdamW                        # GPT-2 small, float32, 2 x 256: one JSON line
    python -m zounlearn.bench.memory hybrid --model gpt2-medium --checkpointing

Every kind first runs its warm-up round, in which each of its phases allocates its state (a
first-order optimizer one step; a hybrid, built with block=1, one first-order and one
zeroth-order step, so that both phases hold what they keep), then the high-water mark is reset
and one more round is measured: the peak of a long run, not of its first step.

- CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, in-process
  (`net_bytes` is that peak: the allocator counts tensors only).
- CPU: the kernel's high-water mark of resident memory (VmHWM, reset through
  /proc/self/clear_refs), each kind in a fresh process (`python -m zounlearn.bench.memory KIND`)
  started with blocks of 64 KiB and more mmap-ed (and unmapped when freed) and the heap trimmed
  before the reset, so that resident memory follows live memory instead of malloc's free lists.
  `net_bytes` is what the model and the optimizer hold at the peak: the high-water mark less
  the pages mapped from files (the libraries' code, which the kernel evicts and reloads as the
  machine's other processes need memory) and less `runtime_bytes`, the process's anonymous
  memory before the model exists (Python, torch, transformers).

Also in each row: `saved_bytes`, what autograd saved for backward in the warm-up round (one
first-order step's activations); `state_bytes`, the optimizer's state tensors; `grad_peak_bytes`,
the most gradient bytes held in .grad at once (sampled at every accumulation, from a hook that
runs before the optimizer's own). `plan_for(kind)` is the kind as the memory model
(zounlearn.memory) sees it.
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

from .. import optim
from ..optim.first_order import FirstOrderOptimizer
from ..optim.mezo import mezo_step
from ..optim.registry import HYBRID_PRESETS, make_optimizer
from ..unlearning.activations import activation_checkpointing
from . import calls
from .models import hf_model, token_batch
from .steps import MEZO

# First-order optimizers updating inside backward, by class and by registry name.
IN_BACKWARD = {"AdamW": "adamw", "SGD": "sgd", "SignSGD": "signsgd", "SignAdam": "signadam",
               "CompressedAdam": "compressed_adam", "SophiaG": "sophia"}
KINDS = ("inference", "ZOSGD", "ZOSGD exact", MEZO, "AdaZO", "AdamW", "AdamW fused", "SignAdam",
         *(f"{name} in backward" for name in IN_BACKWARD), *HYBRID_PRESETS)
# The same on LoRA adapters (peft, r 8, alpha 16 on its default target modules): only the adapters train.
LORA_KINDS = tuple(f"LoRA {kind}" for kind in ("inference", "AdamW", "AdaZO", "SignAdam", "hybrid"))
LR, MU = 1e-7, 1e-3
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # read by glibc at start-up only


def plan_for(kind: str):
    """The memory model's Plan of a kind; None for what it does not model (MeZO's loop, the exact
    perturbation, LoRA)."""
    from ..memory import Plan, plan, plan_of

    if kind == "inference":
        return Plan(name=kind, state_bytes=0.0, first_order=False, zeroth_order=False)
    if kind in (MEZO, "ZOSGD exact") or kind.startswith("LoRA "):
        return None
    if kind == "AdamW fused":
        return plan_of(optim.AdamW([torch.nn.Parameter(torch.zeros(8))]), kind)
    if kind.endswith(" in backward"):
        return plan(IN_BACKWARD[kind.removesuffix(" in backward")], in_backward=True)
    return plan({"ZOSGD": "zo_sgd", "AdaZO": "adazo", "AdamW": "adamw", "SignAdam": "signadam"}.get(kind, kind))


def _round(kind: str, model: torch.nn.Module, loss: Callable[[], torch.Tensor]
           ) -> tuple[torch.optim.Optimizer | None, Callable[[], object]]:
    """The optimizer of `kind` and one steady-state round of it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "inference":
        return None, lambda: torch.no_grad()(loss)()
    if kind == MEZO:
        return None, lambda: mezo_step(params, loss, lr=LR, mu=MU, seed=0)
    if kind in ("ZOSGD", "ZOSGD exact"):  # in place, or perturbing copies one tensor at a time
        opt = calls.optimizer(optim.ZOSGD, params, lr=LR, mu=MU, model=model,
                              perturbation="exact" if kind.endswith("exact") else "in_place")
    elif kind == "AdaZO":
        opt = calls.optimizer(optim.AdaZO, params, lr=LR, mu=MU)
    elif kind == "AdamW":  # torch's, with its own default implementation for the device
        opt = torch.optim.AdamW(params, lr=LR)
    elif kind == "AdamW fused":
        opt = calls.optimizer(optim.AdamW, params, lr=LR)
    elif kind == "SignAdam":
        opt = calls.optimizer(optim.SignAdam, params, lr=LR)
    elif kind.endswith(" in backward"):
        name = kind.removesuffix(" in backward")
        options = {"update_period": 1} if name == "SophiaG" else {}  # its Hessian refresh in every round
        opt = calls.optimizer(getattr(optim, name), params, lr=LR, **options).update_in_backward()
    elif kind in HYBRID_PRESETS:
        hybrid = make_optimizer(kind, params, lr=LR, zo_mu=MU, block=1)
        return hybrid, lambda: (hybrid.step(loss), hybrid.step(loss))  # first-order, then zeroth-order
    else:
        raise ValueError(f"unknown kind {kind!r}; use one of {KINDS + LORA_KINDS}")
    return opt, lambda: optim.step(opt, loss)


def _phases(opt: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
    return [opt.fo, opt.zo] if isinstance(opt, optim.HybridFOZO) else [opt] if opt is not None else []


def _state_bytes(opt: torch.optim.Optimizer | None) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for o in _phases(opt)
                for state in o.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
    return sum(storages.values())


class SavedMeter:
    """The bytes of the distinct non-parameter storages autograd saves for backward inside."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


class GradMeter:
    """The most bytes held in .grad at once, sampled whenever autograd accumulates one (its hooks are
    registered before any optimizer's, so they run first); remove() takes the hooks off."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.peak = params, 0
        self.handles = [p.register_post_accumulate_grad_hook(self._sample) for p in params]

    def _sample(self, _p: torch.Tensor) -> None:
        self.peak = max(self.peak, sum(q.grad.nbytes for q in self.params if q.grad is not None))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def runtime_bytes(device: torch.device) -> int:
    """What the process holds before the model exists (anonymous memory, the heap trimmed; 0 on CUDA)."""
    if device.type == "cuda":
        return 0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status("RssAnon")


def peak(kind: str, model: torch.nn.Module, tokens: torch.Tensor, *, runtime: int = 0,
         checkpointing: bool = False) -> dict:
    """The steady-state peak of `kind` on `model` (in this process), as a row; `runtime` is what
    runtime_bytes() gave before the model existed. param_bytes counts the whole model's parameters
    (for a LoRA kind, the frozen base ones too), largest_param_bytes the largest trainable tensor."""
    device, name = tokens.device, kind
    if kind.startswith("LoRA "):
        from ..hf.lora import LoraSpec, apply_lora

        model, kind = apply_lora(model, LoraSpec(r=8, alpha=16.0)), kind.removeprefix("LoRA ")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        return model(tokens, labels=tokens, use_cache=False).loss

    loss.hessian_closure = lambda: optim.gnb_loss(model(tokens, use_cache=False).logits)  # SophiaG's refresh
    grads = GradMeter(trainable)
    try:
        with activation_checkpointing(model, checkpointing):
            opt, step = _round(kind, model, loss)
            with SavedMeter(trainable) as saved:  # warm-up: every phase allocates its state, the allocator its caches
                step()
            grads.peak = 0
            _reset_peak(device)
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                result, files = torch.cuda.max_memory_allocated(device), 0
            else:
                result, files = _status("VmHWM"), _status("RssFile")
    finally:
        grads.remove()
    state = _state_bytes(opt)
    for phase in _phases(opt):  # in-process, the next kind runs on the same model: no hooks left behind
        if isinstance(phase, FirstOrderOptimizer) and phase.updates_in_backward:
            phase.update_in_backward(False)
    del opt, step
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    return dict(kind=name, device=device.type,
                dtype=str(params[0].dtype).removeprefix("torch."), batch=list(tokens.shape),
                checkpointing=checkpointing, peak_bytes=result, runtime_bytes=runtime, file_bytes=files,
                net_bytes=result - files - runtime, state_bytes=state, grad_peak_bytes=grads.peak,
                saved_bytes=saved.bytes, param_bytes=sum(p.numel() * p.element_size() for p in params),
                largest_param_bytes=max(p.numel() * p.element_size() for p in trainable),
                params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable))


def measure(kinds: Sequence[str], model: str, device: torch.device | str, dtype: torch.dtype, batch: int,
            length: int, backend: str | None = None, in_process: bool | None = None,
            checkpointing: bool = False) -> list[dict]:
    """One row per kind (see peak()), with x_inference and excess_pct (add_ratios).

    in_process: all kinds in this process (default on CUDA); else each in a fresh one (default on the
    CPU, where freed memory may stay resident and a process's high-water mark counts everything)."""
    device = torch.device(device)
    if device.type == "cuda" if in_process is None else in_process:
        with calls.use(backend):
            runtime = runtime_bytes(device)
            net = hf_model(model, device, dtype)
            tokens = token_batch(net, batch, length)
            rows = [{**peak(kind, net, tokens, runtime=runtime, checkpointing=checkpointing), "model": model}
                    for kind in kinds]
    else:
        rows = []
        for kind in kinds:
            argv = [sys.executable, "-m", __name__, kind, "--model", model, "--dtype", str(dtype)[6:],
                    "--batch", str(batch), "--length", str(length)] + (["--backend", backend] if backend else []) \
                + (["--checkpointing"] if checkpointing else [])
            out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, **_MMAP_ENV})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_inference (of net_bytes) and excess_pct (the excess over inference, % of the parameter bytes)
    against the inference row, when there is one."""
    base = next((r["net_bytes"] for r in rows if r["kind"] == "inference"), None)
    for r in rows:
        r["x_inference"] = r["net_bytes"] / base if base else None
        r["excess_pct"] = 100 * (r["net_bytes"] - base) / r["param_bytes"] if base else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the steady-state peak of one kind on the CPU, as one JSON line")
    parser.add_argument("kind", choices=KINDS + LORA_KINDS)
    parser.add_argument("--model", default="gpt2-small", help="a name of zounlearn.bench.models.HF_CONFIGS")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in backward")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != _MMAP_ENV["MALLOC_MMAP_THRESHOLD_"]:  # glibc reads it at start-up
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **_MMAP_ENV})
    torch.manual_seed(0)
    device = torch.device("cpu")
    with calls.use(args.backend):
        runtime = runtime_bytes(device)
        net = hf_model(args.model, device, getattr(torch, args.dtype))
        row = peak(args.kind, net, token_batch(net, args.batch, args.length), runtime=runtime,
                   checkpointing=args.checkpointing)
    print(json.dumps({**row, "model": args.model}))


if __name__ == "__main__":
    main()
