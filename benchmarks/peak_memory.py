"""Peak resident memory of one optimizer step on a GPT-2-small causal LM (124 M parameters,
random weights from a config, float32, CPU), in a fresh process so that nothing else counts.

    python benchmarks/peak_memory.py ZOSGD      # prints one JSON line
    python benchmarks/peak_memory.py "LoRA AdaZO"   # the same step on LoRA adapters (peft)

The kernel's high-water mark (VmHWM) is reset after the model, the batch and one warm-up
forward pass exist, so the figure is the model plus what the step itself adds. Blocks of
64 KiB and more are mmap-ed (and unmapped when freed) and the heap is trimmed before the
reset, so resident memory follows live memory instead of malloc's free lists.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # read by glibc at start-up only
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from zounlearn import optim
from zounlearn.optim.mezo import mezo_step

BATCH, LENGTH = 2, 256


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main(kind: str) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=LENGTH))
    if kind.startswith("LoRA "):  # r 8, alpha 16 on c_attn (peft's default for GPT-2): only the adapters train
        from zounlearn.hf.lora import LoraSpec, apply_lora
        model, kind = apply_lora(model, LoraSpec(r=8, alpha=16.0)), kind[len("LoRA "):]
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH))
    loss = lambda: model(tokens, labels=tokens).loss  # noqa: E731
    with torch.no_grad():
        loss()  # warm-up: allocator caches and lazy initialisation count for every kind alike
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    if kind == "inference":
        with torch.no_grad():
            loss()
    elif kind == "ZOSGD":
        optim.ZOSGD(params, lr=1e-6).step(loss)
    elif kind == "AdaZO":
        optim.AdaZO(params, lr=1e-6).step(loss)  # includes its float32 m and v
    elif kind == "MeZO reference":
        mezo_step(params, loss, lr=1e-6, mu=1e-3, seed=0)
    elif kind == "AdamW":
        opt = torch.optim.AdamW(params, lr=1e-6)
        loss().backward()
        opt.step()
    elif kind == "SignAdam":
        optim.SignAdam(params, lr=1e-6).step(loss)
    elif kind == "HybridFOZO (FO phase)":
        optim.HybridFOZO(params, block=1, total_steps=2).step(loss)  # step 0 of FO, ZO: first-order
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the whole model's
    print(json.dumps({"peak_bytes": _high_water_mark(), "param_bytes": param_bytes, "trainable": sum(
        p.numel() for p in params), "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main(sys.argv[1])
