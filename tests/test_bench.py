"""zounlearn.bench, the measurements behind `zounlearn bench`, `make gpu-check` and benchmarks/: the
model shapes against transformers' own models, the bytes each pass must move against the review's
table (issue 14), and the rows of a real (tiny) measurement on the CPU."""

from __future__ import annotations

import time

import pytest
import torch
import transformers

from zounlearn.bench import calls, memory, models, passes, steps, timing
from zounlearn.bench.calls import Rule
from zounlearn.errors import BackendUnavailable
from zounlearn.optim import ZOSGD

CPP = "cpp" if "cpp" in calls.runnable("cpu") else "reference"


@pytest.mark.parametrize(("name", "config"), [
    ("llama-7b", transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32)),
    ("gpt2-small", transformers.GPT2Config()),
    ("tiny", transformers.LlamaConfig(**models.HF_CONFIGS["tiny"][1])),
])
def test_model_shapes_are_transformers_parameter_lists(name, config):
    with torch.device("meta"):  # shapes only: no 7B allocation
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert models.model_shapes(name) == [tuple(p.shape) for p in model.parameters()]


def test_llama_7b_is_the_reviews_7b():
    shapes = models.model_shapes("llama-7b")
    assert len(shapes) == 291 and round(models.numel(shapes) / 1e9, 3) == 6.738
    assert models.model_shapes("llama-7b", layers=2) == shapes[:1 + 18] + shapes[-2:]


def test_layers_that_fit():
    two_layers = models.numel(models.model_shapes("llama-7b", 2))
    assert models.layers_that_fit("llama-7b", two_layers * 2, 2) == 2
    assert models.layers_that_fit("llama-7b", two_layers * 2 - 1, 2) == 1
    assert models.layers_that_fit("llama-7b", 1.0, 2) == 1
    assert models.layers_that_fit("llama-7b", 1e15, 2) == 32


# Bytes per element each pass must move (the review's table 2.3, without the bytes it calls wasted):
# s-byte parameters, float32 state.
REVIEW = {("perturb_", None): lambda s: 2 * s, ("zo_update_", Rule.SIGN): lambda s: 2 * s,
          ("zo_update_", Rule.SGD): lambda s: 2 * s + 8, ("zo_update_", Rule.SIGN_ADAM): lambda s: 2 * s + 8,
          ("zo_update_", Rule.ADAM): lambda s: 2 * s + 16, ("zo_update_", Rule.ADAZO): lambda s: 2 * s + 16,
          ("zo_update_", Rule.DESCENT): lambda s: 2 * s, ("grad_update_", Rule.SIGN): lambda s: 3 * s,
          ("grad_update_", Rule.SGD): lambda s: 3 * s + 8, ("grad_update_", Rule.SIGN_ADAM): lambda s: 3 * s + 8,
          ("grad_update_", Rule.ADAM): lambda s: 3 * s + 16, ("grad_update_", Rule.ADAZO): lambda s: 3 * s + 16,
          ("grad_update_", Rule.ADAM_MOMENTS): lambda s: s + 16, ("grad_update_", Rule.QUANTIZED): lambda s: 2 * s + 8,
          ("grad_update_", Rule.SOPHIA): lambda s: 3 * s + 12, ("grad_update_", Rule.DESCENT): lambda s: 3 * s}


@pytest.mark.parametrize("size", [4, 2])
def test_pass_bytes_are_the_reviews(size):
    checked = set()
    for p in passes.fused_passes(zo_dists=("rademacher", "gaussian")):
        key = (p.op, p.rule)
        assert p.bytes_per_element(size) == REVIEW[key](size), p.name
        checked.add(key)
    assert checked == set(REVIEW)


def test_tensors_are_aligned_views_of_one_buffer():
    shapes = [(3, 5), (129,), (7,), (64, 2)]
    t = passes.Tensors.allocate(shapes, torch.bfloat16, "cpu")
    assert [tuple(p.shape) for p in t.params] == shapes and all(p.requires_grad for p in t.params)
    for views, flat in ((t.params, t.flat), (t.grads, t.flat_grads)):
        for v in views:
            offset = v.data_ptr() - flat.data_ptr()
            assert offset % 512 == 0 and 0 <= offset < flat.numel() * flat.element_size()
    t.flat.zero_()
    assert all(not p.detach().any() for p in t.params)  # the same memory


