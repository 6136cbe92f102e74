"""The measuring stages of `make gpu-check`: bandwidth of every pass, the ZO-SGD step against MeZO's
loop, steady-state peak memory. The measurements are zounlearn.bench's (as `zounlearn bench`)."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from gpu_check_context import Context


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


# zounlearn.bench.memory's kinds that fit the stage's budget: the basic ones, the default hybrid and the
# paper's float32 one, a lean preset and an update inside backward (every kind, on the CPU:
# benchmarks/test_memory_bench.py).
MEMORY_KINDS = ("inference", "ZOSGD", "ZOSGD exact", "MeZO loop", "AdaZO", "AdamW", "SignAdam", "AdamW in backward",
                "hybrid", "hybrid_float32", "hybrid_signadam")


def memory(ctx: Context) -> dict:
    """Steady-state peak memory of each kind of step on a ~1B-parameter causal LM."""
    import torch

    from zounlearn.bench import memory as bench_memory

    s = ctx.sizes
    # In this process, as on a GPU (a dry run's CPU figures are then rougher than benchmarks/' ones).
    rows = bench_memory.measure(MEMORY_KINDS, s.hf_model, s.device, getattr(torch, s.memory_dtype), *s.batch,
                                in_process=True)
    return {"rows": rows, "model": s.hf_model, "batch": list(s.batch), "ok": True}
