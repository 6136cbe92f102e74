"""Steady-state peak resident memory of an optimizer on a GPT-2 causal LM (random weights from a
config, float32, CPU), in a fresh process so that nothing else counts.

    python benchmarks/peak_memory.py AdamW                        # GPT-2 small, batch 2 x 256: one JSON line
    python benchmarks/peak_memory.py hybrid --model medium --batch 2 --length 256

Steady state: every kind first runs one whole cycle of its phases (a first-order optimizer one
step; a hybrid, built with block=1, a first-order and a zeroth-order step), so that everything it
keeps (moments, Hessian estimates) exists; then the heap is trimmed, the kernel's high-water mark
(VmHWM) is reset to the resident size, and the same cycle runs again: `peak_bytes` is the
high-water mark of that second cycle, everything resident included. Blocks of 64 KiB and more are
mmap-ed (and unmapped when freed), so resident memory follows live memory instead of malloc's
free lists. `net_bytes` is what the model and the optimizer hold at the peak: the high-water mark
less the pages mapped from files (the libraries' code, which the kernel evicts and reloads as the
machine's other processes need memory: they moved the total by up to 130 MiB between runs) and
less `runtime_bytes`, the process's anonymous memory before the model exists (Python, torch,
transformers). Also reported: `saved_bytes`, what autograd saved for backward in the warm-up cycle
(one first-order step's activations); `state_bytes`, the optimizer's state tensors;
`grad_peak_bytes`, the most gradient bytes held in .grad at once (sampled at every accumulation,
from a hook that runs before the optimizer's own). `plan_for(kind)` is the kind as the memory
model (zounlearn.memory) sees it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start-up
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from zounlearn import optim
from zounlearn.optim.mezo import mezo_step
from zounlearn.optim.registry import HYBRID_PRESETS, make_optimizer
from zounlearn.unlearning.activations import activation_checkpointing

SIZES = {"small": {}, "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
         "large": {"n_embd": 1280, "n_layer": 36, "n_head": 20}}
IN_BACKWARD = ("AdamW", "SGD", "SignSGD", "SignAdam", "CompressedAdam", "SophiaG")
KINDS = ("inference", "ZOSGD", "MeZO reference", "AdaZO", "AdamW", "AdamW fused",
         *(f"{name} in backward" for name in IN_BACKWARD), *HYBRID_PRESETS)


REGISTRY_NAMES = {"AdamW": "adamw", "SGD": "sgd", "SignSGD": "signsgd", "SignAdam": "signadam",
                  "CompressedAdam": "compressed_adam", "SophiaG": "sophia"}


def plan_for(kind: str):
    """The memory model's Plan of a kind (None for MeZO's reference loop, which it does not model)."""
    from zounlearn.memory import Plan, plan, plan_of

    if kind == "inference":
        return Plan(name=kind, state=0.0, first_order=False, zeroth_order=False)
    if kind == "MeZO reference":
        return None
    if kind in ("ZOSGD", "AdaZO"):
        return plan({"ZOSGD": "zo_sgd", "AdaZO": "adazo"}[kind])
    if kind == "AdamW":
        return plan("adamw")
    if kind == "AdamW fused":
        return plan_of(optim.AdamW([torch.nn.Parameter(torch.zeros(8))]), kind)
    if kind.endswith(" in backward"):
        return plan(REGISTRY_NAMES[kind.removesuffix(" in backward")], in_backward=True)
    return plan(kind)


def _resident(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _state_bytes(opt: torch.optim.Optimizer | None) -> int:
    inner = [opt.fo, opt.zo] if isinstance(opt, optim.HybridFOZO) else [opt] if opt is not None else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for o in inner
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
    """The most bytes held in .grad at once, sampled whenever autograd accumulates one."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.peak = params, 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._sample)

    def _sample(self, _p: torch.Tensor) -> None:
        self.peak = max(self.peak, sum(q.grad.nbytes for q in self.params if q.grad is not None))


def _cycle(kind: str, params: list[torch.nn.Parameter], loss) -> tuple[torch.optim.Optimizer | None, object]:
    """The optimizer of `kind` and a function that runs one whole cycle of its phases."""
    def fo(opt):
        return lambda: opt.step(loss)

    if kind == "inference":
        return None, lambda: torch.no_grad()(loss)()
    if kind == "MeZO reference":
        return None, lambda: mezo_step(params, loss, lr=1e-6, mu=1e-3, seed=0)
    if kind in ("ZOSGD", "AdaZO"):
        opt = getattr(optim, kind)(params, lr=1e-6)
        return opt, fo(opt)
    if kind == "AdamW":  # torch's, with its own default implementation for the device
        opt = torch.optim.AdamW(params, lr=1e-6)
        return opt, lambda: optim.step(opt, loss)
    if kind == "AdamW fused":
        opt = optim.AdamW(params, lr=1e-6)
        return opt, fo(opt)
    if kind.endswith(" in backward"):
        name = kind.removesuffix(" in backward")
        options = {"update_period": 1} if name == "SophiaG" else {}  # its Hessian refresh in every cycle
        opt = getattr(optim, name)(params, lr=1e-6, **options).update_in_backward()
        return opt, fo(opt)
    opt = make_optimizer(kind, params, lr=1e-6, block=1)  # a hybrid preset: FO, ZO, FO, ZO, ...
    return opt, lambda: (opt.step(loss), opt.step(loss))


def measure(kind: str, size: str, batch: int, length: int, checkpointing: bool) -> dict:
    _trim()
    runtime = _resident("RssAnon")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=max(length, 1024), **SIZES[size])).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    meter = GradMeter(params)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length))

    def loss():
        return model(tokens, labels=tokens, use_cache=False).loss

    loss.hessian_closure = lambda: optim.gnb_loss(model(tokens, use_cache=False).logits)
    with activation_checkpointing(model, checkpointing):
        opt, cycle = _cycle(kind, params, loss)
        with SavedMeter(params) as saved:  # warm-up: the state, caches and lazy initialisation exist after it
            cycle()
        meter.peak = 0
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        cycle()
        peak, files = _resident("VmHWM"), _resident("RssFile")
    return {"kind": kind, "model": size, "batch": batch, "length": length, "checkpointing": checkpointing,
            "peak_bytes": peak, "runtime_bytes": runtime, "file_bytes": files, "net_bytes": peak - files - runtime,
            "state_bytes": _state_bytes(opt),
            "grad_peak_bytes": meter.peak, "saved_bytes": saved.bytes,
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "largest_param_bytes": max(p.numel() * p.element_size() for p in params),
            "params": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--model", choices=tuple(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in backward")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.kind, args.model, args.batch, args.length, args.checkpointing)))


if __name__ == "__main__":
    main()