def test_measure_runs_every_pass_and_takes_its_ratios():
    t = passes.Tensors.allocate(models.model_shapes("tiny", 1), torch.float32, "cpu")
    before = [p.detach().clone() for p in t.params]
    todo = passes.fused_passes()
    rows = passes.measure(t, todo, [CPP], rounds=1, warmup=0, label="tiny")
    assert [r["kind"] for r in rows] == ["torch add_", "torch copy_"] + [p.name for p in todo]
    add, copy = rows[0], rows[1]
    assert add["x_add"] == 1.0 and copy["x_copy"] == 1.0
    for r in rows:
        assert r["gbps"] == pytest.approx(r["bytes_per_element"] * (t.flat.numel() if r["backend"] == "torch" else
                                                                    t.numel) / r["ms"] * 1e3 / 1e9)
        assert r["x_add"] == pytest.approx(r["gbps"] / add["gbps"])
    assert all(not torch.equal(a, b) for a, b in zip(before, t.params))  # the passes did the work


def test_step_measure_does_the_step():
    params = models.make_params(models.model_shapes("tiny", 1), torch.float32, "cpu")
    before = [p.detach().clone() for p in params]
    rows = steps.measure(params, steps.constant_loss, [CPP], rounds=1, mezo_rounds=1, label="tiny")
    assert [r["kind"] for r in rows] == [steps.MEZO, "ZOSGD rademacher", "ZOSGD gaussian"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    frozen = [p.detach() for p in params]
    with pytest.raises(ValueError, match="requires_grad=False"):  # a ZO step would skip them and look free
        steps.measure(frozen, steps.constant_loss, [CPP])


def test_time_call_counts_rounds_and_stops_at_max_seconds():
    calls_made = []
    t = timing.time_call(lambda: calls_made.append(1), "cpu", rounds=4, warmup=2)
    assert len(t.seconds) == 4 and len(calls_made) == 6
    t = timing.time_call(lambda: time.sleep(0.05), "cpu", rounds=100, warmup=0, max_seconds=0.12)
    assert 2 <= len(t.seconds) <= 4 and t.median >= 0.05


def test_calls_backend_context_reaches_ops_and_optimizers():
    assert calls.current() is None
    with calls.use("reference"):
        with calls.use(CPP):
            assert calls.current() == CPP
        assert calls.current() == "reference"
    assert calls.current() is None
    x = torch.zeros(3)
    with calls.use("cuda"):  # it cannot take CPU tensors: the choice reaches the op and the optimizer's step
        with pytest.raises(BackendUnavailable, match="cannot run on cpu tensors"):
            calls.perturb_([x], [1.0], 0)
        opt = calls.optimizer(ZOSGD, [torch.nn.Parameter(x)], lr=0.1)
        with pytest.raises(BackendUnavailable, match="cannot run on cpu tensors"):
            opt.step(steps.constant_loss)
        sgd = calls.optimizer(torch.optim.SGD, [torch.nn.Parameter(x)], lr=0.1)  # torch's own: no backend
    assert isinstance(sgd, torch.optim.SGD) and not x.any()
    assert calls.describe()["reference"].startswith("available")


@pytest.mark.slow
def test_hybrid_steady_state_peaks():
    """hybrid_float32 (the paper's as published): its first-order step, once a ZO step has run, also
    holds AdaZO's float32 m and v: AdamW's peak (Adam's state, gradients, activations) plus 200% of
    float32 parameter bytes (the review's item 24; 203% measured). The default hybrid keeps the four
    moments in bfloat16 and one gradient tensor at a time: at most AdamW's peak. Each kind in a fresh
    process, a 7 M-parameter Llama, 1 x 8 tokens."""
    adamw, paper, lean = memory.measure(["AdamW", "hybrid_float32", "hybrid"], "llama-7m", "cpu", torch.float32, 1, 8)
    assert adamw["peak_bytes"] > 3 * adamw["param_bytes"]  # parameters, gradients, two moments at least
    assert 1.8 < (paper["peak_bytes"] - adamw["peak_bytes"]) / adamw["param_bytes"] < 2.3
    assert lean["peak_bytes"] <= adamw["peak_bytes"]


def test_measure_records_a_failing_pass_and_goes_on():
    t = passes.Tensors.allocate([(300,)], torch.float32, "cpu")
    todo = passes.fused_passes(dists=("rademacher",))[:3]
    errors: list = []
    rows = passes.measure(t, todo, ["cuda", CPP], rounds=1, warmup=0, errors=errors)  # cuda cannot take CPU tensors
    assert [r["kind"] for r in rows] == ["torch add_", "torch copy_"] + [p.name for p in todo]
    assert [e["kind"] for e in errors] == [p.name for p in todo] and all(e["backend"] == "cuda" for e in errors)
    assert all("cannot run on cpu tensors" in e["error"] for e in errors)
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        passes.measure(t, todo, ["cuda"], rounds=1, warmup=0)
