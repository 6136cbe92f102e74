"""Optimizer steps: the parameter-update part of one ZO-SGD step (3 fused passes) against
MeZO's own 4-pass loop, and the steady-state peak memory of a step on LoRA adapters of GPT-2
small, each as a ratio to what was measured in the same run (every full-model kind, on three
GPT-2 sizes: test_memory_bench.py).

    make bench     # conftest.py prints the tables that benchmarks/README.md records

The steps, shapes and memory measurement are zounlearn.bench's (as `zounlearn bench` and
`make gpu-check` use them).
"""

from __future__ import annotations

import pytest
import torch

from zounlearn.bench import calls, memory, models, steps

KINDS = {steps.MEZO: None}
if "cpp" in calls.runnable("cpu"):
    KINDS.update({f"ZOSGD {dist} (cpp)": dist for dist in ("rademacher", "gaussian")})


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_zo_sgd_step_passes(benchmark, dtype, kind):
    # GPT-2 small's parameter list (124 M parameters in 148 tensors); the loss is a constant, so
    # what is timed is the optimizer's own work on the parameters.
    params = models.make_params(models.model_shapes("gpt2-small"), dtype, "cpu")
    dist = KINDS[kind]
    n = sum(p.numel() for p in params)
    case = f"ZO-SGD step, {str(dtype)[6:]}, {n / 1e6:.0f} M params in {len(params)} tensors"
    benchmark.group = case
    benchmark.extra_info.update(table="step", case=case, kind=kind)
    with calls.use("cpp"):
        fn = steps.mezo(params, steps.constant_loss) if dist is None else steps.zo_sgd(params, steps.constant_loss,
                                                                                        dist)
        benchmark.pedantic(fn, rounds=3 if dist is None else 10, warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(p.data[:10]).all() for p in params)


@pytest.mark.parametrize("kind", ["inference", *memory.LORA_KINDS])
def test_peak_memory_of_one_step(benchmark, kind):
    """Each kind in a fresh process (zounlearn.bench.memory): the steady-state peak of resident memory
    on GPT-2 small (float32, 2 x 256 tokens), LoRA's against the full model's inference."""
    result = benchmark.pedantic(lambda: memory.measure([kind], "gpt2-small", "cpu", torch.float32, 2, 256)[0],
                                rounds=1, iterations=1)
    benchmark.group = "peak memory"
    benchmark.extra_info.update(table="memory", **result)
    assert result["peak_bytes"] > result["param_bytes"]
